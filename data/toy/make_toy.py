"""Write the bundled toy sets: a pretraining corpus, news topics, toxic comments, review sentiment, tagged
sentences.

Deterministic (fixed seeds); the committed files are the data. The test split of every set uses names and
phrasings that training never saw, so a model has to generalise, not remember. Run from anywhere:
    python data/toy/make_toy.py
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent

# -- news headlines: 4 topics, CSV with columns title,topic ----------------------------------------------
NEWS = {
    "world": {
        "train": [
            "{country} and {country2} sign a border treaty after years of talks",
            "Prime minister of {country} calls early election",
            "Protesters fill the streets of {city} demanding reform",
            "{country} sends aid after earthquake hits {city}",
            "United Nations envoy arrives in {city} for ceasefire talks",
            "Parliament in {country} votes on new constitution",
            "Refugees cross into {country} as fighting spreads",
            "{country} recalls its ambassador from {country2}",
            "Foreign ministers meet in {city} to discuss sanctions",
            "Opposition leader arrested in {city}",
        ],
        "test": [
            "Diplomats from {country} walk out of summit in {city}",
            "Troops withdraw from disputed region near {city}",
            "President of {country} survives vote of no confidence",
            "Coalition government collapses in {country}",
            "Peace deal between {country} and {country2} signed in {city}",
        ],
        "train_fill": {
            "country": ["France", "Kenya", "Peru", "Norway", "Vietnam", "Egypt", "Chile", "Poland"],
            "country2": ["Spain", "Ghana", "Bolivia", "Sweden", "Laos", "Sudan", "Argentina", "Ukraine"],
            "city": ["Paris", "Nairobi", "Lima", "Oslo", "Hanoi", "Cairo", "Santiago", "Warsaw"],
        },
        "test_fill": {
            "country": ["Japan", "Morocco", "Canada", "Turkey", "Indonesia"],
            "country2": ["Korea", "Algeria", "Mexico", "Greece", "Malaysia"],
            "city": ["Tokyo", "Rabat", "Ottawa", "Ankara", "Jakarta"],
        },
    },
    "sports": {
        "train": [
            "{team} beat {team2} 3-1 to reach the cup final",
            "Striker scores twice as {team} stay top of the league",
            "{athlete} wins gold in the 200 metres",
            "Coach of {team} sacked after fifth straight defeat",
            "{athlete} retires from tennis after knee injury",
            "{team} sign young midfielder on a five-year contract",
            "Late penalty gives {team} a draw against {team2}",
            "{athlete} breaks the world record in the marathon",
            "Rain delays the final day of the cricket test",
            "{team} fans celebrate first title in twenty years",
        ],
        "test": [
            "Goalkeeper saves three penalties as {team} knock out {team2}",
            "{athlete} claims the championship with a round to spare",
            "Injury forces {athlete} out of the season opener",
            "{team} relegated after losing to {team2} on the final day",
            "Rookie quarterback leads {team} to overtime victory",
        ],
        "train_fill": {
            "team": ["Rovers", "United", "City", "Athletic", "Wanderers", "Rangers", "Albion"],
            "team2": ["Celtic", "Dynamo", "Sporting", "Olympic", "Villa", "Town", "Forest"],
            "athlete": ["Maria Lopez", "Tom Becker", "Aiko Sato", "Liam Walsh", "Nadia Haddad"],
        },
        "test_fill": {
            "team": ["Tigers", "Falcons", "Hornets", "Mariners"],
            "team2": ["Eagles", "Panthers", "Wolves", "Sharks"],
            "athlete": ["Grace Okafor", "Pavel Novak", "Chen Wei", "Lucas Moreau"],
        },
    },
    "business": {
        "train": [
            "{company} shares jump after strong quarterly earnings",
            "{company} to cut {number} jobs as sales slow",
            "Central bank raises interest rates to fight inflation in {market}",
            "{company} agrees to buy {company2} for ${number} million",
            "{commodity} prices fall as demand weakens",
            "{company} profit beats analyst forecasts",
            "Stock markets in {market} close lower on recession fears",
            "{company} chief executive steps down after losses",
            "{commodity} exports rise for the third month in a row",
            "{company} files for bankruptcy protection",
        ],
        "test": [
            "Investors dump bonds as {company} misses revenue target",
            "{company} and {company2} announce merger talks",
            "Unemployment in {market} falls to lowest level in a decade",
            "{company} dividend doubled after record year",
            "{commodity} futures slide as trade deficit widens",
            "Shareholders reject pay deal for {company} bosses",
        ],
        "train_fill": {
            "company": ["Acme Corp", "Globex", "Initech", "Umbrella Foods", "Stark Motors", "Wayne Holdings"],
            "company2": ["Hooli", "Vandelay Imports", "Soylent", "Massive Dynamic", "Cyberdyne", "Tyrell"],
            "number": ["200", "450", "1,200", "3,000", "800"],
            "market": ["Europe", "Asia", "London", "Frankfurt"],
            "commodity": ["Oil", "Copper", "Wheat", "Coffee", "Steel"],
        },
        "test_fill": {
            "company": ["Northwind Traders", "Contoso", "Fabrikam", "Blue Harbor Bank", "Litware"],
            "company2": ["Proseware", "Woodgrove", "Tailspin Airlines", "Adatum"],
            "number": ["150", "2,500", "600"],
            "market": ["Brazil", "India", "Zurich"],
            "commodity": ["Gold", "Cotton", "Natural gas", "Sugar"],
        },
    },
    "sci_tech": {
        "train": [
            "{company} unveils new {device} with faster chip",
            "Scientists discover water ice on a distant {body}",
            "{company} releases update to fix security flaw in its {device}",
            "New battery design could double {device} battery life",
            "Researchers at {company} train robot to sort recycling",
            "Space agency launches probe to study a {body}",
            "{company} software outage hits millions of {device} users",
            "Study finds new antibiotic in soil bacteria",
            "{company} opens quantum computing lab",
            "Hackers steal data from {company} cloud servers",
        ],
        "test": [
            "Astronomers detect strange signal from a young {body}",
            "{company} launches open source programming language",
            "Engineers build faster {device} processor using light instead of electrons",
            "Genome study reveals origin of the domestic cat",
            "{company} patches bug in its web browser",
            "Telescope images show dust storms on a {body}",
        ],
        "train_fill": {
            "company": ["Pixelsoft", "Quantix", "Nebula Labs", "Bytewise", "Orbital Systems", "Coretex"],
            "device": ["smartphone", "laptop", "tablet", "smartwatch", "router"],
            "body": ["moon", "comet", "asteroid", "planet"],
        },
        "test_fill": {
            "company": ["Lumina Computing", "Vertex AI", "Helix Robotics", "Skyward Networks"],
            "device": ["headset", "camera", "server"],
            "body": ["galaxy", "star", "dwarf planet"],
        },
    },
}


def fill(template: str, slots: dict[str, list[str]], rng: random.Random) -> str:
    out = template
    for name, values in slots.items():
        out = out.replace("{" + name + "}", rng.choice(values))
    return out


def make_news(rng: random.Random) -> dict[str, list[dict]]:
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    sizes = {"train": 100, "validation": 20, "test": 30}
    for topic, spec in NEWS.items():
        seen: set[str] = set()  # shared by the splits, so no headline is both trained on and evaluated
        for split, n in sizes.items():
            pool = "test" if split == "test" else "train"
            rows = []
            for _ in range(50 * n):
                if len(rows) >= n:
                    break
                title = fill(rng.choice(spec[pool]), spec[pool + "_fill"], rng)
                if title not in seen:
                    seen.add(title)
                    rows.append({"title": title, "topic": topic})
            splits[split] += rows
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


# -- comments: 6 toxicity labels (multi-label), CSV with comment_text + one 0/1 column per label ---------
TOXIC_LABELS = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
# Each kind of comment: the labels it carries, templates for training and for the held-out splits, and
# slot words for each split. Validation and test share the held-out templates but not their words, so both
# measure phrasings that training never saw, and thresholds fitted on validation carry over to test.
KINDS = {
    "rude": {  # rude about the content: toxic, and none of the specific kinds
        "labels": ["toxic"],
        "train": [
            "This is a {bad} {thing}.",
            "What a {bad} {thing}.",
            "Your {thing} is {bad}.",
            "This {thing} is {bad} garbage.",
            "Honestly the most {bad} {thing} on the page.",
        ],
        "heldout": [
            "Such a {bad} {thing} to make.",
            "Whoever wrote this {thing} made it {bad}.",
            "That {thing} is plain {bad}.",
        ],
        "words": {
            "bad": {
                "train": ["stupid", "pathetic", "useless", "dumb", "ridiculous", "lousy"],
                "validation": ["lame", "silly", "absurd"],
                "test": ["idiotic", "laughable", "pointless"],
            },
            "thing": {
                "train": ["edit", "argument", "comment", "change", "section"],
                "validation": ["revision", "summary"],
                "test": ["paragraph", "proposal", "rewrite"],
            },
        },
    },
    "insult": {  # name-calling aimed at the person
        "labels": ["toxic", "insult"],
        "train": [
            "You are a total {noun}.",
            "You {adj} {noun}.",
            "Only a {noun} would write this.",
            "Nobody cares what a {noun} like you thinks.",
            "Go away, you {adj} {noun}.",
        ],
        "heldout": [
            "Shut up, you {noun}.",
            "You are the most {adj} {noun} here.",
            "What a {adj} {noun} you are.",
        ],
        "words": {
            "noun": {
                "train": ["idiot", "moron", "fool", "loser", "halfwit", "buffoon", "troll", "jerk"],
                "validation": ["nitwit", "dunce", "twit"],
                "test": ["imbecile", "dimwit", "clown", "cretin"],
            },
            "adj": {
                "train": ["stupid", "clueless", "ignorant", "pathetic", "little"],
                "validation": ["dense", "gormless"],
                "test": ["brainless", "witless", "dim"],
            },
        },
    },
    "obscene": {  # swearing, aimed at nobody
        "labels": ["toxic", "obscene"],
        "train": [
            "{curse}, this is {swear}.",
            "{curse}, what {swear}.",
            "{curse}.",
            "What {swear}, {curse}.",
        ],
        "heldout": ["This is total {swear}, {curse}.", "{curse}, look at this {swear}."],
        "words": {
            "curse": {
                "train": ["damn", "bloody hell", "holy crap", "what the hell", "damn it"],
                "validation": ["bollocks", "sod it"],
                "test": ["goddamn", "freaking hell", "crap on a stick"],
            },
            "swear": {
                "train": ["crap", "bloody nonsense", "a damn mess", "a load of crap", "hellish crap"],
                "validation": ["bollocks", "a sodding mess"],
                "test": ["bullcrap", "crappy garbage", "freaking crap"],
            },
        },
    },
    "threat": {  # violence promised to the reader
        "labels": ["toxic", "threat"],
        "train": [
            "I will {act}.",
            "Keep this up and I will {act}.",
            "I am going to {act}.",
            "Watch your back, I will {act}.",
        ],
        "heldout": ["You will regret this when I {act}.", "Mark my words, one day I will {act}."],
        "words": {
            "act": {
                "train": [
                    "find you and make you pay",
                    "hurt you",
                    "break your legs",
                    "come to your house",
                    "make you bleed",
                    "kill you",
                ],
                "validation": ["smash your face in", "burn your car"],
                "test": ["track you down and make you suffer", "beat you up", "hunt you down", "punch you"],
            },
        },
    },
    "identity_hate": {  # hatred of a whole group of people
        "labels": ["toxic", "identity_hate"],
        "train": [
            "All {group} are {hate}.",
            "I hate every single one of the {group}, they are {hate}.",
            "The {group} should be banned, they are {hate}.",
            "People like the {group} are {hate}.",
        ],
        "heldout": ["Get rid of all the {group}, they are {hate}.", "Those {group} are nothing but {hate}."],
        "words": {
            "group": {
                "train": ["cyclists", "accountants", "plumbers", "golfers", "gardeners", "farmers"],
                "validation": ["dentists", "joggers"],
                "test": ["drummers", "vegans", "surfers", "poets"],
            },
            "hate": {
                "train": ["vermin", "subhuman", "filth", "a disease on society", "worthless animals"],
                "validation": ["cockroaches", "a blight"],
                "test": ["parasites", "a plague", "rats"],
            },
        },
    },
    "severe": {  # an extreme personal attack: also an insult
        "labels": ["toxic", "severe_toxic", "insult"],
        "train": [
            "You are {vile}, I despise you utterly.",
            "You are {vile}.",
            "I utterly despise you, you are {vile}.",
        ],
        "heldout": ["I loathe you completely, you are {vile}.", "Everyone hates you, you are {vile}."],
        "words": {
            "vile": {
                "train": [
                    "the worst scum alive",
                    "a vile rotten piece of filth",
                    "utterly disgusting trash",
                    "a revolting waste of air",
                    "a sick repulsive maggot",
                ],
                "validation": ["a putrid sack of garbage", "the foulest creature on earth"],
                "test": [
                    "a repulsive piece of garbage",
                    "the most disgusting rotten scum",
                    "a loathsome festering pig",
                ],
            },
        },
    },
}
NEUTRAL = {
    "train": [
        "I read the article about the new bridge and found it useful.",
        "Thanks for fixing the citation in the second paragraph.",
        "Could someone add a source for the population figure?",
        "The photo caption has the wrong year, it should be 1998.",
        "I moved the history section above the geography section.",
        "Good point, I will look for a better reference tomorrow.",
        "This page needs more detail on the early career.",
        "The infobox template was updated last week.",
        "Please discuss large changes on the talk page first.",
        "I agree with the merge proposal.",
    ],
    "validation": [
        "The second table could use a caption.",
        "I added two references from the city archive.",
        "Can we split the long list into a separate page?",
        "The spelling of the river name differs between sources.",
    ],
    "test": [
        "Nice work on the timeline, it reads much better now.",
        "Is there a map we could use for the location section?",
        "The dates in the table do not match the text.",
        "I have reverted the edit because the link was broken.",
        "Welcome to the project, feel free to ask questions here.",
    ],
}


def toxic_comment(kind: str, split: str, rng: random.Random) -> str:
    spec = KINDS[kind]
    text = rng.choice(spec["train" if split == "train" else "heldout"])
    for slot, words in spec["words"].items():
        text = text.replace("{" + slot + "}", rng.choice(words[split]))
    text = re.sub(r"\b([Aa]) ([aeiouAEIOU])", r"\1n \2", text)  # a idiot -> an idiot
    return text[0].upper() + text[1:]


def make_toxic(rng: random.Random) -> dict[str, list[dict]]:
    """Half the comments are toxic, spread evenly over the kinds; one in five toxic ones mixes two kinds."""
    sizes = {"train": 600, "validation": 200, "test": 200}
    mixable = ["insult", "obscene", "threat", "identity_hate"]
    splits: dict[str, list[dict]] = {}
    for split, n in sizes.items():
        rows = []
        for _ in range(n):
            labels = dict.fromkeys(TOXIC_LABELS, 0)
            parts = [rng.choice(NEUTRAL[split])] if rng.random() < 0.5 else []
            kinds = []
            if rng.random() < 0.5:
                kinds = rng.sample(mixable, 2) if rng.random() < 0.2 else [rng.choice(list(KINDS))]
            for kind in kinds:
                parts.append(toxic_comment(kind, split, rng))
                for label in KINDS[kind]["labels"]:
                    labels[label] = 1
            if not parts:
                parts.append(rng.choice(NEUTRAL[split]))
            rng.shuffle(parts)
            rows.append({"comment_text": " ".join(parts), **labels})
        splits[split] = rows
    return splits


# -- reviews: sentiment, JSON lines with text + label ---------------------------------------------------
REVIEWS = {
    "positive": {
        "train": [
            "wonderful",
            "brilliant",
            "superb",
            "moving",
            "funny",
            "lovely",
            "gripping",
            "not bad at all",
        ],
        "test": [
            "delightful",
            "charming",
            "a real gem",
            "clever",
            "beautifully made",
            "not boring for a second",
        ],
    },
    "negative": {
        "train": ["boring", "awful", "wooden", "dull", "confusing", "terrible", "not good at all", "clumsy"],
        "test": ["tedious", "dreadful", "lifeless", "forgettable", "a total mess", "not funny for a second"],
    },
}
REVIEW_FRAMES = {
    "train": [
        "The {thing} was {a}.",
        "A {a} {thing}, and the ending was {b}.",
        "I found the {thing} {a} and {b}.",
        "Honestly {a}; the cast made the {thing} {b}.",
    ],
    "test": [
        "What a {a} {thing}.",
        "My verdict on the {thing}: {a}, and {b} too.",
        "Critics call the {thing} {a}.",
    ],
}
THINGS = {"train": ["film", "movie", "thriller", "comedy", "drama"], "test": ["picture", "musical", "sequel"]}


def make_sentiment(rng: random.Random) -> dict[str, list[dict]]:
    sizes = {"train": 150, "validation": 30, "test": 40}
    splits: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for split, n in sizes.items():
        pool = "test" if split == "test" else "train"
        rows = []
        for label, words in REVIEWS.items():
            count = 0
            for _ in range(50 * n):
                if count >= n:
                    break
                a, b = rng.sample(words[pool], 2)
                text = rng.choice(REVIEW_FRAMES[pool]).format(thing=rng.choice(THINGS[pool]), a=a, b=b)
                if text not in seen:
                    seen.add(text)
                    rows.append({"text": text[0].upper() + text[1:], "label": label})
                    count += 1
        rng.shuffle(rows)
        splits[split] = rows
    return splits


# -- NER: CoNLL-style token/tag lines, PER ORG LOC MISC in IOB2 ----------------------------------------
FIRST = {
    "train": "John Maria Ahmed Olga James Sofia Pedro Fatima Igor Emma Raj Chloe Tariq Hannah Marco Yuki".split(),
    "test": "Elena Kwame Hiro Anna David Priya Omar Ingrid Mateo Leila".split(),
}
LAST = {
    "train": "Smith Garcia Khan Petrova Rossi Silva Ahmed Ivanov Brown Patel Dubois Nakamura Kowalski Jensen".split(),
    "test": "Vasquez Mensah Tanaka Berg Cohen Okafor Lindqvist Moreno Haddad".split(),
}
ORG_WORDS = {
    "train": "Acme Globex Initech Umbrella Stark Wayne Hooli Vandelay Cyberdyne Tyrell Soylent Oscorp".split(),
    "test": "Northwind Contoso Fabrikam Litware Proseware Woodgrove Tailspin Adatum".split(),
}
ORG_KINDS = {
    "train": ["Corp", "Group", "Bank", "Airlines", "Motors"],
    "test": ["Holdings", "Labs", "Partners"],
}
NER_FILL = {
    "train": {
        "LOC": "Paris|Kenya|New York|the Alps|Brazil|Tokyo|Lake Geneva|Berlin|Chile|Lagos|Vienna|Quebec".split(
            "|"
        ),
        "LANG": ["French", "English", "Italian", "Japanese", "Russian", "Arabic", "Dutch", "Swahili"],
        "EVENT": [
            "the Olympics",
            "Christmas",
            "the World Cup",
            "Easter",
            "the Oscars",
            "Wimbledon",
            "Diwali",
        ],
        "ORG": ["the United Nations", "Oxford University", "Reuters", "the Red Cross", "NATO", "the BBC"],
    },
    "test": {
        "LOC": ["Madrid", "Peru", "Sydney", "the Andes", "Cairo", "Norway", "Nairobi", "Lisbon", "Ontario"],
        "LANG": ["German", "Spanish", "Korean", "Turkish", "Polish"],
        "EVENT": ["the Grammys", "Ramadan", "Carnival", "the Super Bowl", "Halloween"],
        "ORG": ["the World Bank", "Stanford University", "Interpol", "the Associated Press", "UNESCO"],
    },
}


def ner_names(pool: str, rng: random.Random) -> dict[str, list[str]]:
    """Fresh name lists per draw: people and companies built from parts, so training sees many of them."""
    fill = NER_FILL[pool]
    people = [f"{rng.choice(FIRST[pool])} {rng.choice(LAST[pool])}" for _ in range(3)] + [
        rng.choice(FIRST[pool])
    ]
    orgs = fill["ORG"] + [f"{rng.choice(ORG_WORDS[pool])} {rng.choice(ORG_KINDS[pool])}" for _ in range(4)]
    return {"PER": people, "ORG": orgs, "LOC": fill["LOC"], "LANG": fill["LANG"], "EVENT": fill["EVENT"]}


NER_TEMPLATES = {
    "train": [
        "{PER} joined {ORG} in {LOC} last year .",
        "{ORG} opened a new office in {LOC} .",
        "{PER} speaks fluent {LANG} and lives in {LOC} .",
        "The {LANG} team was coached by {PER} .",
        "{PER} met {PER} at the {ORG} headquarters .",
        "Officials from {ORG} visited {LOC} on Monday .",
        "{PER} won a medal at {EVENT} held in {LOC} .",
        "According to {ORG} , prices in {LOC} rose sharply .",
        "She flew from {LOC} to {LOC} with {PER} .",
        "{PER} said the {LANG} festival was a success .",
        "Shares of {ORG} fell after {PER} resigned .",
        "{PER} , a lawyer from {LOC} , sued {ORG} .",
        "Fans in {LOC} watched {EVENT} on television .",
        "{ORG} hired {PER} to run its office in {LOC} .",
        "The {LANG} embassy in {LOC} issued a warning .",
        "{PER} and {PER} founded {ORG} in {LOC} .",
    ],
    "test": [
        "{PER} was hired by {ORG} after moving to {LOC} .",
        "Reporters in {LOC} asked {PER} about {EVENT} plans .",
        "{ORG} announced that {PER} will move to {LOC} next month .",
        "During {EVENT} , {PER} travelled across {LOC} .",
        "A spokesman for {ORG} said talks in {LOC} had stalled .",
    ],
}


def ner_sentence(template: str, names: dict[str, list[str]], rng: random.Random) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for word in template.split():
        if word.startswith("{") and word.endswith("}"):
            kind = word[1:-1]
            name = rng.choice(names[kind]).split()
            kind = "MISC" if kind in ("LANG", "EVENT") else kind  # languages and events are CoNLL's MISC
            # A leading "the" is not part of the entity (CoNLL convention).
            if name[0] == "the":
                pairs.append(("The" if not pairs else "the", "O"))
                name = name[1:]
            pairs += [(tok, ("B-" if i == 0 else "I-") + kind) for i, tok in enumerate(name)]
        else:
            pairs.append((word, "O"))
    return pairs


def make_ner(rng: random.Random) -> dict[str, list[list[tuple[str, str]]]]:
    sizes = {"train": 400, "validation": 80, "test": 120}
    splits = {}
    for split, n in sizes.items():
        pool = "test" if split == "test" else "train"
        sentences = []
        for i in range(n):
            if i % 20 == 19:  # a long sentence: several clauses joined, longer than a small model window
                clauses = [
                    ner_sentence(rng.choice(NER_TEMPLATES[pool]), ner_names(pool, rng), rng) for _ in range(6)
                ]
                sentence = [p for c in clauses for p in c[:-1] + [("and", "O")]][:-1] + [(".", "O")]
            else:
                sentence = ner_sentence(rng.choice(NER_TEMPLATES[pool]), ner_names(pool, rng), rng)
            sentences.append(sentence)
        splits[split] = sentences
    return splits


# -- pretraining corpus: documents of 5-8 sentences, a blank line between documents -----------------------
# Each document follows one person through one craft or pastime (16 topics with their own things, actions
# and places). Sentences are held together by lexical cohesion, as in ordinary prose: each one picks up the
# thing and the place the previous one ended with, then moves on to a new thing, and opens with a word for
# when it happens (then, later, finally). A sentence from another document shares neither the things nor
# the order, so next-sentence prediction has something to learn besides the topic.
CRAFTS = {
    "bees": ("hive queen honey smoker frame comb swarm veil nectar brood",
             "inspected smoked lifted cleaned checked moved", "apiary|orchard|meadow|clover field"),
    "lighthouse": ("lamp lens beacon foghorn logbook tower lantern shutter wick signal",
                   "polished lit wound repaired trimmed watched", "headland|rocky point|harbour mouth|cliff"),
    "bread": ("dough starter loaf oven flour crust yeast rye baguette basket",
              "kneaded shaped baked floured scored proved", "bakery|kitchen|mill|market stall"),
    "sailing": ("sail mast rudder tiller dinghy anchor jib hull mooring compass",
                "hoisted trimmed steered reefed tied rigged", "marina|bay|estuary|harbour"),
    "volcano": ("crater lava ash magma vent eruption tremor caldera basalt seismometer",
                "measured sampled mapped studied photographed monitored", "summit|lava field|observatory|slope"),
    "chess": ("bishop knight rook pawn opening endgame clock gambit checkmate board",
              "moved sacrificed studied defended traded analysed", "chess club|tournament hall|library|cafe"),
    "railway": ("locomotive carriage signal platform timetable rails boiler ticket coupling junction",
                "drove coupled oiled inspected boarded repaired", "station|depot|engine shed|viaduct"),
    "tomatoes": ("seedling greenhouse vine tomato trellis compost hose blossom cane tray",
                 "watered pruned staked picked planted fed", "allotment|garden|polytunnel|windowsill"),
    "astronomy": ("telescope eyepiece chart nebula comet planet eclipse constellation tripod moon",
                  "observed aligned focused tracked sketched photographed", "observatory|hilltop|rooftop|desert"),
    "coffee": ("bean roaster grinder espresso crema filter kettle harvest cherry cup",
               "roasted ground brewed tasted weighed poured", "cafe|plantation|roastery|counter"),
    "climbing": ("rope harness carabiner ridge summit crampon axe belay route helmet",
                 "climbed clipped checked coiled tested fixed", "north face|base camp|crag|glacier"),
    "violins": ("violin bow scroll varnish bridge soundpost maple string fingerboard peg",
                "carved varnished tuned glued planed strung", "workshop|bench|concert hall|music school"),
    "whales": ("whale calf pod fluke blowhole krill song hydrophone breach fin",
               "spotted recorded followed counted photographed tagged", "research boat|open ocean|lagoon|channel"),
    "forge": ("forge anvil hammer tongs horseshoe bellows iron tank blade coal",
              "heated hammered quenched shaped sharpened welded", "smithy|village green|fairground|yard"),
    "pottery": ("clay wheel kiln glaze bowl jar slip vase mug stool",
                "threw glazed fired trimmed wedged painted", "studio|pottery class|workshop|gallery"),
    "cheese": ("curd whey rennet cheddar rind milk press mould brine vat",
               "stirred pressed salted aged turned cut", "dairy|farm|cellar|cheese shop"),
}  # fmt: skip
PEOPLE = (
    "Martha Tomas Lucy Ewan Ana Hector Ilse Daniel Clara Pete Priya Maya Omar Felix Frank Rosa Ben Lena Amira "
    "Oliver Jonas Isabel Ahmed Nadia Sven Elif Ruben Kasia Grace Yasmin Hugo Ulla Sam Victor Ines Marek"
).split()
QUALITIES = "old new heavy small bright worn quiet large fine spare".split()
OPENERS = [
    "One morning at the {place}, {who} {verb} the {adj} {thing}.",
    "At the {place}, {who} {verb} the {adj} {thing}.",
    "{who} spent the day at the {place} and {verb} the {adj} {thing}.",
]
LINKS = [  # every sentence ends on a thing, and the next one starts from it
    "{when}, the {adj0} {prev} at the {place} was {adj1}, so {who} {verb} the {adj} {thing}.",
    "{when}, the {adj0} {prev} stayed at the {place} while {who} {verb} the {adj} {thing}.",
    "{when}, the {adj0} {prev} was done, so at the {place} {who} {verb} the {adj} {thing}.",
    "{when}, the {adj0} {prev} reminded {who} at the {place} of the {adj} {thing}.",
]
WHEN = ["Then", "After that", "Later", "Next", "Soon after", "In the end"]  # the last sentence: "Finally"


def craft_story(things: list[str], verbs: list[str], places: list[str], rng: random.Random) -> list[str]:
    who, place, adj = rng.choice(PEOPLE), rng.choice(places), rng.choice(QUALITIES)
    order = rng.sample(things, rng.randint(5, 8))
    lines = [
        rng.choice(OPENERS).format(who=who, verb=rng.choice(verbs), adj=adj, thing=order[0], place=place)
    ]
    for k, (prev, thing) in enumerate(zip(order, order[1:])):
        place = rng.choice(places) if rng.random() < 0.3 else place
        when = "Finally" if k == len(order) - 2 else WHEN[k]
        new = rng.choice(QUALITIES)
        line = rng.choice(LINKS).format(
            when=when, who=who, verb=rng.choice(verbs), adj0=adj, prev=prev, adj1=rng.choice(QUALITIES), adj=new,
            thing=thing, place=place,
        )  # fmt: skip
        lines.append(line)
        adj = new
    return lines


def make_mlm_nsp(rng: random.Random, per_topic: int = 30) -> list[list[str]]:
    docs = []
    for _ in range(per_topic):
        for things, verbs, places in CRAFTS.values():
            docs.append(craft_story(things.split(), verbs.split(), places.split("|"), rng))
    rng.shuffle(docs)
    return docs


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    for name in ("mlm_nsp", "news", "toxic", "sentiment", "ner"):
        (HERE / name).mkdir(exist_ok=True)
    for split, rows in make_news(random.Random(1)).items():
        write_csv(HERE / "news" / f"{split}.csv", rows)
    for split, rows in make_toxic(random.Random(2)).items():
        write_csv(HERE / "toxic" / f"{split}.csv", rows)
    for split, rows in make_sentiment(random.Random(3)).items():
        lines = [json.dumps(r, ensure_ascii=False) for r in rows]
        (HERE / "sentiment" / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for split, sentences in make_ner(random.Random(4)).items():
        blocks = ["\n".join(f"{tok} {tag}" for tok, tag in s) for s in sentences]
        (HERE / "ner" / f"{split}.conll").write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    docs = make_mlm_nsp(random.Random(5))
    (HERE / "mlm_nsp" / "corpus.txt").write_text(
        "\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8"
    )


if __name__ == "__main__":
    main()
