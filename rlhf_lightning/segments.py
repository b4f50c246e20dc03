"""Segmentation of completions and the mapping from character offsets to policy tokens (Fine-Grained RLHF).

Fine-Grained RLHF (Wu et al., 2023) pays a reward at the end of every segment (sentence, sub-sentence)
instead of once per sequence. Reward sources work on text, the policy on tokens, so two steps meet in
the middle:

1. a *segmenter* returns character spans ``(start, end)`` over the completion string
   (``completion[start:end]`` is the segment, final punctuation included, no surrounding whitespace);
2. :func:`token_char_ends` gives, for each completion token, how many characters of the decoded
   completion it completes, and :func:`char_ends_to_token_indices` maps a segment's ``end`` to its
   last token (the first token whose decoded prefix covers ``end``). :func:`completion_to_shifted_grid`
   turns completion-token indices into columns of a :class:`~rlhf_lightning.rollout.Rollout`'s
   ``(N, T')`` grid.

Segmenters (names used in configs):

``sentence``
    Ends after a run of ``.``, ``!`` or ``?`` ("Wow!!" is one sentence). A trailing fragment without
    final punctuation is a last, truncated segment. Abbreviations and decimals ("3.5") are not special
    cased: the embedded world never writes them; pass another segmenter for real text.
``sub_sentence``
    The sentences, each split after ``,``, ``;``, ``.``, ``!``, ``?``; a piece shorter than
    ``min_words`` words (or ``min_chars`` characters) is merged into the next piece of its sentence, or
    into the previous one when it is the sentence's last. Pieces never cross a sentence boundary, so a
    sentence shorter than the minimum is one segment (the paper's sub-sentences are clauses of a sentence).
``sequence``
    One segment, ``(0, len(completion))``, also for an empty completion: a sequence-level reward must be
    paid even when nothing was said (the policy did act: it emitted EOS). Fine-Grained modules put this
    segment's reward on the *last generated token* (EOS when the completion finished), exactly where
    PPO puts its sequence score; sentence-level segments of an empty completion do not exist.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Callable, Sequence

import torch

__all__ = [
    "Span",
    "Segmenter",
    "GRANULARITIES",
    "sentence_spans",
    "sub_sentence_spans",
    "sequence_spans",
    "get_segmenter",
    "token_char_ends",
    "char_ends_to_token_indices",
    "completion_to_shifted_grid",
]

Span = tuple[int, int]
Segmenter = Callable[[str], list[Span]]
GRANULARITIES = ("sentence", "sub_sentence", "sequence")

_SENTENCE_MARKS = ".!?"
_CLAUSE_MARKS = ",;.!?"


def _pieces(text: str, marks: str, offset: int = 0) -> list[Span]:
    """Spans of ``text`` ending after a run of ``marks`` (or at the end), without surrounding whitespace."""
    m = re.escape(marks)
    # either a run of marks on its own, or text up to and including its run of marks (or the end)
    pattern = re.compile(rf"[{m}]+|[^\s{m}][^{m}]*(?:[{m}]+|$)")
    spans: list[Span] = []
    for match in pattern.finditer(text):
        start, end = match.span()
        end = start + len(match.group().rstrip())  # a truncated piece must not end in whitespace
        spans.append((offset + start, offset + end))
    return spans


def sentence_spans(text: str) -> list[Span]:
    """Sentences of ``text`` as character spans (see the module docstring)."""
    return _pieces(text, _SENTENCE_MARKS)


def _long_enough(text: str, min_words: int, min_chars: int) -> bool:
    return len(re.findall(r"\w+", text)) >= min_words and len(text) >= min_chars


def sub_sentence_spans(text: str, *, min_words: int = 3, min_chars: int = 0) -> list[Span]:
    """Clauses of each sentence as character spans; short clauses merge forward (backward at the end).

    Args:
        text: the completion.
        min_words: a piece with fewer ``\\w+`` words is merged with a neighbour (1 disables merging).
        min_chars: likewise for characters (0 disables it).
    """
    spans: list[Span] = []
    for s_start, s_end in sentence_spans(text):
        merged: list[Span] = []
        pending: int | None = None  # start of short pieces waiting to be merged into the next one
        for start, end in _pieces(text[s_start:s_end], _CLAUSE_MARKS, offset=s_start):
            start = start if pending is None else pending
            if _long_enough(text[start:end], min_words, min_chars):
                merged.append((start, end))
                pending = None
            else:
                pending = start
        if pending is not None:  # the sentence ends with a short piece: glue it to the previous clause
            if merged:
                merged[-1] = (merged[-1][0], s_end)
            else:
                merged.append((pending, s_end))
        spans.extend(merged)
    return spans


def sequence_spans(text: str) -> list[Span]:
    """The whole completion as one segment, ``[(0, len(text))]`` (also for ``""``; see the module docstring)."""
    return [(0, len(text))]


def get_segmenter(granularity: str, **kwargs) -> Segmenter:
    """The segmenter called ``granularity`` (one of :data:`GRANULARITIES`), with options bound.

    Only ``sub_sentence`` takes options (``min_words``, ``min_chars``).
    """
    if granularity == "sentence":
        segmenter: Segmenter = sentence_spans
    elif granularity == "sub_sentence":
        return partial(sub_sentence_spans, **kwargs)
    elif granularity == "sequence":
        segmenter = sequence_spans
    else:
        raise ValueError(f"Unknown granularity {granularity!r}; choose from {', '.join(GRANULARITIES)}.")
    if kwargs:
        raise TypeError(f"The {granularity!r} segmenter takes no options, got {sorted(kwargs)}")
    return segmenter


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def token_char_ends(tokenizer, token_ids: Sequence[int], text: str | None = None) -> list[int]:
    """For each completion token, how many leading characters of the decoded completion it has completed.

    ``ends[j]`` is the length of the longest prefix of ``text`` that ``decode(token_ids[:j + 1])``
    reproduces exactly, made non-decreasing. Decoding growing prefixes (rather than single tokens)
    lets the tokenizer's own decoder handle merged spaces (SentencePiece ``▁``, byte-level ``Ġ``,
    WordPiece clean-up of " ."), and comparing with ``text`` (rather than taking the length) keeps a
    byte-level token that ends inside a multi-byte character — decoded as U+FFFD — from counting as
    having produced that character. Special tokens (EOS) decode to nothing and complete nothing new.

    Args:
        tokenizer: any HF tokenizer (the policy's).
        token_ids: the generated ids of one completion, up to and including EOS (no padding).
        text: the decoded completion; ``decode(token_ids, skip_special_tokens=True)`` when None (pass
            the rollout's ``completion_text`` to be sure the offsets refer to the text that was scored).

    Returns:
        ``len(token_ids)`` non-decreasing ints in ``[0, len(text)]``.
    """
    ids = [int(i) for i in token_ids]
    if text is None:
        text = tokenizer.decode(ids, skip_special_tokens=True)
    if not ids:
        return []
    prefixes = tokenizer.batch_decode([ids[: j + 1] for j in range(len(ids))], skip_special_tokens=True)
    ends: list[int] = []
    covered = 0
    for prefix in prefixes:
        covered = max(covered, _common_prefix_length(prefix, text))
        ends.append(covered)
    return ends


def char_ends_to_token_indices(char_ends: Sequence[int], token_ends: Sequence[int]) -> list[int]:
    """Index of the last token of each segment: the first token whose decoded prefix covers ``char_end``.

    Args:
        char_ends: segment end offsets (exclusive) into the completion text.
        token_ends: :func:`token_char_ends` of the completion (at least one token).

    A segment end of 0 (an empty segment at the start) maps to the first token; an end no token covers
    (the decoded text disagrees with the scored text) maps to the last token rather than being dropped.
    """
    if not token_ends:
        raise ValueError("A completion has at least one token (EOS); got none.")
    ends = torch.as_tensor(list(token_ends), dtype=torch.long)
    targets = torch.as_tensor(list(char_ends), dtype=torch.long)
    # searchsorted(left): the first j with ends[j] >= target
    index = torch.searchsorted(ends, targets, right=False)
    return index.clamp(max=len(token_ends) - 1).tolist()


def completion_to_shifted_grid(token_index: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Column on a rollout's shifted ``(N, T')`` grid of the action that produced completion token ``j``.

    Completion token ``j`` sits at ``input_ids[:, P + j]``; the action producing it is column
    ``P - 1 + j`` (the last prompt position predicts the first completion token, see
    :mod:`rlhf_lightning.rollout`).
    """
    return token_index + (prompt_length - 1)
