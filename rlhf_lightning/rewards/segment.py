"""Segment-level (fine-grained) rewards, as in Fine-Grained RLHF (Wu et al., 2023).

A segment reward source returns, for each completion, a list of ``(char_end, reward)`` pairs: the
segment ending at character offset ``char_end`` (exclusive) of the completion text earns ``reward``,
paid on the last token of that segment. Segmentation (sentences, sub-sentences) is the source's own
business; mapping character offsets to tokens is done by the Fine-Grained RLHF module.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from rlhf_lightning.rewards.base import CallableSpec, _default_name, resolve_callable

__all__ = ["SegmentRewards", "SegmentRewardSource", "FunctionSegmentRewardSource"]

SegmentRewards = list[tuple[int, float]]


@runtime_checkable
class SegmentRewardSource(Protocol):
    """``__call__(prompts, completions) -> list (length N) of [(char_end, reward), ...]``, segments in order."""

    name: str

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[SegmentRewards]: ...


class FunctionSegmentRewardSource:
    """Segment rewards from a Python function.

    Args:
        fn: ``fn(prompt, completion) -> [(char_end, reward), ...]``; a callable or a ``"module:attr"`` path.
        name: label in logs; defaults to the function's name.
    """

    def __init__(self, fn: CallableSpec, name: str | None = None) -> None:
        self.fn = resolve_callable(fn)
        self.name = name or _default_name(fn)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[SegmentRewards]:
        if len(prompts) != len(completions):
            raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions")
        out: list[SegmentRewards] = []
        for prompt, completion in zip(prompts, completions):
            segments = [(int(end), float(reward)) for end, reward in self.fn(prompt, completion)]
            ends = [end for end, _ in segments]
            if ends != sorted(ends) or any(end < 0 or end > len(completion) for end in ends):
                raise ValueError(
                    f"Segment source {self.name!r} returned char_end offsets {ends} for a completion of "
                    f"{len(completion)} characters; they must be increasing and within [0, len]."
                )
            out.append(segments)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
