"""Write the bundled toy abstractive summarization set: short made-up news reports and one-line summaries.

Writes data/toy/summarization/{train,validation,test}.jsonl, one report per line:
    {"id", "text", "summary"}
Five kinds of report (a football match, a company's yearly result, a storm or flood, a council vote, a new
chief at a firm), each 4-7 sentences. The facts a summary needs (who, what, the outcome, a place or a
number) are spread over two to four sentences in any order, between sentences that matter to no summary,
some of which name other teams, firms or towns with numbers of their own ("Elsewhere, the Quarry Larks beat
the Mill Rovers 2-0 in Coldmouth."). Two reports in three open with a scene-setting sentence that holds
none of the facts, so the lead sentence is a poor summary. The summary is one formulaic sentence that
recombines the facts and often rewords them ("420 homes were left without power" becomes "cut power to 420
homes"): "The Harbour Foxes beat the Mill Rovers 3-1 in Tarnby." A model has to learn which sentences carry
the facts, pick the right names out of the report and put them in order; copying a sentence does not do.
Summaries open with "The", "A" or "At" rather than a name, so a byte-level BPE (no prefix space) writes a
name with the same pieces as the report does mid-sentence. The id names the kind: "test-0003-match".

On the test split, ROUGE-L F1 of the first sentence is about 13, of the first two about 22, and of the
right kind's summary filled with random names and numbers about 47. A 0.85M-parameter T5 trained from
scratch (2+2 layers, d_model 128, a 1,500-piece byte BPE, batch 16, lr 2e-3) reaches about 75 after 500
steps without dropout (about 60 with dropout 0.1, 70 after 1,000 steps): the score rises past 47 only as
far as the model reads the report.

All splits draw from the same names and words, but no report appears in two splits, and every report has a
key pair of facts (the two teams, the firm and its town, the weather and the town, the town and its plan,
the firm and its new chief): the pairs of one fifth of the possible ones are held out of training, and half
of the validation and test reports use such pairs, so a model cannot answer those from memory. Deterministic
(fixed seeds); the committed files are the data. Run from anywhere:
    python data/toy/make_summarization.py
"""

from __future__ import annotations

import json
import random
import re
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEEDS = {"train": 21, "validation": 22, "test": 23}
SIZES = {"train": 1500, "validation": 150, "test": 150}
HELDOUT_PERCENT = 20  # of the key pairs, by a fixed hash: never in training
HELDOUT_SHARE = 0.5  # of the validation and test reports, those whose key pair is held out
SCENE_SETTING = 2 / 3  # of the reports open with a sentence that holds none of the facts

# -- names and words, shared by all splits ---------------------------------------------------------------
TOWNS = (
    "Tarnby Elsford Brackwick Coldmouth Dunley Fernstead Glenbury Holton Kirkwell Langmoor Morbridge "
    "Penhallow Radley Welby Astbury Brynford Corvedale Quenby Yewstead Ulverton Hartwick Islemouth Oakley "
    "Sedgeford Thornbury Valeby Wynstead Ashcombe Birchley Calder Drayford Eastwick Fallowby Greyhaven "
    "Hollins Ingleby"
).split()
FIRST = (
    "Maren Tobias Ilse Jonah Freya Anselm Greta Rowan Leona Caspar Edith Milo Sabine Osric Dalia Fenna Ivo "
    "Lotte Bram Selma Corin Hedda Lucan Oriel Tamsin Vidar Anouk Bastian Cosima Dorian"
).split()
LAST = (
    "Holt Varga Brennan Okafor Lindgren Castell Marsh Thorne Abbing Kessler Dunmore Pryce Ashby Quill "
    "Ferrand Halloran Moreau Strand Whitlock Benning Carrow Fenwick Haldane Ingram Jessop Larkin Montague "
    "Norcott Pendry Tennant"
).split()
TEAMS = [
    "Harbour Foxes", "Mill Rovers", "Quarry Larks", "Castle Rangers", "Forge Ravens", "Valley Hawks",
    "Bridge Badgers", "Station Wanderers", "Abbey Swifts", "Meadow Rovers", "Dockside Foxes",
    "Market Owls", "Hill Rangers", "Riverside Otters", "Chapel Robins", "Moor Hawks", "Priory Swifts",
    "Canal Wanderers", "Brewery Larks", "Orchard Wolves", "Lighthouse Rovers", "Granary Herons",
    "Mine Hawks", "Common Rangers", "Park Wanderers", "Kiln Foxes", "Tannery Stags", "Wharf Swifts",
    "Heath Larks", "Ferry Gulls", "Beacon Rangers", "Quay Otters",
]  # fmt: skip
COMPANIES = [
    "Brightwater Foods", "Kestrel Motors", "Greyfield Mills", "Redmoor Glass", "Stillbrook Paper",
    "Larkspur Tools", "Blackthorn Brewing", "Windmere Textiles", "Copperleaf Electric", "Northgate Steel",
    "Silverdale Dairies", "Oldbridge Pottery", "Fairhaven Boats", "Goldcrest Printing", "Ravenhill Timber",
    "Mossbank Chemicals", "Elmstead Furniture", "Harefield Cables", "Seabright Shipping", "Thistledown Soap",
    "Marigold Bakeries", "Hollowell Paints", "Starling Cycles", "Kingsmoor Bricks", "Amberlea Farms",
    "Duskwood Leather", "Frostholm Pumps", "Mistral Radio",
]  # fmt: skip
PRODUCTS = [  # what a firm makes, and the word for its maker: "the Tarnby bicycle maker"
    ("bicycles", "bicycle"), ("paint", "paint"), ("biscuits", "biscuit"), ("boats", "boat"),
    ("glass bottles", "bottle"), ("shoes", "shoe"), ("paper", "paper"), ("soap", "soap"),
    ("furniture", "furniture"), ("radios", "radio"), ("bricks", "brick"), ("cheese", "cheese"),
    ("rope", "rope"), ("pumps", "pump"), ("tiles", "tile"), ("toys", "toy"),
]  # fmt: skip
ROLES = ["chief executive", "finance director", "chair", "head of sales", "managing director"]
PLANS = [
    "build a new bridge over the river", "close the old library", "turn the market square into a car park",
    "open a new swimming pool", "sell the town hall", "build two hundred new homes", "close the night bus",
    "plant a thousand trees", "build a cycle path to the station", "raise parking charges",
    "open a museum in the old mill", "move the weekly market", "ban cars from the high street",
    "build a new primary school", "close the public toilets", "light the footpaths along the canal",
    "pay for a new fire station", "turn the old quarry into a park",
]  # fmt: skip
# Weather: what the report calls it, how it states the damage, and how a summary says it ({n} a number).
WEATHER = {
    "storm": ("A storm", "{n} homes were left without power", "cut power to {n} homes"),
    "flood": ("Flooding", "{n} people had to leave their homes", "forced {n} people from their homes"),
    "snow": ("Heavy snow", "{n} schools had to stay closed", "closed {n} schools"),
    "gale": ("A gale", "{n} trees were blown down", "brought down {n} trees"),
    "hail": ("A hailstorm", "{n} cars were damaged by hailstones", "damaged {n} cars"),
    "heat": ("A heatwave", "{n} people needed hospital treatment", "sent {n} people to hospital"),
}
WEATHER_NOUN = {"storm": "storm", "flood": "flood", "snow": "snowfall", "gale": "gale", "hail": "hailstorm",
                "heat": "heatwave"}  # fmt: skip
REWORDED = {"Weather", "effect", "maker"}  # summary slots that a report words differently
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()

# -- report kinds: facts (each a list of phrasings), extras (sentences no summary needs), scene-setting leads
# Every fact is always stated, once; the extras and their number vary. "{x}" slots come from the values.
KINDS = {
    "match": {
        "facts": {
            "meet": ["The {home} hosted the {away} at {ground} on {day}.",
                     "The {away} made the trip to face the {home} at {ground}.",
                     "{ground} was full as the {home} took on the {away}.",
                     "The {home} and the {away} met at {ground} on {day} afternoon."],
            "town": ["{ground}, the home of the {home}, lies on the edge of {town}.",
                     "Supporters came from all over {town} to watch the game.",
                     "The match was the first league game in {town} this season.",
                     "The game was played in {town} in front of a noisy home crowd."],
            "result": ["The {winner} won the game {ws}-{ls}.",
                       "{scorer} scored twice as the {winner} won {ws}-{ls}.",
                       "It finished {ws}-{ls} to the {winner}.",
                       "The {winner} took all three points with a {ws}-{ls} win."],
        },
        "extras": ["Elsewhere, the {other1} beat the {other2} {x1}-{x2} in {town2}.",
                   "A crowd of {crowd} watched the match.",
                   "{coach}, who manages the {loser}, said the team had played poorly.",
                   "The {winner} play the {other1} next {day2}.",
                   "The {other2} lost {x1}-{x2} to the {other1} in {town2} on the same day.",
                   "Heavy rain fell for most of the second half.",
                   "The referee, {person}, sent off one player from each side."],
        "leads": ["It was a cold and windy {day} afternoon.",
                  "Supporters queued for an hour before the gates opened.",
                  "The league season is now in its final month.",
                  "Ticket prices went up again this year."],
        "summary": "The {winner} beat the {loser} {ws}-{ls} in {town}.",
    },
    "company": {
        "facts": {
            "result": ["{company} said on {day} that it made a {result} of {amount} million crowns.",
                       "{company} reported a {result} of {amount} million crowns on {day}.",
                       "The firm made a {result} of {amount} million crowns, {company} said.",
                       "A {result} of {amount} million crowns was announced by {company} on {day}."],
            "year": ["The figures cover the whole of {year}.",
                     "{company} published its accounts for {year} on {day}.",
                     "The results are for the twelve months to December {year}."],
            "maker": ["The firm makes {product} at a factory in {town} and employs {staff} people.",
                      "Based in {town}, {company} has made {product} for {age} years.",
                      "{company} has made {product} in {town} since its founding."],
        },
        "extras": ["Rival {company2} reported a {result2} of {amount2} million crowns in {month}.",
                   "Shares in {company} rose {pct} per cent in early trading.",
                   "Chief executive {person} said the year had been hard for the whole trade.",
                   "{company2}, which also makes {product}, will report its results in {month2}.",
                   "The firm plans to open a second factory in {town2}."],
        "leads": ["Trading was quiet across the market on {day} morning.",
                  "Investors had waited weeks for the latest figures.",
                  "It has been a difficult year for many makers of {product}.",
                  "Many firms in the region have struggled with high energy costs."],
        "summary": "The {town} {maker} maker {company} made a {result} of {amount} million crowns in {year}.",
    },
    "weather": {
        "facts": {
            "arrive": ["The {noun} arrived early on {day}, after days of warnings.",
                       "Forecasters had warned that a {noun} would arrive on {day}.",
                       "The {noun} struck on {day}, a day earlier than expected.",
                       "On {day} the {noun} came in from the west."],
            "where": ["{town} was the worst hit of the towns in the valley.",
                      "Emergency crews were busy across {town} all day.",
                      "The damage was worst in {town}, where the river runs close to the houses.",
                      "Residents of {town} said they had never seen anything like it."],
            "damage": ["By the evening, {damage}, officials said.",
                       "Officials said that {damage}.",
                       "In all, {damage}, according to the council."],
        },
        "extras": ["Nearby {town2} escaped with little damage.",
                   "The last {noun2} to hit {town2}, in {year}, {effect2}.",
                   "Police asked drivers to stay at home.",
                   "The weather is expected to improve by the weekend.",
                   "{person}, who runs a shop in {town2}, said business had been slow."],
        "leads": ["Residents of the valley are used to hard weather.",
                  "It has been one of the wettest years on record.",
                  "Forecasters had warned of bad weather for most of the week.",
                  "The roads were quiet in the early hours."],
        "summary": "{Weather} {effect} in {town} on {day}.",
    },
    "council": {
        "facts": {
            "plan": ["Councillors in {town} met on {day} evening to discuss plans to {plan}.",
                     "Plans to {plan} came before {town} council on {day}.",
                     "{town} council spent most of {day} evening on plans to {plan}."],
            "decision": ["In the end the plans were {decision}.",
                         "Councillors {decision} the plans after a long debate.",
                         "After three hours of argument the plans were {decision}."],
            "vote": ["The vote was {big} to {small}.",
                     "Of the councillors present, {big} voted {with} and {small} {against}.",
                     "The plans were put to a vote, which ended {big} to {small}."],
        },
        "extras": ["{town2} council turned down a plan to {plan2} last year.",
                   "{person}, who leads the council, said the decision was a fair one.",
                   "About {crowd} residents watched from the public gallery.",
                   "A plan to {plan3} will be discussed in {month}.",
                   "The meeting ran until almost midnight."],
        "leads": ["The council chamber was packed on {day} evening.",
                  "Few local questions have caused as much argument in recent years.",
                  "Local elections are due in the spring.",
                  "Residents had written hundreds of letters to the council."],
        "summary": "The council in {town} {decision} plans to {plan} by {big} votes to {small}.",
    },
    "appoint": {
        "facts": {
            "name": ["{company} said on {day} that {person} would become its {role}.",
                     "{person} will take over as {role} of {company} in {month}.",
                     "The new {role} of {company} will be {person}, the firm said on {day}."],
            "old": ["{old} is stepping down after {years} years in the job.",
                    "{old} announced in {month2} a plan to retire after {years} years as {role}.",
                    "The post became free when {old} decided to retire."],
        },
        "extras": ["{person} joins from {company2}, having run its {dept} department.",
                   "{company2} has not yet named a new head of its {dept} department.",
                   "Shares in {company} were unchanged after the news.",
                   "{company} makes {product} and employs {staff} people.",
                   "{company2} named a new chair of its own in {month2}."],
        "leads": ["The board met for most of the day on {day}.",
                  "The search for a new leader had lasted several months.",
                  "Changes at the top of the firm had been expected for some time.",
                  "Staff were told the news at a meeting in the morning."],
        "summary": "At {company}, {person} replaces {old} as {role}.",
    },
}  # fmt: skip
DEPARTMENTS = ["sales", "finance", "design", "export", "research", "shipping"]


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def draw_values(kind: str, rng: random.Random) -> tuple[dict[str, str], tuple[str, str]]:
    """The slots one report of this kind can mention, and its key pair of facts."""
    day, day2 = rng.sample(DAYS, 2)
    month, month2 = rng.sample(MONTHS, 2)
    town, town2 = rng.sample(TOWNS, 2)
    v = {"day": day, "day2": day2, "month": month, "month2": month2, "town": town, "town2": town2}
    v |= {"person": person(rng), "crowd": str(rng.randint(120, 990))}
    if kind == "match":
        home, away, other1, other2 = rng.sample(TEAMS, 4)
        ws = rng.randint(1, 5)
        ls = rng.randint(0, ws - 1)
        winner, loser = (home, away) if rng.random() < 0.5 else (away, home)
        x1 = rng.randint(1, 4)
        v |= {"home": home, "away": away, "winner": winner, "loser": loser, "ws": str(ws), "ls": str(ls)}
        v |= {"other1": other1, "other2": other2, "x1": str(x1), "x2": str(rng.randint(0, x1 - 1))}
        v |= {"ground": f"{rng.choice(LAST)} Park", "scorer": person(rng), "coach": person(rng)}
        return v, (min(winner, loser), max(winner, loser))
    if kind == "company":
        company, company2 = rng.sample(COMPANIES, 2)
        product, maker = rng.choice(PRODUCTS)
        v |= {"company": company, "company2": company2, "product": product, "maker": maker}
        v |= {"result": rng.choice(["profit", "loss"]), "result2": rng.choice(["profit", "loss"])}
        v |= {"amount": str(rng.randint(2, 95)), "amount2": str(rng.randint(2, 95))}
        v |= {"year": str(rng.randint(2001, 2023)), "staff": str(rng.randint(40, 900))}
        v |= {"age": str(rng.randint(12, 80)), "pct": str(rng.randint(2, 15))}
        return v, (company, town)
    if kind == "weather":
        w, w2 = rng.sample(sorted(WEATHER), 2)
        n, n2 = rng.randint(20, 990), rng.randint(20, 990)
        v |= {"Weather": WEATHER[w][0], "noun": WEATHER_NOUN[w], "noun2": WEATHER_NOUN[w2]}
        v |= {"damage": WEATHER[w][1].format(n=n), "effect": WEATHER[w][2].format(n=n)}
        v |= {"effect2": WEATHER[w2][2].format(n=n2), "year": str(rng.randint(1990, 2022))}
        return v, (w, town)
    if kind == "council":
        plan, plan2, plan3 = rng.sample(PLANS, 3)
        big = rng.randint(5, 14)
        small = rng.randint(1, big - 1)
        approved = rng.random() < 0.5
        v |= {"plan": plan, "plan2": plan2, "plan3": plan3, "big": str(big), "small": str(small)}
        v |= {"decision": "approved" if approved else "rejected"}
        v |= {"with": "in favour" if approved else "against"}
        v |= {"against": "against" if approved else "in favour"}
        return v, (town, plan)
    if kind == "appoint":
        company, company2 = rng.sample(COMPANIES, 2)
        new = old = person(rng)
        while old.split()[1] == new.split()[1]:
            old = person(rng)
        v |= {"company": company, "company2": company2, "person": new, "old": old, "role": rng.choice(ROLES)}
        v |= {"years": str(rng.randint(3, 25)), "dept": rng.choice(DEPARTMENTS)}
        v |= {"product": rng.choice(PRODUCTS)[0], "staff": str(rng.randint(40, 900))}
        return v, (company, new)
    raise ValueError(kind)


def heldout(kind: str, key: tuple[str, str]) -> bool:
    """Whether training never sees this key pair: a fixed hash, the same in every process."""
    return zlib.crc32("|".join((kind, *key)).encode()) % 100 < HELDOUT_PERCENT


def make_report(kind: str, rng: random.Random) -> tuple[dict, bool]:
    """One report: the facts in any order among 1-3 extras, after a scene-setting lead two times in three."""
    spec = KINDS[kind]
    values, key = draw_values(kind, rng)
    facts = [rng.choice(phrasings) for phrasings in spec["facts"].values()]
    lead = [rng.choice(spec["leads"])] if rng.random() < SCENE_SETTING else []
    fewest, most = max(1, 4 - len(facts) - len(lead)), min(3, 7 - len(facts) - len(lead))
    extras = rng.sample(spec["extras"], rng.randint(fewest, most))
    body = facts + extras
    rng.shuffle(body)
    text = " ".join(s.format(**values) for s in lead + body)
    for slot in re.findall(r"\{(\w+)\}", spec["summary"]):  # the summary's facts are all in the report
        if slot not in REWORDED:
            assert values[slot] in text, (slot, text)
    return {"text": text, "summary": spec["summary"].format(**values)}, heldout(kind, key)


def check(records: list[dict]) -> None:
    """4-7 sentences, plain ASCII, no unfilled slot; the summary is not one of the report's sentences."""
    from recipebox.data.text import split_sentences

    for r in records:
        sentences = split_sentences(r["text"])
        assert 4 <= len(sentences) <= 7, r["id"]
        assert r["summary"] not in sentences, r["id"]
        for text in (r["text"], r["summary"]):
            assert text.isascii() and "{" not in text and "}" not in text, r["id"]


def main() -> None:
    (HERE / "summarization").mkdir(exist_ok=True)
    seen: set[str] = set()  # report texts so far: no report appears in two splits
    kinds = sorted(KINDS)
    for split, n in SIZES.items():
        rng = random.Random(SEEDS[split])
        records: list[dict] = []
        n_heldout = 0
        while len(records) < n:
            kind = kinds[len(records) % len(kinds)]  # the kinds in turn: equal shares
            want_heldout = split != "train" and rng.random() < HELDOUT_SHARE
            record, is_heldout = make_report(kind, rng)
            while is_heldout != want_heldout or record["text"] in seen:
                record, is_heldout = make_report(kind, rng)
            seen.add(record["text"])
            n_heldout += is_heldout
            records.append({"id": f"{split}-{len(records):04d}-{kind}"} | record)
        check(records)
        print(f"{split}: {len(records)} reports, {n_heldout} with key pairs held out of training")
        lines = [json.dumps(r, ensure_ascii=True) for r in records]
        (HERE / "summarization" / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
