"""Write the bundled toy extractive question-answering set (SQuAD-style, with some unanswerable questions).

Writes data/toy/qa/{train,validation,test}.jsonl, one question per line in the flattened SQuAD form:
    {"id", "title", "context", "question", "answers": {"text": [...], "answer_start": [...]}, "is_impossible"}
Contexts are made-up encyclopedia articles about clubs and societies, 6 to 8 sentences (about 125-210 BERT
word pieces): long enough that about 40 % of the answers lie beyond the first 128-token window of question
+ context, short enough that the default run trains in minutes on a CPU. One question in twelve
asks for something the article does not state (empty answers, "is_impossible": true). Validation and test
questions may list a second acceptable answer ("1987" and "in 1987"), as SQuAD's dev set does.

The splits share no names, places or organisations, and half of the validation and test questions use
phrasings that training never saw, so a model has to read the context, not remember it. Deterministic
(fixed seeds); the committed files are the data. Run from anywhere:
    python data/toy/make_qa.py
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEEDS = {"train": 11, "validation": 12, "test": 13}
ARTICLES = {"train": 120, "validation": 20, "test": 28}
QUESTIONS_PER_ARTICLE = 6  # every other article swaps one of them for an unanswerable question
FACTS_PER = (4, 5)  # facts an article states besides its founding, fewest and most
SENTENCES = 6  # most facts + fillers per article, besides the lead and the founding: 6-8 sentences in all
LATE_WORDS = 80  # about 110 word pieces: the context in a 128-token window; answers past it need a later one

# -- vocabularies: one per split, so no name, place or organisation crosses splits ------------------------
FIRST = {
    "train": "Maren Tobias Ilse Jonah Freya Anselm Greta Rowan Leona Caspar Edith Milo Sabine Osric Dalia "
    "Fenna Ivo Lotte Bram Selma".split(),
    "validation": "Corin Hedda Lucan Oriel Tamsin Vidar Wrenna Yorick".split(),
    "test": "Anouk Bastian Cosima Dorian Elowen Fabian Gisela Henrik Isolde Jasper".split(),
}
LAST = {
    "train": "Holt Varga Brennan Okafor Lindgren Castell Marsh Thorne Abbing Kessler Dunmore Pryce Ashby "
    "Quill Ferrand Halloran Moreau Strand Whitlock Benning".split(),
    "validation": "Carrow Eskdale Fenwick Gorring Haldane Ingram Jessop Kilbride".split(),
    "test": "Larkin Montague Norcott Ormerod Pendry Radcliffe Sallow Tennant Upjohn Voss".split(),
}
TOWN_STEMS = {  # a town is stem + ending: Elsby, Brackwick
    "train": "Els Brack Cold Dun Fern Glen Hol Kirk Lang Mor Pen Rad Wel Ast".split(),
    "validation": "Bryn Corve Quen Tarn Yew Ulve".split(),
    "test": "Hart Isle Oak Sedge Thorn Vale Wyn".split(),
}
TOWN_ENDINGS = "by ford ton wick mouth ley stead bury".split()
ORG_STEMS = {  # also name the events: the Brightwater Harvest Fair
    "train": "Brightwater Greyfield Redmoor Stillbrook Highcombe Larkspur Blackthorn Windmere Copperleaf "
    "Northgate Silverdale Oldbridge Fairhaven Eastmarch Goldcrest Ravenhill Mossbank Elmstead Harefield "
    "Kestrel".split(),
    "validation": "Mistral Harrowgate Duskwood Amberlea Frostholm".split(),
    "test": "Kingsmoor Seabright Thistledown Marigold Hollowell Starling".split(),
}
TROPHY_NOUNS = {
    "train": "Oar Bell Lantern Anchor Compass Quill Shield Horn".split(),
    "validation": "Key Arrow Crown".split(),
    "test": "Star Wheel Feather Harp".split(),
}
METALS = "Silver Bronze Copper Golden Iron".split()
EVENTS = ["Harvest Fair", "Autumn Festival", "Spring Gala", "Midsummer Games", "Winter Show"]
MONTHS = "January February March April May June July August September October November December".split()
KINDS = [  # organisation kind, a member, the activity
    ("Rowing Club", "rower", "rowing"),
    ("Choral Society", "singer", "choral singing"),
    ("Chess Club", "player", "chess"),
    ("Cycling Club", "cyclist", "cycling"),
    ("Drama Society", "actor", "amateur theatre"),
    ("Beekeepers Association", "beekeeper", "beekeeping"),
    ("Astronomy Society", "observer", "astronomy"),
    ("Walking Club", "walker", "hill walking"),
]

# -- facts: how an article states them, and the questions they answer ------------------------------------
# An ask is (kind, slot that holds the answer, question clause, relative clause; who-questions need only the
# first). "vague" states the fact without one detail; the question on that detail ("unstated") is then
# unanswerable although the article mentions everything around it.
FACTS = {
    "founding": {
        "say": ["{founder} founded the {org} in {year1} in the town of {town1}, after a meeting of friends.",
                "The {org} was founded in {year1} by {founder} in the town of {town1}, with no money."],
        "ask": [("who", "founder", "founded the {org}"),
                ("year", "year1", "was the {org} founded", "the {org} was founded"),
                ("where", "town1", "was the {org} founded", "the {org} was founded")],
    },
    "chair": {
        "say": ["The first chair of the {org} was {chair}, who had taught at a school in {town2}.",
                "{chair}, who had taught at a school in {town2}, became the first chair of the {org}."],
        "vague": "The first chair of the {org} was {chair}, a former teacher.", "unstated": "where",
        "ask": [("who", "chair", "became the first chair of the {org}"),
                ("where", "town2", "had {chair} taught at a school", "{chair} had taught at a school")],
    },
    "hall": {
        "say": ["On {date1} the {org} opened its first building, the {hall}, a former grain store.",
                "The {org} opened its first building, the {hall}, on {date1}, after years of saving."],
        "vague": "The {org} soon opened a building of its own, the {hall}, a former grain store.",
        "unstated": "date",
        "ask": [("date", "date1", "did the {org} open its first building",
                 "the {org} opened its first building"),
                ("what", "hall", "did the {org} open first", "the {org} opened first")],
    },
    "members": {
        "say": ["In {year2} the {org} had {members} members, most of them from the nearby villages.",
                "The {org} counted {members} members in {year2} and kept a waiting list for newcomers."],
        "vague": "Membership of the {org} grew steadily in the years that followed.", "unstated": "count",
        "ask": [("count", "members", "did the {org} have in {year2}", "the {org} had in {year2}")],
    },
    "trophy": {
        "say": ["In {year4} the {org} created the {trophy}, a prize for its best young {member}.",
                "The {trophy}, a prize for the best young {member}, was created by the {org} in {year4}."],
        "vague": "Every year the {org} awards the {trophy} to its best young {member}.", "unstated": "year",
        "ask": [("what", "trophy", "did the {org} create in {year4}", "the {org} created in {year4}"),
                ("year", "year4", "did the {org} create the {trophy}", "the {org} created the {trophy}")],
    },
    "move": {
        "say": ["In {year3} the {org} moved its headquarters to {town3}, where the rent was lower.",
                "The {org} moved its headquarters to {town3} in {year3}, a move that divided its members."],
        "vague": "Some years later the {org} moved its headquarters to {town3}, where the rent was lower.",
        "unstated": "year",
        "ask": [("where", "town3", "did the {org} move its headquarters in {year3}",
                 "the {org} moved its headquarters in {year3}"),
                ("year", "year3", "did the {org} move its headquarters to {town3}",
                 "the {org} moved its headquarters to {town3}")],
    },
    "merger": {
        "say": ["In {year5} the {org} merged with the {org2}, which had been led by {leader}.",
                "The {org} merged with the {org2} in {year5}; the {org2} had been led by {leader}."],
        "vague": "The {org} later merged with the {org2}, then led by {leader}.", "unstated": "year",
        "ask": [("what", "org2", "did the {org} merge with in {year5}", "the {org} merged with in {year5}"),
                ("who", "leader", "had led the {org2}"),
                ("year", "year5", "did the {org} merge with the {org2}", "the {org} merged with the {org2}")],
    },
    "event": {
        "say": ["On {date2} the {org} hosted the {event} in {town4}, which drew {visitors} visitors.",
                "The {event}, hosted by the {org} in {town4} on {date2}, drew {visitors} visitors."],
        "vague": "The {org} also hosted the {event} in {town4}, which became a yearly fixture.",
        "unstated": "count",
        "ask": [("date", "date2", "did the {org} host the {event}", "the {org} hosted the {event}"),
                ("where", "town4", "did the {org} host the {event}", "the {org} hosted the {event}"),
                ("count", "visitors", "did the {event} draw", "the {event} drew")],
    },
    "death": {
        "say": ["{founder} died in {town5} in {year6} and is remembered by the {org} each spring.",
                "In {year6} {founder} died at home in {town5}, leaving a small sum of money to the {org}."],
        "vague": "{founder} spent the last years of a long life in {town5}.", "unstated": "year",
        "ask": [("where", "town5", "did {founder} die", "{founder} died"),
                ("year", "year6", "did {founder} die", "{founder} died")],
    },
    "head": {
        "say": ["{head} took charge of the {org} in {year7} and still leads it with a small committee.",
                "Since {year7} the {org} has been led by {head}, who has tried to bring in younger members."],
        "vague": "Today the {org} is led by {head}.", "unstated": "year",
        "ask": [("who", "head", "took charge of the {org} in {year7}"),
                ("year", "year7", "did {head} take charge of the {org}", "{head} took charge of the {org}")],
    },
}  # fmt: skip
NOUNS = {
    "hall": "building",
    "trophy": "prize",
    "org2": "organisation",
    "members": "members",
    "visitors": "visitors",
}
LEAD = "The {org} is one of the oldest {activity} groups in the region and has kept its name since it began."
FILLERS = [  # sentences that answer nothing; some carry numbers and years to distract
    "Members of the {org} meet twice a week in the evenings, and newcomers are welcome to watch first.",
    "The old streets of {town1} are known for their narrow stone bridges and a busy Saturday market.",
    "A small museum in {town1} keeps photographs and letters from the early days of the {org}.",
    "Local newspapers have written about the {org} and its members many times, usually with warmth.",
    "The {org} pays for its work through membership fees, gifts from local firms and a yearly raffle.",
    "Lessons in {activity} are open to anyone over the age of {age}, and the first three are free.",
    "In winter the {org} holds evening talks on the history of {activity}, which often fill the room.",
    "A short history of the {org} was published in {yearx} by a local schoolteacher.",
    "Most members live within a short walk of the meeting rooms, though a few travel from further away.",
    "Several former members have gone on to take part in {activity} at a national level.",
    "The records of the {org} are kept in a wooden chest that is opened once a year at the annual meeting.",
    "Like many groups of its kind, the {org} has had to work hard to keep young people interested.",
    "The colours of the {org} are dark green and white, and they appear on its flag and its letters.",
    "Visitors to {town1} are often surprised by how much of its social life turns around the {org}.",
    "Many of the early members were shopkeepers, clerks and farm workers with little free time.",
    "Disagreements over money have been common, but the {org} has never come close to closing.",
]
QUESTION_TEMPLATES = {  # kind: (phrasings for every split, phrasings that only validation and test use)
    "who": (["Who {q}?", "Which person {q}?", "Name the person who {q}."],
            ["According to the article, who {q}?", "Who was the person that {q}?"]),
    "where": (["Where {q}?", "In which town {q}?", "In what place {q}?"],
              ["Name the town where {rel}.", "According to the article, where {q}?"]),
    "year": (["When {q}?", "In what year {q}?", "What year {q}?"],
             ["Give the year in which {rel}.", "In which year, according to the text, {q}?"]),
    "date": (["On what date {q}?", "When {q}?", "On which day {q}?"],
             ["Give the exact date on which {rel}.", "What was the date when {rel}?"]),
    "what": (["What {noun} {q}?", "Which {noun} {q}?", "What was the name of the {noun} that {rel}?"],
             ["Name the {noun} that {rel}.", "According to the article, which {noun} {q}?"]),
    "count": (["How many {noun} {q}?", "What number of {noun} {q}?",
               "What was the number of {noun} that {rel}?"],
              ["Give the number of {noun} that {rel}.", "According to the article, how many {noun} {q}?"]),
}  # fmt: skip
# A second acceptable answer: the span widened by the words before it ("in 1987", "the town of Elsby").
WIDER = ("the town of ", "in ", "on ", "the ")


def draw_values(split: str, rng: random.Random, titles: set[str]) -> dict[str, str]:
    """Everything an article can mention; the founder, chair, leader and head are four different people."""
    org = ""
    while not org or org in titles:  # titles are unique within a split
        kind, member, activity = rng.choice(KINDS)
        org = f"{rng.choice(ORG_STEMS[split])} {kind}"
    titles.add(org)
    org2 = org
    while org2.split()[0] == org.split()[0]:
        org2 = f"{rng.choice(ORG_STEMS[split])} {rng.choice(KINDS)[0]}"
    people = rng.sample([f"{f} {s}" for f in FIRST[split] for s in LAST[split]], 4)
    towns = [s + e for s in TOWN_STEMS[split] for e in TOWN_ENDINGS if s[-1] != e[0]]  # no "Hartton"
    towns = rng.sample(towns, 5)
    founded = rng.randint(1850, 1935)
    later = rng.sample(range(founded + 3, founded + 70), 8)  # distinct years for the other events

    def date(year: int) -> str:
        return f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {year}"

    values = {"org": org, "org2": org2, "member": member, "activity": activity, "year1": str(founded)}
    values |= dict(zip(["founder", "chair", "leader", "head"], people))
    values |= {f"town{i + 1}": town for i, town in enumerate(towns)}
    values |= {f"year{i}": str(y) for i, y in zip([2, 3, 4, 5, 6], later)}
    values |= {"yearx": str(later[5]), "date1": date(later[6]), "date2": date(later[7])}
    values |= {"year7": str(rng.randint(1996, 2021)), "age": str(rng.randint(8, 16))}
    values |= {"members": str(rng.randint(30, 900)), "visitors": str(rng.randint(200, 9000))}
    values |= {"hall": f"{rng.choice(LAST[split])} Hall", "event": f"{org.split()[0]} {rng.choice(EVENTS)}"}
    values["trophy"] = f"{rng.choice(METALS)} {rng.choice(TROPHY_NOUNS[split])}"
    return values


def question(ask: tuple, values: dict[str, str], split: str, rng: random.Random) -> tuple[str, bool]:
    """The question text, and whether its phrasing is one that training never sees."""
    kind, slot, q, rel = ask if len(ask) == 4 else (*ask, ask[2])
    heldout = split != "train" and rng.random() < 0.5
    template = rng.choice(QUESTION_TEMPLATES[kind][heldout])
    return template.format(q=q.format(**values), rel=rel.format(**values), noun=NOUNS.get(slot, "")), heldout


def make_article(split: str, index: int, rng: random.Random, titles: set[str]) -> list[dict]:
    """One article and its questions; each record carries "_heldout" (phrasing unseen in training)."""
    values = draw_values(split, rng, titles)
    facts = ["founding"] + rng.sample(
        [f for f in FACTS if f != "founding"], n_facts := rng.randint(*FACTS_PER)
    )
    vague = rng.choice(facts[1:]) if index % 2 else None  # every other article: one unanswerable question
    body = [(FACTS[f]["vague"] if f == vague else rng.choice(FACTS[f]["say"]), f) for f in facts]
    body += [(t, None) for t in rng.sample(FILLERS, rng.randint(0, SENTENCES - n_facts))]
    rng.shuffle(body)
    # Build the context piece by piece so the position of every slot is known, not searched for.
    context, spans = "", {}
    for template, fact in [(LEAD, None)] + body:
        context += " " if context else ""
        for i, part in enumerate(re.split(r"\{(\w+)\}", template)):
            if i % 2:
                spans[(fact, part)] = (len(context), len(context) + len(values[part]))
                part = values[part]
            context += part
    asks = [(f, a) for f in facts if f != vague for a in FACTS[f]["ask"]]
    chosen = rng.sample(asks, QUESTIONS_PER_ARTICLE - (vague is not None))
    if vague:
        chosen.append((vague, next(a for a in FACTS[vague]["ask"] if a[0] == FACTS[vague]["unstated"])))
    rng.shuffle(chosen)
    records = []
    for n, (fact, ask) in enumerate(chosen):
        text, heldout = question(ask, values, split, rng)
        answers: dict[str, list] = {"text": [], "answer_start": []}
        if fact != vague:
            start, end = spans[(fact, ask[1])]
            answers = {"text": [context[start:end]], "answer_start": [start]}
            before = next((w for w in WIDER if context[:start].endswith(w)), None)
            wide = (start - len(before), end) if before else None
            if ask[0] == "count":  # "340 members"
                assert context.startswith(" " + NOUNS[ask[1]], end)
                wide = start, end + 1 + len(NOUNS[ask[1]])
            if wide and split != "train":  # training has one answer per question, as in SQuAD
                answers["text"].append(context[wide[0] : wide[1]])
                answers["answer_start"].append(wide[0])
        record = {
            "id": f"{split}-{index:03d}-{n}",
            "title": values["org"],
            "context": context,
            "question": text,
        }
        records.append(record | {"answers": answers, "is_impossible": fact == vague, "_heldout": heldout})
    return records


def check(records: list[dict]) -> None:
    """Every answer is where answer_start says, 1-5 words; unanswerable means no answers; plain ASCII."""
    for r in records:
        for text, start in zip(r["answers"]["text"], r["answers"]["answer_start"]):
            assert r["context"][start : start + len(text)] == text, r["id"]
            assert 1 <= len(text.split()) <= 5, r["id"]
        assert r["is_impossible"] == (not r["answers"]["text"]), r["id"]
        assert r["context"].isascii() and r["question"].isascii(), r["id"]


def main() -> None:
    (HERE / "qa").mkdir(exist_ok=True)
    ids: set[str] = set()
    late = answerable = 0
    for split, n in ARTICLES.items():
        rng, titles = random.Random(SEEDS[split]), set()
        records = [r for i in range(n) for r in make_article(split, i, rng, titles)]
        check(records)
        ids |= {r["id"] for r in records}
        heldout = sum(r.pop("_heldout") for r in records)
        assert split == "train" or heldout >= len(records) / 3, "too few phrasings unseen in training"
        for r in records:
            if r["answers"]["text"]:
                answerable += 1
                late += len(r["context"][: r["answers"]["answer_start"][0]].split()) >= LATE_WORDS
        impossible = sum(r["is_impossible"] for r in records)
        print(f"{split}: {len(records)} questions, {impossible} unanswerable, {heldout} held-out phrasings")
        lines = [json.dumps(r, ensure_ascii=True) for r in records]
        (HERE / "qa" / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert len(ids) == sum(ARTICLES.values()) * QUESTIONS_PER_ARTICLE, "ids must be unique"
    print(f"answers beyond the first {LATE_WORDS} words: {late}/{answerable} = {late / answerable:.0%}")
    assert late / answerable >= 0.25, "too few answers need a later window"


if __name__ == "__main__":
    main()
