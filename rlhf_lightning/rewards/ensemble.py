"""Reward-model ensembles against overoptimisation (Coste et al., 2023), and weighted sums of objectives.

With K member scores ``r_k`` per sample: ``"mean"`` averages them, ``"min"`` takes the worst case (the
paper's WCO, worst-case optimisation), and ``"uncertainty"`` is uncertainty-weighted optimisation (UWO),
``mean - lambda * var`` with the population variance over members (divides by K). Members should score on
comparable scales (e.g. reward models trained alike, or normalised), otherwise ``min`` and the variance
are dominated by one member.

With ``weights`` w_k, ``"mean"`` is the weighted mean ``sum_k w_k r_k / sum_k w_k``: with weights that sum
to 1 this is the linear scalarisation ``sum_k w_k r_k`` of multi-objective RLHF (MORLHF; e.g. the baseline
of Zhou et al. 2023, MODPO), each member then being one objective's reward model.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["EnsembleRewardSource", "aggregate_ensemble"]

_AGGREGATIONS = ("mean", "min", "uncertainty")


def aggregate_ensemble(
    member_scores: torch.Tensor,
    aggregation: str = "mean",
    *,
    uncertainty_coef: float = 1.0,
    weights: torch.Tensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """Combine ``(K, N)`` member scores into ``(N,)`` (see module docstring); ``weights`` ``(K,)`` only with "mean"."""
    if weights is not None:
        if aggregation != "mean":
            raise ValueError(f"weights apply to the 'mean' aggregation only, got aggregation={aggregation!r}")
        w = torch.as_tensor(weights, dtype=member_scores.dtype, device=member_scores.device)
        if w.shape != member_scores.shape[:1]:
            raise ValueError(f"weights has shape {tuple(w.shape)}, expected ({member_scores.shape[0]},) (one per member)")
        return (w[:, None] * member_scores).sum(dim=0) / w.sum()
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
        aggregation: ``"mean"``, ``"min"`` (worst case, WCO) or ``"uncertainty"`` (mean - coef * variance, UWO).
        uncertainty_coef: lambda of the ``"uncertainty"`` aggregation.
        weights: K non-negative weights (positive sum) for a weighted ``"mean"``, e.g. ``[w, 1 - w]`` over
            two objectives' reward models (MORLHF); None weighs members equally.
        name: label in logs.

    ``last_member_scores`` holds the latest ``(K, N)`` member scores, for logging the disagreement.
    """

    def __init__(
        self,
        sources: Sequence,
        aggregation: str = "mean",
        *,
        uncertainty_coef: float = 1.0,
        weights: Sequence[float] | None = None,
        name: str = "ensemble",
    ) -> None:
        if len(sources) == 0:
            raise ValueError("EnsembleRewardSource needs at least one source")
        if aggregation not in _AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {_AGGREGATIONS}, got {aggregation!r}")
        if uncertainty_coef < 0:
            raise ValueError(f"uncertainty_coef must be >= 0, got {uncertainty_coef}")
        if weights is not None:
            weights = [float(w) for w in weights]
            if len(weights) != len(sources):
                raise ValueError(f"weights has {len(weights)} values for {len(sources)} sources (one per source)")
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
            if aggregation != "mean":
                raise ValueError(f"weights apply to the 'mean' aggregation only, got aggregation={aggregation!r}")
        self.weights = weights
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
        return aggregate_ensemble(stacked, self.aggregation, uncertainty_coef=self.uncertainty_coef, weights=self.weights)

    def __repr__(self) -> str:
        weights = "" if self.weights is None else f", weights={self.weights}"
        return f"{type(self).__name__}(K={len(self.sources)}, aggregation={self.aggregation!r}{weights})"
