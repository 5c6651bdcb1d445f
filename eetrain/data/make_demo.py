"""Generate eetrain's embedded demo dataset ("toy news summarisation") and its offline tokenizer.

Run ``python -m eetrain.data.make_demo [--out DIR]`` (default: :data:`DEMO_DIR`, i.e. ``eetrain/data/demo/``).
Everything is produced from a fixed seed with pure-Python ``random.Random`` and the ``tokenizers`` library,
without network access, and the output is byte-identical across runs and platforms (``tests/test_demo_data.py``
regenerates it and compares it with the shipped copy).

Files written
-------------
``train.jsonl`` / ``validation.jsonl`` / ``test.jsonl``
    One JSON object per line, ``{"source": str, "target": str}`` (sorted keys, ``\\n`` line endings).
    The source is a 2-4 sentence, 25-60 word "news paragraph"; the target is a one-sentence, 8-20 word summary.
    No source occurs twice, within or across splits.
``tokenizer/``
    A Hugging Face fast tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) trained on the train split:
    a word-level vocabulary (< 1000 entries) with T5's special-token ids -- ``<pad>`` = 0, ``</s>`` = 1 (eos,
    appended to every sequence by the post-processor, as T5 does), ``<unk>`` = 2. Words keep their case and
    carry a Metaspace ``▁`` marker for a preceding space, and punctuation is split off as separate tokens, so
    ``decode(..., skip_special_tokens=True)`` returns the original text exactly.
``README.md``
    What the data is, how it was made, row counts, vocabulary size, unk rate, token-difficulty mix, license.

Why this task suits early exit
------------------------------
Each paragraph is one of six story types. Their summaries are fixed templates whose slots are filled from the
source, so the target tokens fall into three difficulty classes (the generator tags every slot; the README
reports the mix over the train targets, measured in tokenizer tokens, ``</s>`` included):

EASY -- predictable from the target prefix alone, so shallow layers should already be confident:
    * template words fixed by the story type: ``arrived``, ``beat``, ``sold``, ``took``, ``won``, ``The``;
    * words that follow deterministically from the previous target word: ``on`` after ``arrived``,
      ``over from`` after ``took``, ``ahead`` after ``went``, ``the`` after ``won``, ``points on`` after the
      margin, ``week`` after ``this``, ``by`` after ``election``, ``votes`` after the vote margin ...;
    * the final ``.`` and ``</s>``.

COPY -- continuation of a multi-token span whose first token has been emitted (a surname after its first
    name, ``Bank`` after ``Northwind``, ``climate conference`` after ``a``): one unambiguous look-up in
    the source, i.e. intermediate difficulty.

HARD -- needs the source and some reasoning over it, so they should need the deep layers:
    * entity selection among distractors: every paragraph has 1-3 distractor sentences that mention *other*
      people, cities, weekdays, organisations, teams, items, events and numbers (entities are never reused
      within a paragraph), and the answer sentence is not always first. The correct one is picked by its role:
      the visitor and not the person they will meet, the winning team in an active *or passive* sentence
      ("Porto Rovers were beaten 31 to 20 by Lyon United"), the incoming and not the outgoing office-holder
      ("X was replaced by Y"), the election winner (the candidate with more votes, in either order);
    * arithmetic: the match margin ``a - b`` ("beat ... by 11 points"), the election margin ``|a - b|`` and the
      total sales ``a + b`` over two days; none of these numbers occurs in the source (beyond chance);
    * verb choice: whether a planned event "was postponed", "was cancelled" or "went ahead" depends on the kind
      of event the source reports (weather warning -> postponed, strike / funding dispute -> cancelled,
      good news -> went ahead), stated indirectly, while a distractor may describe an event of another kind
      in another city ("Last year, a severe storm forced Graz to delay its parade"), sometimes even with the
      target's own words ("A fair in Oslo went ahead last week despite the cold").

The six story types (target templates; ``[...]`` marks HARD slots, ``{...}`` COPY continuations):
    visit       ``[First] {Last} arrived on [Day] in [City] for [purpose] {...}.``
    match       ``[City] {Suffix} beat [City] {Suffix} by [margin] points on [Day].``
    sales       ``[Org] {Kind} sold [sum] [items] in [City] this week.``
    event       ``The [event] planned in [City] for [Day] [was|went] [postponed|cancelled|ahead].``
    appointment ``[First] {Last} took over from [First] {Last} as [role] of [Org] {Kind}.``
    election    ``[First] {Last} won the [City] election by [margin] votes.``

The data is synthetic and the entity names are invented combinations; any resemblance to real people or
organisations is accidental. License: Apache-2.0, like the rest of eetrain.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

DEMO_DIR: Path = Path(__file__).resolve().parent / "demo"
"""The shipped demo data directory (``eetrain/data/demo``), for other code to load from."""

SEED: int = 20240917
SPLIT_SIZES: dict[str, int] = {"train": 4000, "validation": 500, "test": 500}
SPLIT_FILES: dict[str, str] = {split: f"{split}.jsonl" for split in SPLIT_SIZES}
TOKENIZER_SUBDIR: str = "tokenizer"
SPECIAL_TOKENS: tuple[str, str, str] = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5
MAX_VOCAB: int = 1000
TASK_PREFIX: str = "summarize:"
SOURCE_WORDS: tuple[int, int] = (25, 60)
TARGET_WORDS: tuple[int, int] = (8, 20)

EASY, COPY, HARD = "easy", "copy", "hard"

# --- entity pools (invented; kept small so a word-level vocabulary covers them with every entry seen often) ---
FIRST_NAMES = (
    "Maria", "James", "Aisha", "Tomas", "Elena", "David", "Priya", "Lucas", "Nadia", "Omar",
    "Sofia", "Daniel", "Yuki", "Hannah", "Mateo", "Grace", "Ivan", "Leila", "Samuel", "Clara",
    "Rohan", "Emma", "Felix", "Amara", "Victor", "Julia", "Kenji", "Rosa", "Adam", "Mina",
)  # fmt: skip
SURNAMES = (
    "Lopez", "Carter", "Okafor", "Novak", "Rossi", "Chen", "Patel", "Silva", "Haddad", "Kowalski",
    "Berg", "Mendes", "Tanaka", "Fischer", "Moreau", "Nguyen", "Santos", "Ibrahim", "Walsh", "Petrov",
    "Larsen", "Costa", "Adeyemi", "Varga", "Keller", "Murphy", "Dubois", "Sato", "Reyes", "Lindqvist",
)  # fmt: skip
CITIES = (
    "Lyon", "Porto", "Leeds", "Bergen", "Krakow", "Valencia", "Dublin", "Graz", "Turin", "Utrecht",
    "Malmo", "Bilbao", "Cork", "Nantes", "Ghent", "Brno", "Aarhus", "Seville", "Bristol", "Basel",
    "Riga", "Tampere", "Split", "Bologna", "Lille", "Oslo", "Vilnius", "Hamburg", "Glasgow", "Ljubljana",
)  # fmt: skip
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
ORG_HEADS = (
    "Northwind", "Riverside", "Harbor", "Summit", "Greenfield", "Bluestone",
    "Oakridge", "Silverline", "Redwood", "Lakeside", "Ironbridge", "Westgate",
)  # fmt: skip
ORG_KINDS = ("Bank", "Trust", "Foundation", "Group", "Institute", "Union", "Partners", "Society")
TEAM_SUFFIXES = ("United", "Rovers", "Athletic", "Rangers", "Wanderers", "Albion")
ROLES = ("director", "chair", "treasurer", "president", "secretary", "founder", "editor", "manager")
PURPOSES = (
    "trade talks", "budget talks", "peace talks", "a health summit", "a climate conference",
    "a science fair", "a transport review", "a housing forum", "a music award", "a farming expo",
)  # fmt: skip
ITEMS = ("tickets", "books", "bikes", "meals", "laptops", "umbrellas", "phones", "lamps")
EVENTS = ("festival", "concert", "parade", "marathon", "market", "fair", "regatta", "carnival")
HAZARDS = ("heavy rain", "a severe storm", "strong winds", "flooding", "thick fog", "deep snow")

Segment = tuple[str, str]  # (text, difficulty class) of one slot of a target template
Maker = Callable[["_Draw"], str]  # builds one distractor sentence from fresh entities


@dataclass(frozen=True)
class Person:
    first: str
    last: str

    def __str__(self) -> str:
        return f"{self.first} {self.last}"


@dataclass(frozen=True)
class Named:
    """A two-word name (organisation or team) whose first word identifies it within a paragraph."""

    head: str
    tail: str

    def __str__(self) -> str:
        return f"{self.head} {self.tail}"


@dataclass(frozen=True)
class Story:
    core: list[str]  # core[0] is the main sentence; the rest (event cue) may go anywhere after it
    target: list[Segment]
    distractors: list[Maker]  # story-specific candidates, mixed with the generic ones


class _Draw:
    """Samples the entities of one paragraph without ever repeating one.

    Uniqueness is what makes distractors real distractors: the answer's person, city, weekday, organisation
    head, role, item or event never reappears in another role, so choosing the right one requires
    reading the sentence structure rather than counting mentions.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def fresh(self, pool: Sequence[str]) -> str:
        item = self.rng.choice([x for x in pool if x not in self.used])
        self.used.add(item)
        return item

    def num(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def person(self) -> Person:
        return Person(self.fresh(FIRST_NAMES), self.fresh(SURNAMES))

    def city(self) -> str:
        return self.fresh(CITIES)

    def day(self) -> str:
        return self.fresh(WEEKDAYS)

    def org(self) -> Named:
        return Named(self.fresh(ORG_HEADS), self.rng.choice(ORG_KINDS))

    def team(self) -> Named:
        # The team's city doubles as its home ground, so city names also act as distractors for city slots.
        return Named(self.fresh(CITIES), self.rng.choice(TEAM_SUFFIXES))

    def role(self) -> str:
        return self.fresh(ROLES)

    def purpose(self) -> str:
        return self.fresh(PURPOSES)

    def item(self) -> str:
        return self.fresh(ITEMS)

    def event(self) -> str:
        return self.fresh(EVENTS)


def _span(text: str, first: str = HARD) -> list[Segment]:
    """A multi-word slot: its first word has difficulty ``first``, the rest are copy continuations."""
    head, *rest = text.split()
    return [(head, first)] + [(w, COPY) for w in rest]


def _name(x: Person | Named) -> list[Segment]:
    return _span(str(x))


# --- generic distractors: fit any story -------------------------------------------------------------------
GENERIC_DISTRACTORS: tuple[Maker, ...] = (
    lambda d: f"{d.person()} of {d.org()} declined to comment.",
    lambda d: f"Police in {d.city()} said roads were quiet on {d.day()}.",
    lambda d: f"{d.person()}, a local teacher, said the news was welcome.",
    lambda d: f"{d.org()} will publish a report on {d.day()}.",
    lambda d: f"Rain is expected in {d.city()} on {d.day()}.",
    lambda d: f"{d.org()} reported {d.num(2, 99)} new members this month.",
    lambda d: f"About {d.num(10, 99)} people in {d.city()} took part in a survey by {d.org()}.",
)


def _visit(d: _Draw) -> Story:
    p, org, role, city, day, purpose = d.person(), d.org(), d.role(), d.city(), d.day(), d.purpose()
    main = d.rng.choice(
        [
            f"{p}, the {role} of {org}, arrived in {city} on {day} for {purpose}.",
            f"On {day}, {p}, who serves as {role} of {org}, arrived in {city} for {purpose}.",
            f"{p} arrived in {city} on {day} for {purpose}, {org} said.",
            f"{org} said its {role}, {p}, arrived in {city} on {day} for {purpose}.",
        ]
    )
    target = [
        *_name(p), ("arrived", EASY), ("on", EASY), (day, HARD), ("in", EASY), (city, HARD), ("for", EASY),
        *_span(purpose),
    ]  # fmt: skip
    distractors: list[Maker] = [
        lambda d: f"{d.person()} is expected to visit {d.city()} on {d.day()}.",
        lambda d: f"Last month, {d.person()} travelled to {d.city()} for {d.purpose()}.",
        lambda d: f"{p.last} will meet {d.person()} in {d.city()} on {d.day()}.",
        lambda d: f"{d.person()}, the {d.role()} of {d.org()}, stayed in {d.city()}.",
    ]
    return Story([main], target, distractors)


def _match(d: _Draw) -> Story:
    t1, t2, day = d.team(), d.team(), d.day()
    city = d.rng.choice([t1.head, t2.head])  # home ground of one of the two teams
    a = d.num(12, 60)
    b = d.num(5, a - 1)
    main = d.rng.choice(
        [
            f"{t1} beat {t2} {a} to {b} in {city} on {day}.",
            f"{t1} defeated {t2} {a} to {b} on {day} in {city}.",
            f"On {day}, {t2} lost {b} to {a} against {t1} in {city}.",
            f"{t2} were beaten {a} to {b} by {t1} in {city} on {day}.",
        ]
    )
    target = [
        *_name(t1), ("beat", EASY), *_name(t2), ("by", EASY), (str(a - b), HARD), ("points", EASY),
        ("on", EASY), (day, HARD),
    ]  # fmt: skip
    distractors: list[Maker] = [
        lambda d: f"{d.person()} scored {d.num(2, b)} points for {t2}.",
        lambda d: f"A crowd of {d.num(2, 99)} hundred fans watched the game.",
        lambda d: f"{d.team()} will play {d.team()} on {d.day()}.",
        lambda d: f"{t2} had won {d.num(1, 9)} of its last {d.num(10, 30)} games.",
    ]
    return Story([main], target, distractors)


def _sales(d: _Draw) -> Story:
    org, city, item = d.org(), d.city(), d.item()
    d1, d2 = sorted((d.day(), d.day()), key=WEEKDAYS.index)  # "this week" reads oddly if time runs backwards
    a, b = d.num(3, 49), d.num(3, 49)
    main = d.rng.choice(
        [
            f"{org} in {city} sold {a} {item} on {d1} and another {b} on {d2}.",
            f"On {d1}, {org} sold {a} {item} in {city}, and it sold {b} more on {d2}.",
            f"{org} said it sold {a} {item} in {city} on {d1}, then {b} more on {d2}.",
        ]
    )
    target = [
        *_name(org), ("sold", EASY), (str(a + b), HARD), (item, HARD), ("in", EASY), (city, HARD),
        ("this", EASY), ("week", EASY),
    ]  # fmt: skip
    distractors: list[Maker] = [
        lambda d: f"A rival shop, {d.org()}, sold {d.num(3, 99)} {d.item()} in {d.city()}.",
        lambda d: f"{org} had hoped to sell {d.num(10, 99)} {item} by the weekend.",
        lambda d: f"Prices in {d.city()} rose by {d.num(2, 30)} percent this year.",
    ]
    return Story([main], target, distractors)


# The event story's verb is chosen by the kind of news the cue sentence reports, never named in the source.
_EVENT_OUTCOMES: dict[str, list[Segment]] = {
    "weather": [("was", HARD), ("postponed", HARD)],
    "dispute": [("was", HARD), ("cancelled", HARD)],
    "fine": [("went", HARD), ("ahead", EASY)],
}


def _event_cue(d: _Draw, kind: str) -> str:
    options = {
        "weather": [
            lambda: f"Forecasters warned of {d.fresh(HAZARDS)} that day.",
            lambda: "A storm warning was issued for the whole region.",
            lambda: f"Officials feared that {d.fresh(HAZARDS)} would make the roads unsafe.",
        ],
        "dispute": [
            lambda: f"A funding dispute with {d.org()} left the organisers without money.",
            lambda: f"Staff at {d.org()} went on strike over pay.",
            lambda: f"{d.org()} withdrew its support after a row over costs.",
        ],
        "fine": [
            lambda: "Organisers reported strong ticket sales and clear skies.",
            lambda: f"Volunteers from {d.org()} finished the preparations early.",
            lambda: f"{d.person()} said everything was ready and the weather was fine.",
        ],
    }[kind]
    return d.rng.choice(options)()


def _event(d: _Draw) -> Story:
    event, city, day = d.event(), d.city(), d.day()
    kind = d.rng.choice(sorted(_EVENT_OUTCOMES))
    main = d.rng.choice(
        [
            f"The {event} in {city} was planned for {day}.",
            f"{city} had planned to hold its {event} on {day}.",
            f"Thousands were expected at the {event} in {city} on {day}.",
        ]
    )
    target = [
        ("The", EASY), (event, HARD), ("planned", EASY), ("in", EASY), (city, HARD), ("for", EASY),
        (day, HARD), *_EVENT_OUTCOMES[kind],
    ]  # fmt: skip
    # Distractors describe an event of a *different* kind elsewhere, so the cue words alone do not decide.
    other_kind: dict[str, Maker] = {
        "weather": lambda d: f"Last year, {d.fresh(HAZARDS)} forced {d.city()} to delay its {d.event()}.",
        "dispute": lambda d: f"Last month, a strike at {d.org()} stopped a {d.event()} in {d.city()}.",
        "fine": lambda d: f"A {d.event()} in {d.city()} went ahead last week despite the cold.",
    }
    distractors = [maker for k, maker in sorted(other_kind.items()) if k != kind]
    return Story([main, _event_cue(d, kind)], target, distractors)


def _appointment(d: _Draw) -> Story:
    new, old, org, role, day = d.person(), d.person(), d.org(), d.role(), d.day()
    main = d.rng.choice(
        [
            f"{new} replaced {old} as {role} of {org} on {day}.",
            f"{old} was replaced by {new} as {role} of {org} on {day}.",
            f"{org} named {new} as its new {role} on {day}, replacing {old}.",
            f"On {day}, {org} said {old} would step down as {role} and {new} would take over.",
        ]
    )
    target = [
        *_name(new), ("took", EASY), ("over", EASY), ("from", EASY), *_name(old), ("as", EASY), (role, HARD),
        ("of", EASY), *_name(org),
    ]  # fmt: skip
    distractors: list[Maker] = [
        lambda d: f"{old} had led {org} for {d.num(2, 30)} years.",
        lambda d: f"{d.person()}, a former {d.role()} of {d.org()}, welcomed the news.",
        lambda d: f"{d.person()} is expected to join {d.org()} as {d.role()} next year.",
    ]
    return Story([main], target, distractors)


def _election(d: _Draw) -> Story:
    pa, pb, city, day = d.person(), d.person(), d.city(), d.day()
    a, b = d.rng.sample(range(10, 100), 2)  # distinct, so there is always a winner
    winner = pa if a > b else pb
    main = d.rng.choice(
        [
            f"In the {city} election on {day}, {pa} won {a} votes and {pb} won {b} votes.",
            f"{pa} received {a} votes in the {city} election on {day}, while {pb} received {b}.",
            f"Results from {city} on {day} gave {pa} {a} votes and {pb} {b} votes.",
        ]
    )
    target = [
        *_name(winner), ("won", EASY), ("the", EASY), (city, HARD), ("election", EASY), ("by", EASY),
        (str(abs(a - b)), HARD), ("votes", EASY),
    ]  # fmt: skip
    distractors: list[Maker] = [
        lambda d: f"Turnout in {city} was {d.num(20, 90)} percent.",
        lambda d: f"{d.person()} of {d.org()} called the result fair.",
        lambda d: f"{d.person()} won {d.num(10, 99)} votes in {d.city()} last year.",
    ]
    return Story([main], target, distractors)


STORY_TYPES: dict[str, Callable[[_Draw], Story]] = {
    "visit": _visit,
    "match": _match,
    "sales": _sales,
    "event": _event,
    "appointment": _appointment,
    "election": _election,
}

#: The classes of the demo's classification task (``conf/data/demo_classification.yaml``): the story type of
#: a paragraph, with the event stories split by their outcome. Most paragraphs give their type away in a few
#: words; an event's outcome is only implied by the cue sentence among distractors (see ``_event``), so those
#: three classes are the hard cases an early-exit classifier should keep for its deep layers.
STORY_LABELS: tuple[str, ...] = (
    "visit", "match", "sales", "event_postponed", "event_cancelled", "event_ahead", "appointment", "election",
)  # fmt: skip
# Each summary template, as ``_target_text`` writes it; an event's outcome is its last words.
_TEMPLATES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (label, re.compile(pattern))
    for label, pattern in (
        ("visit", r"\w+ \w+ arrived on \w+ in \w+ for [\w ]+\."),
        ("match", r"\w+ \w+ beat \w+ \w+ by \d+ points on \w+\."),
        ("sales", r"\w+ \w+ sold \d+ \w+ in \w+ this week\."),
        ("event_postponed", r"The \w+ planned in \w+ for \w+ was postponed\."),
        ("event_cancelled", r"The \w+ planned in \w+ for \w+ was cancelled\."),
        ("event_ahead", r"The \w+ planned in \w+ for \w+ went ahead\."),
        ("appointment", r"\w+ \w+ took over from \w+ \w+ as \w+ of \w+ \w+\."),
        ("election", r"\w+ \w+ won the \w+ election by \d+ votes\."),
    )
)


def story_label(target: str) -> str:
    """The class (one of :data:`STORY_LABELS`) of a demo example, read off its summary's template, so the
    classification task needs no file of its own. Raises ``ValueError`` for a text no template matches."""
    for label, pattern in _TEMPLATES:
        if pattern.fullmatch(target):
            return label
    raise ValueError(f"not a demo summary (no story template matches): {target!r}")


_PIECE = re.compile(r"\w+|[^\w\s]")  # the tokenizer's split: words and single punctuation marks


def _words(text: str) -> int:
    return len(text.split())


def _target_text(target: Sequence[Segment]) -> str:
    return " ".join(text for text, _ in target) + "."


def _target_tags(target: Sequence[Segment]) -> list[str]:
    """Difficulty class of every target token as the tokenizer splits it, the final '.' and '</s>' included."""
    tags = [tag for text, tag in target for _ in _PIECE.findall(text)]
    return tags + [EASY, EASY]


def _paragraph(d: _Draw, story: Story) -> str | None:
    """Mix the story's core sentences with 1-3 distractors; ``None`` if the word count is out of range."""
    rng = d.rng
    n_distract = rng.randint(1, 4 - len(story.core))
    # One story-specific distractor is always present: those are the ones that compete with the answer.
    first = rng.choice(story.distractors)
    others = [m for m in story.distractors if m is not first] + list(GENERIC_DISTRACTORS)
    makers = [first, *rng.sample(others, n_distract - 1)]
    sentences = [make(d) for make in makers]
    # Leading with the main sentence is the news-like default, but not always, so position is no shortcut.
    main_at = 0 if rng.random() < 0.7 else 1
    sentences.insert(main_at, story.core[0])
    for extra in story.core[1:]:
        sentences.insert(rng.randint(main_at + 1, len(sentences)), extra)
    text = " ".join(sentences)
    lo, hi = SOURCE_WORDS
    return text if lo <= _words(text) <= hi else None


def generate_split(
    split: str, n_rows: int, seed: int = SEED, exclude: set[str] | None = None
) -> tuple[list[dict[str, str]], list[list[str]]]:
    """Generate ``n_rows`` rows of one split and the difficulty tags of each target's tokens.

    ``exclude`` holds sources already used by other splits (it is updated in place), which keeps the
    splits disjoint. A string seed makes ``random.Random`` hash it with SHA-512, so the stream does not
    depend on ``PYTHONHASHSEED`` or the platform.
    """
    rng = random.Random(f"eetrain-demo/{seed}/{split}")
    seen = exclude if exclude is not None else set()
    kinds = sorted(STORY_TYPES)
    rows: list[dict[str, str]] = []
    tags: list[list[str]] = []
    while len(rows) < n_rows:
        # Redraw within the chosen story type: rejecting on length must not skew the mix of types.
        make_story = STORY_TYPES[rng.choice(kinds)]
        source = None
        while source is None:
            d = _Draw(rng)
            story = make_story(d)
            source = _paragraph(d, story)
        if source in seen:
            continue
        target = _target_text(story.target)
        assert TARGET_WORDS[0] <= _words(target) <= TARGET_WORDS[1], target
        seen.add(source)
        rows.append({"source": source, "target": target})
        tags.append(_target_tags(story.target))
    return rows, tags


def build_tokenizer(texts: Sequence[str]) -> Tokenizer:
    """Train the word-level demo tokenizer on ``texts``.

    WordLevel keeps training deterministic (the trainer orders words by count, ties broken by the string) and
    makes every demo word a single token, so per-token difficulty is per-word difficulty.
    """
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    # Metaspace keeps each word's leading space as '▁' so the matching decoder can restore spacing exactly;
    # splitting punctuation off afterwards gives "Lyon" and "," instead of a separate "Lyon," entry.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.WordLevelTrainer(
        vocab_size=MAX_VOCAB, min_frequency=1, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Like T5: every sequence (and each half of a pair) ends with </s>.
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", SPECIAL_TOKENS.index("</s>"))]
    )
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(special) == i, (special, tok.token_to_id(special))
    return tok


def tokenizer_config() -> dict[str, object]:
    """``tokenizer_config.json``, written by hand rather than by ``save_pretrained`` so the shipped bytes
    do not depend on the installed transformers version; ``PreTrainedTokenizerFast`` loads in v4 and v5."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 512,
        "padding_side": "right",
        "truncation_side": "right",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def unk_rate(tok: Tokenizer, texts: Sequence[str]) -> float:
    """Fraction of non-special tokens of ``texts`` that map to ``<unk>``."""
    unk = tok.token_to_id("<unk>")
    n_tokens = n_unk = 0
    for enc in tok.encode_batch(list(texts), add_special_tokens=False):
        n_tokens += len(enc.ids)
        n_unk += enc.ids.count(unk)
    return n_unk / max(n_tokens, 1)


def _write_text(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _readme(counts: dict[str, int], stats: dict[str, object]) -> str:
    mix = stats["difficulty_mix"]
    assert isinstance(mix, dict)
    rows = "\n".join(f"| `{split}.jsonl` | {n} |" for split, n in counts.items())
    return f"""# eetrain demo data: toy news summarisation

A small synthetic text-to-text dataset bundled with eetrain, so that the default recipes, the tests and the
examples run fully offline. Each row is `{{"source": str, "target": str}}`: the source is a 2-4 sentence
"news paragraph" (25-60 words) about one of six story types (visit, match, sales, event, appointment,
election) mixed with distractor sentences; the target is a one-sentence summary (8-20 words).

The summaries are templates whose slots are filled from the source, so target tokens come in three kinds:
*easy* (template and function words, words fixed by the previous word, the final `.` and `</s>`),
*copy* (continuations of a name already started) and *hard* (the right entity among distractors, a sum or
difference of two numbers in the source, a verb chosen by the kind of event reported). See the docstring of
`eetrain/data/make_demo.py` for the full design. Mix over the train targets, in tokenizer tokens with `</s>`:
easy {mix[EASY]:.1%}, copy {mix[COPY]:.1%}, hard {mix[HARD]:.1%}.

| file | rows |
|---|---|
{rows}

`tokenizer/` is a Hugging Face fast tokenizer trained on the train split (word-level, {stats["vocab_size"]} entries,
`<pad>`=0, `</s>`=1 appended to every sequence, `<unk>`=2, as in T5); load it with
`transformers.AutoTokenizer.from_pretrained("eetrain/data/demo/tokenizer")`, no network needed.
Unknown-token rate on validation: {stats["unk_rate_validation"]:.2%}.

## How it was generated

    python -m eetrain.data.make_demo

Deterministic (seed {SEED}, Python's `random.Random`, no network): rerunning the command reproduces these files
byte for byte, which `tests/test_demo_data.py` checks.

## License

Generated data, released under the Apache License 2.0 like the rest of eetrain. All names are invented
combinations; any resemblance to real people or organisations is accidental.
"""


def write_demo(out_dir: Path = DEMO_DIR, seed: int = SEED) -> dict[str, object]:
    """Generate all demo files into ``out_dir`` and return summary statistics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {}
    tag_counts: Counter[str] = Counter()
    for split, n_rows in SPLIT_SIZES.items():
        rows, tags = generate_split(split, n_rows, seed=seed, exclude=seen)
        splits[split] = rows
        if split == "train":
            tag_counts.update(tag for row_tags in tags for tag in row_tags)
        lines = "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows)
        _write_text(out_dir / SPLIT_FILES[split], lines)

    train_texts = [text for row in splits["train"] for text in (row["source"], row["target"])]
    # The demo feeds sources with T5's task prefix (conf/data/demo.yaml): it must be in the vocabulary.
    tok = build_tokenizer(train_texts + [TASK_PREFIX])
    tok_dir = out_dir / TOKENIZER_SUBDIR
    tok_dir.mkdir(exist_ok=True)
    _write_text(tok_dir / "tokenizer.json", tok.to_str(pretty=True) + "\n")
    _write_text(
        tok_dir / "tokenizer_config.json", json.dumps(tokenizer_config(), indent=2, sort_keys=True) + "\n"
    )

    validation_texts = [text for row in splits["validation"] for text in (row["source"], row["target"])]
    total_tags = sum(tag_counts.values())
    stats: dict[str, object] = {
        "rows": {split: len(rows) for split, rows in splits.items()},
        "vocab_size": tok.get_vocab_size(),
        "unk_rate_validation": unk_rate(tok, validation_texts),
        "difficulty_mix": {tag: tag_counts[tag] / total_tags for tag in (EASY, COPY, HARD)},
    }
    _write_text(out_dir / "README.md", _readme({s: len(r) for s, r in splits.items()}, stats))
    return stats


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help=f"output directory (default: {DEMO_DIR})")
    args = parser.parse_args(argv)
    stats = write_demo(args.out)
    print(json.dumps(stats, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
