"""Gold scorers of the embedded world: sentiment, consistency and fluency, per sentence and per sequence.

Every scorer reads ``(prompt, completion)`` text and returns a :class:`SentenceScores`: one score per
sentence of the completion, the character span ``(start, end)`` of each sentence inside the completion
string (``completion[start:end]`` is the sentence, final punctuation included) and a sequence-level
``total``. Fine-grained RLHF puts ``sentence_scores[i]`` on the token that ends ``spans[i]``; every other
method uses ``total``.

Sentences (:func:`split_sentences`) end at a run of ``.``, ``!`` or ``?``; a trailing fragment without
final punctuation is a (truncated) sentence too. A sentence that repeats an earlier one word for word
says nothing new and scores 0 in sentiment and consistency and 0 in fluency, so no objective rewards
repetition.

``sentiment``, in [-1, 1]
    Lexicon polarity (``lexicon.LEXICON``: strong words +-1, mild +-0.5). An intensifier right before a
    polar word multiplies it by 1.5, a diminisher by 0.5, a negator earlier in the clause flips it and
    multiplies by 0.75; values are clipped to [-1, 1]. A sentence scores the mean over its polar words (0
    without any), so stacking positive words in one sentence gains nothing. ``total`` is the mean over
    sentences.

``consistency``, in [-1, 1]
    Agreement with the facts stated in the prompt (genre, lead actor, star rating; :func:`parse_prompt`).
    Each claim in a sentence is a component: a genre word or a genre's signature element
    (``lexicon.GENRE_ASPECTS``: "the jokes" claims a comedy) is +1 if it matches the prompt's genre and -1
    otherwise; an actor name likewise; "N out of 5" scores ``1 - |N - rating|`` clipped at -1; the
    sentence's sentiment ``s`` (when it has polar words) scores ``1 - |s - e|`` with the rating's expected
    polarity ``e = (rating - 3) / 2``. A sentence is as consistent as its least consistent claim when any
    claim is negative, else the mean of its claims; a sentence with no claim scores 0. ``total`` is the
    mean over sentences. On prompts rated 1 or 2 this is in direct conflict with ``sentiment``: the
    most positive review is the least consistent one.

``fluency``, in [0, 1]
    How well a sentence follows the world's grammar: the share of its adjacent token pairs the templates
    can produce (``lexicon.valid_bigrams``), times 0.5 when the final punctuation is missing, times a
    length factor (3-16 words is full marks), minus 0.25 per content word repeated inside the sentence
    (0.5 if immediately repeated) and 0.15 per polar word or aspect already used by an earlier sentence.
    ``total`` is the mean over sentences times a count factor: 1 for 2-5 sentences, 0.8 for one, and
    ``1 - 0.1 (n - 5)`` (at least 0.3) above five.

An empty (or whitespace-only) completion gets each objective's minimum (-1, -1, 0) as ``total``, so no
objective prefers saying nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, NamedTuple, Protocol, Sequence, runtime_checkable

from rlhf_lightning.synthetic.lexicon import (
    ACTORS,
    DIMINISHERS,
    GENRE_KEYWORDS,
    GENRES,
    INTENSIFIERS,
    LEXICON,
    NEGATORS,
    content_words,
    tokenize_words,
    valid_bigrams,
)

__all__ = [
    "GOLD_OBJECTIVES",
    "SCORE_RANGES",
    "SentenceScores",
    "GoldScorer",
    "Facts",
    "parse_prompt",
    "split_sentences",
    "sentence_sentiment",
    "SentimentScorer",
    "ConsistencyScorer",
    "FluencyScorer",
    "get_scorer",
    "score_texts",
    "score_all",
]

GOLD_OBJECTIVES = ("sentiment", "consistency", "fluency")
SCORE_RANGES = {"sentiment": (-1.0, 1.0), "consistency": (-1.0, 1.0), "fluency": (0.0, 1.0)}

_TERMINALS = frozenset(".!?")
# a run of final marks on its own, or text up to (and including) its final marks or the end
_SENTENCE_RE = re.compile(r"[.!?]+|[^\s.!?][^.!?]*(?:[.!?]+|$)")
_CLAUSE_BREAKS = frozenset({",", ";", "but", "and", ".", "!", "?"})
_GENRE_SET = frozenset(GENRES)
_ACTOR_SET = frozenset(ACTORS)


@dataclass(frozen=True)
class SentenceScores:
    """Scores of one completion.

    Attributes:
        total: sequence-level score (see the module docstring per objective).
        sentence_scores: one score per sentence, in order.
        spans: ``(start, end)`` character span of each sentence in the completion string.
    """

    total: float
    sentence_scores: list[float]
    spans: list[tuple[int, int]]


@runtime_checkable
class GoldScorer(Protocol):
    name: str

    def score(self, prompt: str, completion: str) -> SentenceScores: ...


class Facts(NamedTuple):
    """Facts a prompt states; ``None`` where the prompt does not say."""

    genre: str | None
    actor: str | None
    rating: int | None


def _rating_claims(tokens: Sequence[str]) -> list[int]:
    """Numbers 1-9 followed by ``out`` ("2 out of 5") or ``star(s)``."""
    return [
        int(tok)
        for tok, nxt in zip(tokens, tokens[1:])
        if len(tok) == 1 and tok.isdigit() and nxt in ("out", "star", "stars")
    ]


@lru_cache(maxsize=4096)
def parse_prompt(prompt: str) -> Facts:
    """The genre, lead actor and rating (first of each) a prompt states."""
    tokens = tokenize_words(prompt)
    genre = next((t for t in tokens if t in _GENRE_SET), None)
    actor = next((t for t in tokens if t in _ACTOR_SET), None)
    ratings = _rating_claims(tokens)
    return Facts(genre, actor, ratings[0] if ratings else None)


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the sentences of ``text``.

    A sentence starts at its first non-space character and ends after its run of final punctuation
    (``.``, ``!``, ``?``); a trailing fragment without final punctuation is a sentence too (truncated).
    ``text[start:end]`` never has surrounding whitespace.
    """
    spans: list[tuple[int, int]] = []
    for match in _SENTENCE_RE.finditer(text):
        start, end = match.span()
        if text[end - 1] not in _TERMINALS:  # truncated: drop trailing whitespace
            end = start + len(match.group().rstrip())
        spans.append((start, end))
    return spans


@lru_cache(maxsize=65536)
def sentence_sentiment(tokens: tuple[str, ...]) -> tuple[float, int]:
    """(mean polarity, number of polar words) of one sentence's tokens (a tuple, for the cache)."""
    values: list[float] = []
    mult, negated = 1.0, False
    for tok in tokens:
        if tok in NEGATORS:
            negated = True
            continue
        if tok in INTENSIFIERS:
            mult *= 1.5
            continue
        if tok in DIMINISHERS:
            mult *= 0.5
            continue
        value = LEXICON.get(tok)
        if value is not None:
            value *= mult
            if negated:
                value *= -0.75
            values.append(max(-1.0, min(1.0, value)))
            negated = False
        elif tok in _CLAUSE_BREAKS:
            negated = False
        mult = 1.0  # a modifier only acts on the word right after it
    if not values:
        return 0.0, 0
    return sum(values) / len(values), len(values)


class _Sentence(NamedTuple):
    span: tuple[int, int]
    tokens: tuple[str, ...]
    terminated: bool
    duplicate: bool  # same tokens as an earlier sentence


@lru_cache(maxsize=65536)
def _sentence_tokens(sentence: str) -> tuple[str, ...]:
    return tuple(tokenize_words(sentence))


def _analyse(completion: str) -> list[_Sentence]:
    sentences: list[_Sentence] = []
    seen: set[tuple[str, ...]] = set()
    for start, end in split_sentences(completion):
        tokens = _sentence_tokens(completion[start:end])
        # "great!!" and "great." are the same sentence
        key = tuple(t for t in tokens if t not in _TERMINALS)
        sentences.append(_Sentence((start, end), tokens, completion[end - 1] in _TERMINALS, key in seen))
        seen.add(key)
    return sentences


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _finish(sentences: list[_Sentence], scores: list[float], total: float | None, empty: float) -> SentenceScores:
    if not sentences:
        return SentenceScores(empty, [], [])
    return SentenceScores(_mean(scores) if total is None else total, scores, [s.span for s in sentences])


class SentimentScorer:
    """Lexicon positivity in [-1, 1] per sentence; ``total`` = mean over sentences (see module docstring)."""

    name = "sentiment"
    low, high = SCORE_RANGES["sentiment"]

    def score(self, prompt: str, completion: str) -> SentenceScores:
        return self.score_sentences(_analyse(completion))

    def score_sentences(self, sentences: list[_Sentence]) -> SentenceScores:
        scores = [0.0 if s.duplicate else sentence_sentiment(s.tokens)[0] for s in sentences]
        return _finish(sentences, scores, None, self.low)


class ConsistencyScorer:
    """Agreement with the prompt's facts in [-1, 1] per sentence; ``total`` = mean (see module docstring)."""

    name = "consistency"
    low, high = SCORE_RANGES["consistency"]

    def score(self, prompt: str, completion: str) -> SentenceScores:
        return self.score_sentences(parse_prompt(prompt), _analyse(completion))

    @staticmethod
    @lru_cache(maxsize=65536)
    def sentence_score(facts: Facts, tokens: tuple[str, ...]) -> float:
        claims: list[float] = []
        for tok in tokens:
            genre = tok if tok in _GENRE_SET else GENRE_KEYWORDS.get(tok)
            if genre is not None and facts.genre is not None:
                claims.append(1.0 if genre == facts.genre else -1.0)
            elif tok in _ACTOR_SET and facts.actor is not None:
                claims.append(1.0 if tok == facts.actor else -1.0)
        if facts.rating is not None:
            claims += [max(-1.0, 1.0 - abs(r - facts.rating)) for r in _rating_claims(tokens)]
            sentiment, n_polar = sentence_sentiment(tokens)
            if n_polar:
                expected = (facts.rating - 3) / 2
                claims.append(1.0 - abs(sentiment - expected))
        if not claims:
            return 0.0
        worst = min(claims)
        return worst if worst < 0 else _mean(claims)

    def score_sentences(self, facts: Facts, sentences: list[_Sentence]) -> SentenceScores:
        scores = [0.0 if s.duplicate else self.sentence_score(facts, s.tokens) for s in sentences]
        return _finish(sentences, scores, None, self.low)


class FluencyScorer:
    """Grammar, completeness and non-repetition in [0, 1] per sentence (see module docstring)."""

    name = "fluency"
    low, high = SCORE_RANGES["fluency"]
    min_words, max_words = 3, 16
    best_count = (2, 5)

    def score(self, prompt: str, completion: str) -> SentenceScores:
        return self.score_sentences(_analyse(completion))

    def sentence_score(self, tokens: tuple[str, ...], terminated: bool, used_before: set[str]) -> float:
        score, content = _fluency_within(tokens, terminated, self.min_words, self.max_words)
        score -= 0.15 * len(used_before.intersection(content))
        return max(0.0, min(1.0, score))

    def count_factor(self, n: int) -> float:
        low, high = self.best_count
        if n < low:
            return 0.8
        if n > high:
            return max(0.3, 1.0 - 0.1 * (n - high))
        return 1.0

    def score_sentences(self, sentences: list[_Sentence]) -> SentenceScores:
        used: set[str] = set()
        scores: list[float] = []
        for s in sentences:
            scores.append(0.0 if s.duplicate else self.sentence_score(s.tokens, s.terminated, used))
            used.update(_fluency_within(s.tokens, s.terminated, self.min_words, self.max_words)[1])
        total = _mean(scores) * self.count_factor(len(sentences)) if sentences else None
        return _finish(sentences, scores, total, self.low)


@lru_cache(maxsize=65536)
def _fluency_within(tokens: tuple[str, ...], terminated: bool, min_words: int, max_words: int) -> tuple[float, frozenset[str]]:
    """(unclipped fluency of a sentence on its own, the content words it uses)."""
    words = [t for t in tokens if t.isalnum()]
    if not words:
        return 0.0, frozenset()
    bigrams = valid_bigrams()
    # Any final mark reads as the templates' "." for the grammar term.
    body = ["<s>", *(("." if t in _TERMINALS else t) for t in tokens)]
    grammar = sum(p in bigrams for p in zip(body, body[1:])) / (len(body) - 1)
    n = len(words)
    if n < min_words:
        length = n / min_words
    elif n > max_words:
        length = max(0.0, 1.0 - (n - max_words) / max_words)
    else:
        length = 1.0
    score = grammar * length * (1.0 if terminated else 0.5)
    content = content_words()
    seen: set[str] = set()
    for prev, word in zip([None, *words], words):
        if word == prev:
            score -= 0.5
        elif word in content and word in seen:
            score -= 0.25
        seen.add(word)
    return score, frozenset(seen & content)


_SCORERS: dict[str, Callable[[], GoldScorer]] = {
    "sentiment": SentimentScorer,
    "consistency": ConsistencyScorer,
    "fluency": FluencyScorer,
}


def get_scorer(name: str) -> GoldScorer:
    """The gold scorer called ``name`` (one of :data:`GOLD_OBJECTIVES`)."""
    try:
        return _SCORERS[name]()
    except KeyError:
        raise ValueError(f"Unknown gold objective {name!r}; choose from {', '.join(GOLD_OBJECTIVES)}.") from None


def score_texts(name: str, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Sequence-level gold score ``name`` of each ``(prompt, completion)`` pair."""
    if len(prompts) != len(completions):
        raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions.")
    scorer = get_scorer(name)
    return [scorer.score(p, c).total for p, c in zip(prompts, completions)]


_SENTIMENT, _CONSISTENCY, _FLUENCY = SentimentScorer(), ConsistencyScorer(), FluencyScorer()


def score_all(prompt: str, completion: str) -> dict[str, SentenceScores]:
    """Every gold objective of one completion, sharing the sentence split (``{name: SentenceScores}``)."""
    sentences = _analyse(completion)
    return {
        "sentiment": _SENTIMENT.score_sentences(sentences),
        "consistency": _CONSISTENCY.score_sentences(parse_prompt(prompt), sentences),
        "fluency": _FLUENCY.score_sentences(sentences),
    }
