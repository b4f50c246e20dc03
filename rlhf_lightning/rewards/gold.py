"""Gold rewards of the embedded world (``rlhf_lightning.synthetic``) as a reward source.

``rlhf_lightning.synthetic`` is imported on first call, not at import time, so reward sources work
without the embedded world being built.
"""

from __future__ import annotations

import importlib
from typing import Sequence

import torch

from rlhf_lightning.rewards.base import _device_of

__all__ = ["GoldRewardSource", "gold_scorer"]


def _scoring_module():
    """``rlhf_lightning.synthetic`` if it re-exports the scorers, else its ``scorers`` submodule."""
    synthetic = importlib.import_module("rlhf_lightning.synthetic")
    if hasattr(synthetic, "score_texts") or hasattr(synthetic, "get_scorer"):
        return synthetic
    return importlib.import_module("rlhf_lightning.synthetic.scorers")


def gold_scorer(objective: str):
    """``(prompt, completion) -> float`` for one gold objective (e.g. ``"sentiment"``), via ``get_scorer``."""
    scorer = _scoring_module().get_scorer(objective)

    def score(prompt: str, completion: str) -> float:
        result = scorer.score(prompt, completion)
        return float(getattr(result, "total", result))

    return score


class GoldRewardSource:
    """Programmatic gold score of one objective of the embedded world.

    Args:
        objective: a gold objective name of ``rlhf_lightning.synthetic`` (e.g. ``"sentiment"``,
            ``"consistency"``, ``"fluency"``).
        name: label in logs; defaults to ``"gold/<objective>"``.
    """

    def __init__(self, objective: str, name: str | None = None) -> None:
        self.objective = objective
        self.name = name or f"gold/{objective}"

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        synthetic = _scoring_module()
        if hasattr(synthetic, "score_texts"):
            values = synthetic.score_texts(self.objective, list(prompts), list(completions))
        else:
            score = gold_scorer(self.objective)
            values = [score(p, c) for p, c in zip(prompts, completions)]
        return torch.tensor([float(v) for v in values], dtype=torch.float32, device=_device_of(input_ids))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(objective={self.objective!r})"
