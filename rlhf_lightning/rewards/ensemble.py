"""Reward-model ensembles against overoptimisation (Coste et al., 2023).

With K member scores ``r_k`` per sample: ``"mean"`` averages them, ``"min"`` takes the worst case, and
``"uncertainty"`` is uncertainty-weighted optimisation, ``mean - lambda * var`` with the population
variance over members (divides by K). Members should score on comparable scales (e.g. reward models
trained alike, or normalised), otherwise ``min`` and the variance are dominated by one member.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["EnsembleRewardSource", "aggregate_ensemble"]

_AGGREGATIONS = ("mean", "min", "uncertainty")


def aggregate_ensemble(member_scores: torch.Tensor, aggregation: str = "mean", *, uncertainty_coef: float = 1.0) -> torch.Tensor:
    """Combine ``(K, N)`` member scores into ``(N,)`` (see module docstring)."""
    if aggregation == "mean":
        return member_scores.mean(dim=0)
    if aggregation == "min":
        return member_scores.min(dim=0).values
    if aggregation == "uncertainty":
        return member_scores.mean(dim=0) - uncertainty_coef * member_scores.var(dim=0, unbiased=False)
    raise ValueError(f"aggregation must be one of {_AGGREGATIONS}, got {aggregation!r}")


class EnsembleRewardSource:
    """Several reward sources combined into one score.

    Args:
        sources: K >= 1 reward sources (e.g. ``RewardModelSource`` s trained with different seeds).
        aggregation: ``"mean"``, ``"min"`` (worst case) or ``"uncertainty"`` (mean - coef * variance).
        uncertainty_coef: lambda of the ``"uncertainty"`` aggregation.
        name: label in logs.

    ``last_member_scores`` holds the latest ``(K, N)`` member scores, for logging the disagreement.
    """

    def __init__(
        self,
        sources: Sequence,
        aggregation: str = "mean",
        *,
        uncertainty_coef: float = 1.0,
        name: str = "ensemble",
    ) -> None:
        if len(sources) == 0:
            raise ValueError("EnsembleRewardSource needs at least one source")
        if aggregation not in _AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {_AGGREGATIONS}, got {aggregation!r}")
        if uncertainty_coef < 0:
            raise ValueError(f"uncertainty_coef must be >= 0, got {uncertainty_coef}")
        self.sources = list(sources)
        self.aggregation = aggregation
        self.uncertainty_coef = uncertainty_coef
        self.name = name
        self.last_member_scores: torch.Tensor | None = None

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        members = [
            torch.as_tensor(source(prompts, completions, input_ids=input_ids, attention_mask=attention_mask)).float()
            for source in self.sources
        ]
        device = members[0].device
        stacked = torch.stack([m.to(device) for m in members])  # (K, N)
        self.last_member_scores = stacked.detach()
        return aggregate_ensemble(stacked, self.aggregation, uncertainty_coef=self.uncertainty_coef)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(K={len(self.sources)}, aggregation={self.aggregation!r})"
