"""Verifiable tasks of the embedded world: rewards exactly checkable from the prompt (RL with verifiable rewards).

Unlike the gold scorers (graded, sentence-level, partly a matter of taste), a verifiable task has a rule
with a right answer, in the spirit of math answers checked against a key or code checked by unit tests
(Lambert et al. 2024, "Tulu 3", RLVR; DeepSeek-R1's rule-based rewards):

* ``states_rating``: the review states the prompt's star rating ("... 4 out of 5", "4 stars") and
  states no other rating. 1.0 if so, else 0.0. 17% of the default world's SFT demonstrations do (a
  ``rating_fact`` sentence), so an SFT policy solves it part of the time: there is signal to learn from,
  and a group of samples often mixes successes and failures (what GRPO needs).
* ``states_facts``: the review names the prompt's genre, lead actor and rating, and no wrong value of
  any of them. Harder: 2% of the demonstrations do.

Both read the facts with :func:`~rlhf_lightning.synthetic.scorers.parse_prompt` and the completion's
claims with the same word-level rules the consistency scorer uses, so "right" means the same thing here
and in the gold scores.
"""

from __future__ import annotations

from typing import Callable

from rlhf_lightning.synthetic.lexicon import ACTORS, GENRES, tokenize_words
from rlhf_lightning.synthetic.scorers import _rating_claims, parse_prompt

__all__ = ["VERIFIABLE_TASKS", "states_rating", "states_facts", "verify"]

_GENRES = frozenset(GENRES)
_ACTORS = frozenset(ACTORS)


def states_rating(prompt: str, completion: str) -> float:
    """1.0 when ``completion`` states the prompt's rating and no other rating, else 0.0.

    A prompt without a rating has no right answer: 0.0.
    """
    rating = parse_prompt(prompt).rating
    if rating is None:
        return 0.0
    claims = _rating_claims(tokenize_words(completion))
    return float(bool(claims) and all(claim == rating for claim in claims))


def states_facts(prompt: str, completion: str) -> float:
    """1.0 when ``completion`` names the prompt's genre, actor and rating, and no wrong genre, actor or rating."""
    facts = parse_prompt(prompt)
    if None in facts:
        return 0.0
    tokens = tokenize_words(completion)
    genres = {t for t in tokens if t in _GENRES}
    actors = {t for t in tokens if t in _ACTORS}
    ratings = set(_rating_claims(tokens))
    return float(genres == {facts.genre} and actors == {facts.actor} and ratings == {facts.rating})


VERIFIABLE_TASKS: dict[str, Callable[[str, str], float]] = {
    "states_rating": states_rating,
    "states_facts": states_facts,
}


def verify(task: str, prompt: str, completion: str) -> float:
    """The 0/1 reward of ``task`` for one completion."""
    try:
        rule = VERIFIABLE_TASKS[task]
    except KeyError:
        raise ValueError(f"Unknown verifiable task {task!r}; choose from {sorted(VERIFIABLE_TASKS)}") from None
    return rule(prompt, completion)
