"""Fine-grained (segment-level) rewards from several sources at several granularities (Wu et al., 2023).

A fine-grained reward is a list of :class:`SegmentRewardSpec` — ``(source, granularity, weight, name)``.
For every completion each spec segments the text (:mod:`rlhf_lightning.segments`), its source scores
every segment, and the weighted score is paid on the segment's last token. :class:`FineGrainedReward`
does this for a batch in two stages, so that the text-only part can run inside a rollout's reward call:

1. :meth:`FineGrainedReward.score` — text only: per spec, ``(char_end, weighted reward)`` per segment;
2. :meth:`FineGrainedReward.place` — with the policy's tokenizer and the completion ids: ``(N, S)``
   rewards, last-token indices and validity mask, ready for
   :func:`~rlhf_lightning.losses.dense_reward_from_segments` (which adds rewards ending on the same token).

Sources (:class:`SegmentScorer`: ``(prompts, completions, spans) -> one score per span``):

* :class:`GoldSegmentScorer` — the embedded world's gold scorers, which already score per sentence (in
  context: a repeated sentence scores 0, fluency penalises words reused from earlier sentences);
* :class:`SegmentTextScorer` — any sequence-level scorer (a :class:`~rlhf_lightning.rewards.RewardSource`
  such as a reward model, or a ``(prompt, text) -> float`` function) applied to each segment's text;
* :class:`FunctionSegmentScorer` — a ``(prompt, completion, spans) -> scores`` function;
  :class:`RepetitionPenalty` is one (additive over segments, so it has the same budget at any granularity);
* an existing :class:`~rlhf_lightning.rewards.segment.SegmentRewardSource` (which segments the text
  itself) with ``granularity="native"``.

Departures from the paper, and why: the paper trains one reward model per granularity (sub-sentence
relevance, sentence factuality, sequence completeness); here any scorer can be used at any granularity,
so that the same sources can be compared at sequence level (``scripts/fine_grained_vs_sequence.py``).
``normalize=True`` divides a source's segment scores by the number of segments, which makes its
per-episode sum the mean segment score — the scale of a sequence-level "mean over sentences" score —
so a fine-grained and a sequence-level run can be given the same reward budget. The price: a segment's
reward then depends on how many segments follow it, which GAE charges to the earlier tokens rather than
to the decision to keep writing; measured on the embedded world (docs/results/fine_grained.md), this makes
fine-grained policies write longer and stall on mean-based scores, while an un-normalised (sum) budget,
which is causal, let them learn much faster per rollout than at sequence level (one seed).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch

from rlhf_lightning.rewards.base import CallableSpec, RewardSource, _default_name, resolve_callable
from rlhf_lightning.rewards.segment import SegmentRewardSource
from rlhf_lightning.segments import (
    GRANULARITIES,
    Span,
    char_ends_to_token_indices,
    get_segmenter,
    token_char_ends,
)

__all__ = [
    "SegmentScorer",
    "GoldSegmentScorer",
    "SegmentTextScorer",
    "FunctionSegmentScorer",
    "RepetitionPenalty",
    "SegmentRewardSpec",
    "ScoredSegments",
    "SegmentRewardBatch",
    "FineGrainedReward",
]


@runtime_checkable
class SegmentScorer(Protocol):
    """``__call__(prompts, completions, spans) -> list (N) of list of floats``, one per span of each completion.

    ``spans[i]`` are ``(start, end)`` character spans over ``completions[i]`` in order; ``name`` labels logs.
    """

    name: str

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], spans: Sequence[Sequence[Span]]
    ) -> list[list[float]]: ...


def _check_lengths(name: str, spans: Sequence[Sequence[Span]], scores: Sequence[Sequence[float]]) -> list[list[float]]:
    if len(scores) != len(spans) or any(len(s) != len(p) for s, p in zip(scores, spans)):
        raise ValueError(
            f"Segment scorer {name!r} must return one score per span; got "
            f"{[len(s) for s in scores]} scores for {[len(p) for p in spans]} spans."
        )
    return [[float(v) for v in row] for row in scores]


class GoldSegmentScorer:
    """Per-sentence gold scores of the embedded world (``rlhf_lightning.synthetic``) credited to segments.

    The gold scorer scores each sentence of the completion in context; sentence ``i`` is credited to
    the first segment whose end is at or after the sentence's end, and a segment's score is the
    ``aggregate`` of the sentences credited to it (0 if none). So at ``sentence`` granularity a segment
    gets its sentence's score, at ``sub_sentence`` granularity the clause that ends a sentence gets it
    (the other clauses 0), and at ``sequence`` granularity the one segment gets the mean (or sum) over
    sentences — with ``aggregate="mean"`` that is the gold ``total`` for sentiment and consistency, and
    fluency's ``total`` without its sentence-count factor. A completion with no sentence at all (empty)
    gets the scorer's ``total`` (the objective's minimum) on each of its segments, so silence is not free.

    Args:
        objective: ``"sentiment"``, ``"consistency"`` or ``"fluency"``.
        aggregate: ``"mean"`` or ``"sum"`` of the sentence scores credited to one segment.
        name: label in logs; defaults to the objective.
    """

    def __init__(self, objective: str, aggregate: str = "mean", name: str | None = None) -> None:
        if aggregate not in ("mean", "sum"):
            raise ValueError(f"aggregate must be 'mean' or 'sum', got {aggregate!r}")
        self.objective = objective
        self.aggregate = aggregate
        self.name = name or objective
        # Imported lazily: reward sources work without the embedded world being built.
        self._scorer = importlib.import_module("rlhf_lightning.synthetic").get_scorer(objective)

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], spans: Sequence[Sequence[Span]]
    ) -> list[list[float]]:
        out: list[list[float]] = []
        for prompt, completion, segs in zip(prompts, completions, spans):
            gold = self._scorer.score(prompt, completion)
            if not gold.spans:
                out.append([float(gold.total)] * len(segs))
                continue
            credited: list[list[float]] = [[] for _ in segs]
            seg_ends = [end for _, end in segs]
            for (_, s_end), value in zip(gold.spans, gold.sentence_scores):
                k = next((k for k, e in enumerate(seg_ends) if e >= s_end), len(segs) - 1)
                if k >= 0:
                    credited[k].append(float(value))
            reduce = (lambda v: sum(v) / len(v)) if self.aggregate == "mean" else sum
            out.append([reduce(v) if v else 0.0 for v in credited])
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(objective={self.objective!r}, aggregate={self.aggregate!r})"


class SegmentTextScorer:
    """Any sequence-level scorer applied to each segment's text.

    Args:
        source: a :class:`~rlhf_lightning.rewards.RewardSource` (called once on all segments of the
            batch, e.g. a reward model) or a ``(prompt, text) -> float`` function / ``"module:attr"`` path.
        context: what the scorer sees as the prompt: ``"prompt"`` (the prompt only) or ``"prefix"``
            (the prompt plus the completion text before the segment, as the paper's segment reward
            models condition on what came before).
        name: label in logs; defaults to the source's name.
    """

    def __init__(self, source: Any, context: str = "prompt", name: str | None = None) -> None:
        if context not in ("prompt", "prefix"):
            raise ValueError(f"context must be 'prompt' or 'prefix', got {context!r}")
        source = resolve_callable(source)
        self.batched = isinstance(source, RewardSource)  # a RewardSource has a `name`; a plain function does not
        self.source = source
        self.context = context
        self.name = name or getattr(source, "name", None) or _default_name(source)

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], spans: Sequence[Sequence[Span]]
    ) -> list[list[float]]:
        flat_prompts, flat_texts = [], []
        for prompt, completion, segs in zip(prompts, completions, spans):
            for start, end in segs:
                flat_prompts.append(prompt + completion[:start] if self.context == "prefix" else prompt)
                flat_texts.append(completion[start:end])
        if self.batched:
            values = torch.as_tensor(self.source(flat_prompts, flat_texts)).flatten().tolist() if flat_texts else []
        else:
            values = [float(self.source(p, t)) for p, t in zip(flat_prompts, flat_texts)]
        out, i = [], 0
        for segs in spans:
            out.append(values[i : i + len(segs)])
            i += len(segs)
        return _check_lengths(self.name, spans, out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, context={self.context!r})"


class FunctionSegmentScorer:
    """Segment scores from ``fn(prompt, completion, spans) -> [score per span]``.

    Args:
        fn: a callable or a ``"module:attr"`` import path.
        name: label in logs; defaults to the function's name.
    """

    def __init__(self, fn: CallableSpec, name: str | None = None) -> None:
        self.fn = resolve_callable(fn)
        self.name = name or _default_name(fn)

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], spans: Sequence[Sequence[Span]]
    ) -> list[list[float]]:
        out = [list(self.fn(p, c, list(s))) for p, c, s in zip(prompts, completions, spans)]
        return _check_lengths(self.name, spans, out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class RepetitionPenalty:
    """``-penalty`` for every word of a segment that already occurred earlier in the completion.

    Counting each occurrence against everything before it makes the penalty additive over segments:
    the sum over the segments of any segmentation equals the penalty of the whole completion, so the
    same source has the same per-episode budget at sentence, sub-sentence or sequence granularity.

    Args:
        penalty: reward per repeated word (subtracted).
        vocabulary: ``"world"`` counts only the embedded world's content words (polar words, aspects,
            genres, roles — what its fluency scorer treats as repetition); ``None`` counts every word of
            at least ``min_chars`` characters (so "the", "was" do not count).
        min_chars: minimum word length when ``vocabulary`` is None.
        name: label in logs.
    """

    def __init__(self, penalty: float = 0.1, vocabulary: str | None = "world", min_chars: int = 4, name: str = "repetition") -> None:
        if vocabulary not in ("world", None):
            raise ValueError(f"vocabulary must be 'world' or None, got {vocabulary!r}")
        self.penalty = penalty
        self.min_chars = min_chars
        self.name = name
        self._words: frozenset[str] | None = None
        if vocabulary == "world":
            self._words = importlib.import_module("rlhf_lightning.synthetic.lexicon").content_words()

    def _counts(self, word: str) -> bool:
        return word in self._words if self._words is not None else len(word) >= self.min_chars

    def score_one(self, completion: str, spans: Sequence[Span]) -> list[float]:
        words = [(m.start(), m.group().lower()) for m in re.finditer(r"\w+", completion)]
        repeated_at: list[int] = []  # char offsets of repeated occurrences
        seen: set[str] = set()
        for start, word in words:
            if self._counts(word):
                if word in seen:
                    repeated_at.append(start)
                seen.add(word)
        # each repeated word is charged to the segment it starts in (or the next one, if between segments)
        out = [0.0] * len(spans)
        for offset in repeated_at:
            k = next((k for k, (_, end) in enumerate(spans) if offset < end), len(spans) - 1)
            if k >= 0:
                out[k] -= self.penalty
        return out

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], spans: Sequence[Sequence[Span]]
    ) -> list[list[float]]:
        return [self.score_one(c, s) for c, s in zip(completions, spans)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(penalty={self.penalty}, name={self.name!r})"


@dataclass
class SegmentRewardSpec:
    """One source of a fine-grained reward.

    Args:
        source: a :class:`SegmentScorer` (scores the spans it is given), or with
            ``granularity="native"`` a :class:`~rlhf_lightning.rewards.segment.SegmentRewardSource`
            that segments the text itself and returns ``(char_end, reward)`` pairs.
        granularity: ``"sentence"``, ``"sub_sentence"``, ``"sequence"`` or ``"native"``. A
            ``"sequence"`` segment is paid on the last generated token (EOS when finished), like PPO's score.
        weight: multiplies every segment score of this source.
        name: label in logs (``reward/<name>``); defaults to the source's name.
        normalize: divide the scores by the number of segments of the completion (per-episode sum =
            mean segment score; see the module docstring).
        segmenter_kwargs: options of the segmenter (``sub_sentence``: ``min_words``, ``min_chars``).
    """

    source: Any
    granularity: str = "sentence"
    weight: float = 1.0
    name: str | None = None
    normalize: bool = False
    segmenter_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.granularity not in (*GRANULARITIES, "native"):
            raise ValueError(
                f"granularity must be one of {', '.join(GRANULARITIES)} or 'native', got {self.granularity!r}"
            )
        if self.name is None:
            self.name = getattr(self.source, "name", None) or type(self.source).__name__
        self._segmenter = None if self.granularity == "native" else get_segmenter(
            self.granularity, **(self.segmenter_kwargs or {})
        )

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[tuple[int, float]]]:
        """Per completion, ``(char_end, weighted reward)`` of each segment, in order."""
        if self._segmenter is None:
            if not isinstance(self.source, SegmentRewardSource):
                raise TypeError(f"granularity='native' needs a SegmentRewardSource, got {type(self.source).__name__}")
            pairs = self.source(list(prompts), list(completions))
        else:
            spans = [self._segmenter(c) for c in completions]
            scores = _check_lengths(self.name, spans, self.source(list(prompts), list(completions), spans))
            pairs = [[(end, value) for (_, end), value in zip(s, v)] for s, v in zip(spans, scores)]
        out = []
        for row in pairs:
            scale = self.weight / len(row) if self.normalize and row else self.weight
            out.append([(int(end), scale * float(value)) for end, value in row])
        return out


@dataclass
class ScoredSegments:
    """Text-level output of :meth:`FineGrainedReward.score` for N completions.

    Fields:
        completions: the N scored texts (char offsets refer to them).
        segments: per spec (in spec order), per completion, ``[(char_end, weighted reward), ...]``.
        totals: ``(N,)`` per-episode sum of all weighted segment rewards.
        per_source: ``{name: (N,)}`` per-episode sum of each source's weighted segment rewards.
    """

    completions: list[str]
    segments: list[list[list[tuple[int, float]]]]
    totals: torch.Tensor
    per_source: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class SegmentRewardBatch:
    """Token-level placement of segment rewards (N completions, S segments over all sources, padded).

    Fields:
        rewards: ``(N, S)`` float32 weighted segment rewards (0 on padding).
        positions: ``(N, S)`` long index of each segment's last token *within the completion tokens*
            (0 on padding; add ``P - 1`` for the rollout's shifted grid).
        mask: ``(N, S)`` bool, True on real segments.
        totals: ``(N,)`` per-episode sum of the rewards.
        per_source: ``{name: (N,)}`` per-episode sum per source.
    """

    rewards: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    totals: torch.Tensor
    per_source: dict[str, torch.Tensor]


class FineGrainedReward:
    """Several segment reward sources at their granularities, summed on the tokens where segments end.

    Args:
        specs: the :class:`SegmentRewardSpec` list (source names must be unique).
    """

    def __init__(self, specs: Sequence[SegmentRewardSpec | Mapping[str, Any]]) -> None:
        self.specs = [s if isinstance(s, SegmentRewardSpec) else SegmentRewardSpec(**s) for s in specs]
        if not self.specs:
            raise ValueError("A fine-grained reward needs at least one SegmentRewardSpec.")
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"Segment reward names must be unique, got {names}; set `name` on each spec.")
        self.names = names

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> ScoredSegments:
        """Text-only stage: segment and score with every spec (no tokenizer needed)."""
        if len(prompts) != len(completions):
            raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions")
        segments = [spec.score(prompts, completions) for spec in self.specs]
        per_source = {
            spec.name: torch.tensor([sum(v for _, v in row) for row in rows], dtype=torch.float32)
            for spec, rows in zip(self.specs, segments)
        }
        totals = torch.stack(list(per_source.values())).sum(0) if per_source else torch.zeros(len(completions))
        return ScoredSegments(list(completions), segments, totals, per_source)

    def place(
        self, scored: ScoredSegments, completion_ids: Sequence[Sequence[int]], tokenizer
    ) -> SegmentRewardBatch:
        """Token stage: map every segment end to the index of its last completion token.

        Args:
            scored: output of :meth:`score`.
            completion_ids: N lists of generated ids (up to and including EOS, no padding), whose
                decoding (special tokens skipped) is ``scored.completions``.
            tokenizer: the policy's tokenizer.
        """
        n = len(scored.completions)
        if len(completion_ids) != n:
            raise ValueError(f"Got {len(completion_ids)} id rows for {n} completions")
        rows: list[list[tuple[int, float]]] = [[] for _ in range(n)]  # (token index, reward)
        for i, (ids, text) in enumerate(zip(completion_ids, scored.completions)):
            if len(ids) == 0:
                continue  # nothing was generated: no token can carry a reward
            token_ends = None
            for spec, per_spec in zip(self.specs, scored.segments):
                pairs = per_spec[i]
                if not pairs:
                    continue
                if spec.granularity == "sequence":
                    rows[i].extend((len(ids) - 1, v) for _, v in pairs)  # where PPO pays its score
                    continue
                if token_ends is None:
                    token_ends = token_char_ends(tokenizer, ids, text)
                index = char_ends_to_token_indices([end for end, _ in pairs], token_ends)
                rows[i].extend(zip(index, (v for _, v in pairs)))
        width = max([len(r) for r in rows] + [1])
        rewards = torch.zeros(n, width, dtype=torch.float32)
        positions = torch.zeros(n, width, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.bool)
        for i, row in enumerate(rows):
            for k, (j, value) in enumerate(row):
                rewards[i, k], positions[i, k], mask[i, k] = value, j, True
        return SegmentRewardBatch(rewards, positions, mask, rewards.sum(1), dict(scored.per_source))

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        completion_ids: Sequence[Sequence[int]],
        tokenizer,
    ) -> SegmentRewardBatch:
        """Both stages: ``(N, S)`` rewards, last-token positions and mask for a batch."""
        return self.place(self.score(prompts, completions), completion_ids, tokenizer)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.specs!r})"
