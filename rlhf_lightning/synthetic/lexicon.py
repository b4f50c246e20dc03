"""Vocabulary, sentiment lexicon and sentence grammar of the embedded world.

Everything the world can say is written down here once and read by both sides: the generators in
``world.py`` fill these templates, and the gold scorers in ``scorers.py`` read the same lexicon
(sentiment), the same fact words (consistency) and the bigrams the templates can produce (fluency).

Texts are lower case words separated by single spaces, with ``.`` and ``,`` glued to the previous word,
which is exactly what the word-level tokenizer's decoder writes back. Two things are avoided on purpose
because that decoder's clean-up would rewrite them: apostrophes and the word pair ``do not``.

Template notation: ``{SLOT}`` is filled with one entry of ``CLASSES[SLOT]`` (an entry may be several
words); every other token is literal.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = [
    "GENRES",
    "ACTORS",
    "GENRE_ASPECTS",
    "GENRE_KEYWORDS",
    "GENERIC_ASPECTS_SG",
    "GENERIC_ASPECTS_PL",
    "CLASSES",
    "LEXICON",
    "INTENSIFIERS",
    "DIMINISHERS",
    "NEGATORS",
    "PROMPT_TEMPLATES",
    "TEMPLATES",
    "tokenize_words",
    "template_slots",
    "world_words",
    "valid_bigrams",
    "content_words",
]

# --- facts ---------------------------------------------------------------------------------------
# Genres start with a consonant so "a {GENRE} film" never needs "an".
GENRES = ("horror", "comedy", "drama", "thriller", "western", "romance", "musical", "documentary", "fantasy", "mystery")
ACTORS = ("nina", "marco", "elena", "david", "sofia", "omar", "julia", "victor", "lena", "oscar", "maya", "hugo")
RATINGS = (1, 2, 3, 4, 5)

# Signature elements of each genre: (singular aspects, plural aspects). Each has one key word, used by
# no other phrase of the world, that is a claim about the genre: "the jokes" in a review of a horror
# film contradicts the prompt.
GENRE_ASPECTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "horror": (("the monster",), ("the scares",)),
    "comedy": (("the humor",), ("the jokes",)),
    "drama": (("the family conflict",), ("the tearful scenes",)),
    "thriller": (("the suspense",), ("the twists",)),
    "western": (("the frontier town",), ("the gunfights",)),
    "romance": (("the love story",), ("the romantic scenes",)),
    "musical": (("the choreography",), ("the songs",)),
    "documentary": (("the narration",), ("the interviews",)),
    "fantasy": (("the magic",), ("the dragons",)),
    "mystery": (("the final reveal",), ("the clues",)),
}
_GENRE_KEYS = {
    "horror": "monster scares", "comedy": "humor jokes", "drama": "conflict tearful",
    "thriller": "suspense twists", "western": "frontier gunfights", "romance": "love romantic",
    "musical": "choreography songs", "documentary": "narration interviews", "fantasy": "magic dragons",
    "mystery": "reveal clues",
}
# key word -> genre (e.g. "jokes" -> "comedy")
GENRE_KEYWORDS: dict[str, str] = {word: genre for genre, words in _GENRE_KEYS.items() for word in words.split()}

# --- sentiment lexicon -----------------------------------------------------------------------------
# Word -> polarity. Strong words are +-1, mild ones +-0.5. Every polar word appears in exactly one
# slot class below, so the generators can pick a filler by polarity.
_STRONG_POS_ADJ = "great brilliant wonderful superb excellent amazing outstanding stunning perfect fantastic terrific masterful"
_MILD_POS_ADJ = "good nice solid decent pleasant charming fun clever fresh enjoyable engaging likable sweet lovely"
_STRONG_NEG_ADJ = "awful terrible horrible dreadful unbearable pathetic atrocious disastrous abysmal lifeless painful bad"
_MILD_NEG_ADJ = "weak dull boring flat messy clumsy bland tedious predictable forgettable uneven slow tired silly"
_NEUTRAL_ADJ = "long short loud quiet simple dark familiar unusual traditional modern colorful serious"

LEXICON: dict[str, float] = {}
for _words, _value in (
    (_STRONG_POS_ADJ, 1.0),
    (_MILD_POS_ADJ, 0.5),
    (_STRONG_NEG_ADJ, -1.0),
    (_MILD_NEG_ADJ, -0.5),
    # verbs, past ("i loved the plot.") and base ("i did not enjoy the plot.", "fans will adore it.")
    ("loved adored", 1.0),
    ("enjoyed liked admired appreciated", 0.5),
    ("hated despised", -1.0),
    ("disliked", -0.5),
    ("adore", 1.0),
    ("enjoy like recommend", 0.5),
    ("dislike", -0.5),
    ("hate", -1.0),
    # "as a {GENRE} film, it {GVERB}."
    ("shines soars", 1.0),
    ("works succeeds", 0.5),
    ("fails stumbles", -0.5),
    ("flops collapses", -1.0),
    # "{SUBJ} is {NOUN}."
    ("masterpiece gem triumph delight joy", 1.0),
    ("treat", 0.5),
    ("mess letdown bore", -0.5),
    ("disaster failure waste", -1.0),
):
    for _w in _words.split():
        LEXICON[_w] = _value

INTENSIFIERS = frozenset("very really truly quite extremely".split())  # x1.5, clipped to [-1, 1]
DIMINISHERS = frozenset("somewhat slightly".split())  # x0.5
NEGATORS = frozenset("not never".split())  # flips the next polar word of the clause, x0.75

# --- slot classes ----------------------------------------------------------------------------------
GENERIC_ASPECTS_SG = (
    "the plot", "the story", "the acting", "the script", "the dialogue", "the pacing", "the ending",
    "the opening", "the direction", "the editing", "the music", "the soundtrack", "the camera work",
    "the lighting", "the cast", "the premise", "the final act", "the first half", "the second half",
)
GENERIC_ASPECTS_PL = ("the characters", "the visuals", "the costumes", "the effects", "the sets", "the side characters")

CLASSES: dict[str, tuple[str, ...]] = {
    "ASP_SG": GENERIC_ASPECTS_SG + tuple(p for sg, _ in GENRE_ASPECTS.values() for p in sg),
    "ASP_PL": GENERIC_ASPECTS_PL + tuple(p for _, pl in GENRE_ASPECTS.values() for p in pl),
    "ADJ": tuple((_STRONG_POS_ADJ + " " + _MILD_POS_ADJ + " " + _STRONG_NEG_ADJ + " " + _MILD_NEG_ADJ).split()),
    "NADJ": tuple(_NEUTRAL_ADJ.split()),
    "INT": tuple(sorted(INTENSIFIERS)),
    "DIM": tuple(sorted(DIMINISHERS)),
    "VPAST": ("loved", "adored", "enjoyed", "liked", "admired", "appreciated", "hated", "despised", "disliked"),
    "VBASE": ("enjoy", "like"),
    "FANVERB": ("adore", "enjoy", "dislike", "hate"),
    "GVERB": ("shines", "soars", "works", "succeeds", "fails", "stumbles", "flops", "collapses"),
    "NOUN": (
        "a masterpiece", "a gem", "a triumph", "a delight", "a joy", "a treat",
        "a mess", "a letdown", "a bore", "a disaster", "a failure", "a waste of time",
    ),
    "SUBJ": ("the film", "this film", "the movie", "this movie", "it"),
    "AUDIENCE": ("everyone", "anyone", "my friends", "families", "fans of the genre"),
    "GENRE": GENRES,
    "ACTOR": ACTORS,
    "N": tuple(str(r) for r in RATINGS),
    "ROLE": ("teacher", "soldier", "doctor", "farmer", "thief", "pilot", "nurse", "lawyer", "painter", "sailor", "widow", "banker"),
    "WHEN": ("last week", "last night", "on sunday", "with friends", "at home", "at the cinema", "on a plane", "with my family"),
    "DURATION": ("two hours", "ninety minutes", "three hours", "one hundred minutes"),
    "PLACE": ("a small town", "a big city", "the mountains", "a quiet village", "the desert", "a hospital", "a school", "the future", "the past"),
}

# --- templates -------------------------------------------------------------------------------------
PROMPT_TEMPLATES = (
    "review of a {GENRE} film starring {ACTOR}. rating {N} out of 5.",
    "a {GENRE} film starring {ACTOR}. the critic rates it {N} out of 5.",
    "film review. genre {GENRE}. lead {ACTOR}. rating {N} out of 5.",
)

# Completion sentences by kind. Polar kinds carry one polar slot (ADJ, VPAST, VBASE, FANVERB, GVERB,
# NOUN or the verb "recommend") whose filler the generator picks by polarity; "mixed" carries two.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "opinion": (
        "{ASP_SG} was {ADJ}.",
        "{ASP_PL} were {ADJ}.",
        "{ASP_SG} and {ASP_SG} were {ADJ}.",
        "i {VPAST} {ASP_SG}.",
        "i {VPAST} {ASP_PL}.",
        "{SUBJ} is {NOUN}.",
        "overall, it was {ADJ}.",
        "it is a {GENRE} film with {ADJ} moments.",
        "as a {GENRE} film, it {GVERB}.",
        "fans of {GENRE} films will {FANVERB} it.",
        "{ACTOR} was {ADJ} in the lead role.",
        "the performance by {ACTOR} was {ADJ}.",
    ),
    "intensified": (
        "{ASP_SG} was {INT} {ADJ}.",
        "{ASP_PL} were {INT} {ADJ}.",
        "overall, it was {INT} {ADJ}.",
        "{ACTOR} was {INT} {ADJ} in the lead role.",
    ),
    "diminished": (  # strong word, half strength
        "{ASP_SG} was {DIM} {ADJ}.",
        "{ASP_PL} were {DIM} {ADJ}.",
    ),
    "negated": (  # polar word of the opposite sign, x0.75 after the flip
        "{ASP_SG} was not {ADJ}.",
        "{ASP_PL} were not {ADJ}.",
        "i did not {VBASE} {ASP_SG}.",
        "{ACTOR} was not {ADJ} in the lead role.",
    ),
    "recommend": ("i would recommend it to {AUDIENCE}.",),  # +0.5
    "not_recommend": ("i would not recommend it to {AUDIENCE}.",),  # -0.375
    "mixed": (  # ADJ and ADJ2 of opposite signs
        "{ASP_SG} was {ADJ}, but {ASP_SG} was {ADJ2}.",
        "{ASP_PL} were {ADJ}, but {ASP_SG} was {ADJ2}.",
        "{ASP_SG} was {ADJ} but {ADJ2}.",
    ),
    "neutral": (
        "{ASP_SG} was {NADJ}.",
        "{ASP_PL} were {NADJ}.",
        "i saw it {WHEN}.",
        "i watched it {WHEN}.",
        "{SUBJ} runs about {DURATION}.",
        "it is set in {PLACE}.",
        "the story takes place in {PLACE}.",
    ),
    "genre_fact": (
        "it is a {GENRE} film.",
        "this is a {GENRE} film at heart.",
        "{GASP_SG} is the main draw.",
        "{GASP_PL} are the main draw.",
    ),
    "actor_fact": (
        "{ACTOR} plays the lead.",
        "{ACTOR} stars as a {ROLE}.",
        "{ACTOR} plays a {ROLE}.",
    ),
    "rating_fact": (
        "i give it {N} out of 5.",
        "my rating is {N} out of 5.",
        "{N} out of 5 from me.",
    ),
}
# Slots filled from another slot's class.
SLOT_ALIASES = {"ADJ2": "ADJ", "GASP_SG": "ASP_SG", "GASP_PL": "ASP_PL"}

_TOKEN_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
_SLOT_RE = re.compile(r"\{([A-Z_0-9]+)\}")


def tokenize_words(text: str) -> list[str]:
    """Lower-cased words, numbers and single punctuation marks, in order (the scorers' view of text)."""
    return _TOKEN_RE.findall(text.lower())


def template_slots(template: str) -> list[str]:
    """Slot names of ``template`` in order (``"{ASP_SG} was {ADJ}."`` -> ``["ASP_SG", "ADJ"]``)."""
    return _SLOT_RE.findall(template)


def _class(slot: str) -> tuple[str, ...]:
    return CLASSES[SLOT_ALIASES.get(slot, slot)]


def _template_positions(template: str) -> list[list[tuple[str, ...]]]:
    """A template as a list of positions, each the set of token sequences that can fill it."""
    positions: list[list[tuple[str, ...]]] = []
    for piece in re.split(r"(\{[A-Z_0-9]+\})", template):
        match = _SLOT_RE.fullmatch(piece)
        if match:
            positions.append([tuple(tokenize_words(f)) for f in _class(match.group(1))])
        else:
            positions.extend([(tok,)] for tok in tokenize_words(piece))
    return positions


@lru_cache(maxsize=1)
def world_words() -> tuple[str, ...]:
    """Every word (not punctuation) the world's prompts and completions use, in a fixed order."""
    seen: dict[str, None] = {}
    texts = [*PROMPT_TEMPLATES, *(t for ts in TEMPLATES.values() for t in ts)]
    texts += [f for fillers in CLASSES.values() for f in fillers]
    for text in texts:
        for tok in tokenize_words(_SLOT_RE.sub(" ", text)):
            if tok.isalnum():
                seen.setdefault(tok, None)
    return tuple(seen)


@lru_cache(maxsize=1)
def valid_bigrams() -> frozenset[tuple[str, str]]:
    """All adjacent token pairs the completion templates can produce, with ``"<s>"`` before a sentence.

    A sentence's share of valid bigrams is the grammar term of the fluency scorer.
    """
    pairs: set[tuple[str, str]] = set()
    for template in (t for ts in TEMPLATES.values() for t in ts):
        positions = _template_positions(template)
        previous_last = {"<s>"}
        for fillers in positions:
            for filler in fillers:
                pairs.update((a, filler[0]) for a in previous_last)
                pairs.update(zip(filler, filler[1:]))
            previous_last = {filler[-1] for filler in fillers}
    return frozenset(pairs)


@lru_cache(maxsize=1)
def content_words() -> frozenset[str]:
    """Words whose reuse across sentences reads as repetition: polar words, aspect nouns and roles."""
    aspects = {p.split()[-1] for p in (*CLASSES["ASP_SG"], *CLASSES["ASP_PL"])}
    return frozenset(LEXICON) | frozenset(aspects) | frozenset(GENRE_KEYWORDS) | frozenset(CLASSES["ROLE"])
