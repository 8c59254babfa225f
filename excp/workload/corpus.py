"""A deterministic English-like corpus and its character tokenizer.

Compression quality is only measurable on a run whose loss keeps falling for thousands
of steps, so the text has structure at many ranges: spelling and inflection (a few
hundred word forms, irregular plurals and pasts), local agreement (``a``/``an``,
``is``/``are``, ``this``/``these``), agreement across nested relative clauses and
parentheses, selectional restrictions (people cook, dogs do not; apples are eaten,
bridges are crossed), a tense and a protagonist held for a whole paragraph (pronouns and
``his``/``her`` agree with them), and arithmetic that is always right.

It is generated rather than downloaded so tests and benchmarks need no network and no
data files. Only ``random.Random(seed)`` with ``random()``/``choice()``/``randint()`` is
used, whose sequences Python keeps stable across versions and platforms.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

VOCAB = "\n !'(),-.:;?0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
"""Every character the corpus may contain; a token id is an index into this string."""

_STOI = {ch: i for i, ch in enumerate(VOCAB)}


def vocab_size() -> int:
    """Number of token ids; fixed so a model built today reads tomorrow's corpus."""
    return len(VOCAB)


def encode(text: str) -> list[int]:
    """Token ids of ``text``; refuses characters outside :data:`VOCAB` rather than
    silently mapping them, so a vocabulary drift cannot go unnoticed."""
    try:
        return [_STOI[ch] for ch in text]
    except KeyError as exc:
        raise ValueError(f"character {exc.args[0]!r} is not in the workload vocabulary") from None


def decode(ids: Iterable[int]) -> str:
    """The text of token ids (inverse of :func:`encode`)."""
    return "".join(VOCAB[i] for i in ids)


def _plural(word: str) -> str:
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "x", "ch", "sh", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _past(verb: str) -> str:
    if verb.endswith("e"):
        return verb + "d"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ied"
    return verb + "ed"


def _nouns(spec: str) -> list[tuple[str, str]]:
    """``"fox mouse/mice"`` -> ``[("fox", "foxes"), ("mouse", "mice")]``."""
    out = []
    for item in spec.split():
        sg, _, pl = item.partition("/")
        out.append((sg, pl or _plural(sg)))
    return out


def _verbs(spec: str) -> list[tuple[str, str, str, bool]]:
    """``"*bake eat/ate"`` -> (base, 3rd person, past, people-only) per verb."""
    out = []
    for item in spec.split():
        people_only = item.startswith("*")
        base, _, past = item.lstrip("*").partition("/")
        out.append((base, _third_person(base), past or _past(base), people_only))
    return out


NOUNS = {
    "person": _nouns(
        "teacher farmer child/children woman/women man/men doctor baker sailor student king "
        "queen painter driver singer neighbor pilot nurse cook hunter miner"
    ),
    "animal": _nouns(
        "dog cat horse bird fox wolf/wolves mouse/mice sheep/sheep goat rabbit owl bear duck frog goose/geese"
    ),
    "food": _nouns(
        "apple cake pear carrot egg pie plum cookie sandwich potato/potatoes cherry berry onion lemon"
    ),
    "thing": _nouns(
        "book box cup hammer key letter lamp rope basket knife/knives map coin bell chair "
        "ball boat wagon bottle candle shoe"
    ),
    "place": _nouns(
        "river forest market village garden bridge school tower harbor hill field castle "
        "kitchen library station"
    ),
}
ANIMATE = ("person", "animal")

ADJECTIVES = {
    "person": "old young small tall happy tired brave clever kind angry hungry lazy busy "
    "gentle proud shy quiet calm sleepy".split(),
    "animal": "old young small big happy tired hungry lazy wild gentle quiet sleepy brown "
    "black white grey".split(),
    "food": "fresh sweet ripe sour warm round red green golden small big".split(),
    "thing": "heavy broken wooden shiny tiny old new empty red blue green golden".split(),
    "place": "quiet old big small dark green busy ancient cold sunny".split(),
}

TRANSITIVE = {
    "food": _verbs("eat/ate *cook *bake *buy/bought share want smell *taste *pick *sell/sold"),
    "thing": _verbs(
        "*carry find/found lose/lost *fix hold/held *drop/dropped *sell/sold *paint *open "
        "hide/hid *clean *move"
    ),
    "animal": _verbs("see/saw follow chase watch *feed/fed like *call *wash bite/bit"),
    "person": _verbs("see/saw follow help *meet/met watch *thank *visit *greet like *call"),
    "place": _verbs("*visit leave/left cross reach *clean *paint"),
}
INTRANSITIVE = _verbs(
    "sleep/slept run/ran sing/sang laugh wait dance swim/swam smile rest shout wander *work play hide/hid"
)
SAYING = _verbs("say/said think/thought know/knew hope believe remember *write/wrote hear/heard")

MANNER = "quickly slowly quietly happily carefully loudly gently eagerly".split()
TIME = {
    "present": ["every day", "every morning", "often", "usually", "now", "on sundays"],
    "past": ["yesterday", "last night", "long ago", "last week", "once", "this morning"],
}
PREPOSITIONS = "near in behind across at by under beside".split()
NAMES = {
    "she": "Anna Maria Lena Clara Sofia Emma Nora Julia Ruth Alice Grace Ivy".split(),
    "he": "Tom Ben Paul Max Leo Sam Hugo Oscar Felix Jack Omar Ivan".split(),
}
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen twenty"
).split()


class _Paragraph:
    """One paragraph's state: a tense and a protagonist that every sentence must agree
    with, which is what gives the corpus structure longer than a sentence."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.tense = rng.choice(("present", "past"))
        self.pronoun = rng.choice(("she", "he"))
        self.name = rng.choice(NAMES[self.pronoun])

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def verb(self, forms: tuple[str, str, str, bool], plural: bool) -> str:
        if self.tense == "past":
            return forms[2]
        return forms[0] if plural else forms[1]

    def be(self, plural: bool) -> str:
        if self.tense == "past":
            return "were" if plural else "was"
        return "are" if plural else "is"

    def count(self) -> str:
        n = self.rng.randint(2, 40)
        return NUMBER_WORDS[n] if n <= 20 and self.chance(0.7) else str(n)

    def determiner(self, plural: bool, first: str) -> str:
        rng = self.rng
        if plural:
            choice = rng.choice(("the", "the", "these", "those", "some", "many", "our", "#"))
            return self.count() if choice == "#" else choice
        choice = rng.choice(("the", "the", "the", "a", "a", "this", "that", "every", "my", "$"))
        if choice == "a":
            return "an" if first[0] in "aeiou" else "a"
        return ("her" if self.pronoun == "she" else "his") if choice == "$" else choice

    def noun_phrase(self, kind: str, plural: bool, depth: int) -> str:
        sg, pl = self.rng.choice(NOUNS[kind])
        words = [pl if plural else sg]
        if self.chance(0.4):
            words.insert(0, self.rng.choice(ADJECTIVES[kind]))
        words.insert(0, self.determiner(plural, words[0]))
        phrase = " ".join(words)
        if kind != "place" and self.chance(0.12):
            phrase += " " + self.place_phrase()
        if depth < 3 and self.chance(0.3 / (depth + 1)):
            relative = self.relative_clause(kind, plural, depth + 1)
            phrase += f" ({relative})" if self.chance(0.2) else " " + relative
        return phrase

    def place_phrase(self) -> str:
        return self.rng.choice(PREPOSITIONS) + " " + self.noun_phrase("place", False, 3)

    def relative_clause(self, kind: str, plural: bool, depth: int) -> str:
        """Agreement inside the clause follows the clause's own subject, while the head's
        verb outside it follows the head: the long-range dependency a model must learn."""
        pronoun = "who" if kind == "person" and self.chance(0.7) else "that"
        if kind in ANIMATE and self.chance(0.5):
            if self.chance(0.3):
                return f"{pronoun} {self.be(plural)} {self.rng.choice(ADJECTIVES[kind])}"
            return f"{pronoun} {self.predicate(kind, plural, depth)}"
        subject_kind, subject_plural = self.rng.choice(ANIMATE), self.chance(0.5)
        verbs = [v for v in TRANSITIVE[kind] if subject_kind == "person" or not v[3]]
        subject = self.noun_phrase(subject_kind, subject_plural, depth + 1)
        return f"{pronoun} {subject} {self.verb(self.rng.choice(verbs), subject_plural)}"

    def predicate(self, kind: str, plural: bool, depth: int) -> str:
        """A verb phrase whose verb agrees with, and is allowed for, a ``kind`` subject."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.25:
            verb = rng.choice([v for v in INTRANSITIVE if kind == "person" or not v[3]])
            phrase = self.verb(verb, plural)
            if self.chance(0.4):
                phrase += " " + rng.choice(MANNER)
            if self.chance(0.3):
                phrase += " " + self.place_phrase()
            return phrase
        if roll < 0.35:
            return f"{self.be(plural)} {rng.choice(ADJECTIVES[kind])}"
        if roll < 0.45 and kind == "person" and depth < 3:
            return f"{self.verb(rng.choice(SAYING), plural)} that {self.clause(depth + 1)}"
        object_kind = rng.choice(tuple(TRANSITIVE))
        verbs = [v for v in TRANSITIVE[object_kind] if kind == "person" or not v[3]]
        obj = self.noun_phrase(object_kind, self.chance(0.4), depth + 1)
        return f"{self.verb(rng.choice(verbs), plural)} {obj}"

    def clause(self, depth: int = 0) -> str:
        if self.chance(0.35):
            subject = self.name if self.chance(0.5) else self.pronoun
            return f"{subject} {self.predicate('person', False, depth)}"
        kind, plural = self.rng.choice(ANIMATE), self.chance(0.45)
        return f"{self.noun_phrase(kind, plural, depth)} {self.predicate(kind, plural, depth)}"

    def question(self) -> str:
        kind, plural = self.rng.choice(ANIMATE), self.chance(0.45)
        subject = self.noun_phrase(kind, plural, 2)
        if self.chance(0.3):
            return f"{self.be(plural)} {subject} {self.rng.choice(ADJECTIVES[kind])}?"
        if self.tense == "past":
            aux = "did"
        else:
            aux = "do" if plural else "does"
        object_kind = self.rng.choice(tuple(TRANSITIVE))
        verbs = [v for v in TRANSITIVE[object_kind] if kind == "person" or not v[3]]
        obj = self.noun_phrase(object_kind, self.chance(0.4), 2)
        return f"{aux} {subject} {self.rng.choice(verbs)[0]} {obj}?"

    def existential(self) -> str:
        kind = self.rng.choice(tuple(NOUNS))
        sg, pl = self.rng.choice(NOUNS[kind])
        if self.chance(0.2):
            return f"there {self.be(False)} one {sg} {self.place_phrase()}."
        return f"there {self.be(True)} {self.count()} {pl} {self.place_phrase()}."

    def arithmetic(self) -> str:
        """Correct sums, differences and products: character-level arithmetic is learnt
        slowly, which keeps the loss falling long after the grammar is learnt."""
        rng = self.rng
        op = rng.choice(("plus", "minus", "times"))
        top = 12 if op == "times" else rng.choice((10, 99))
        a, b = rng.randint(0, top), rng.randint(0, top)
        if op == "minus" and b > a:
            a, b = b, a
        result = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        if max(a, b, result) <= 20 and self.chance(0.6):
            return f"{NUMBER_WORDS[a]} {op} {NUMBER_WORDS[b]} is {NUMBER_WORDS[result]}."
        return f"{a} {op} {b} is {result}."

    def counting(self) -> str:
        start, length = self.rng.randint(0, 30), self.rng.randint(3, 6)
        numbers = range(start, start + length)
        words = self.chance(0.5) and start + length <= 21
        listed = ", ".join(NUMBER_WORDS[n] if words else str(n) for n in numbers)
        verb = self.verb(("count", "counts", "counted", True), False)
        return f"{self.name} {verb}: {listed}."

    def sentence(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.08:
            text = self.question()
        elif roll < 0.14:
            text = self.existential()
        elif roll < 0.2:
            text = self.arithmetic()
        elif roll < 0.24:
            text = self.counting()
        elif roll < 0.34:
            text = f"{rng.choice(('if', 'when'))} {self.clause(1)}, {self.clause(1)}."
        elif roll < 0.44:
            text = f"{self.clause(1)}, {rng.choice(('and', 'but'))} {self.clause(1)}."
        elif roll < 0.54:
            text = f"{rng.choice(TIME[self.tense])}, {self.clause()}."
        else:
            text = self.clause()
            if self.chance(0.3):
                text += " " + rng.choice(TIME[self.tense])
            text += "."
        return text[0].upper() + text[1:]

    def text(self) -> str:
        """The protagonist is named first so later pronouns have something to refer to."""
        opening = f"{self.name} {self.predicate('person', False, 0)}."
        sentences = [opening] + [self.sentence() for _ in range(self.rng.randint(2, 6))]
        return " ".join(sentences) + "\n"


def make_corpus(num_chars: int, seed: int = 0) -> str:
    """``num_chars`` characters of generated text, identical for identical arguments on
    every platform. A shorter corpus is a prefix of a longer one with the same seed, so a
    quick test reads the same text as the benchmark, only less of it."""
    if num_chars < 0:
        raise ValueError(f"num_chars must be >= 0, got {num_chars}")
    rng = random.Random(seed)
    parts: list[str] = []
    length = 0
    while length < num_chars:
        paragraph = _Paragraph(rng).text()
        parts.append(paragraph)
        length += len(paragraph)
    return "".join(parts)[:num_chars]
