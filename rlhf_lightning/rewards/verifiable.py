"""Rule-based (verifiable) rewards of the embedded world as a reward source.

``rlhf_lightning.synthetic`` is imported on first use, as for the gold source.
"""

from __future__ import annotations

import importlib
from typing import Sequence

import torch

from rlhf_lightning.rewards.base import _device_of

__all__ = ["VerifiableRewardSource"]


class VerifiableRewardSource:
    """0/1 reward of a verifiable task of the embedded world (see ``rlhf_lightning.synthetic.verifiable``).

    Args:
        task: ``"states_rating"`` (the review states the prompt's rating, and no other) or
            ``"states_facts"`` (genre, actor and rating all named, none wrong).
        name: label in logs; defaults to ``"verifiable/<task>"``.
    """

    def __init__(self, task: str = "states_rating", name: str | None = None) -> None:
        tasks = importlib.import_module("rlhf_lightning.synthetic.verifiable").VERIFIABLE_TASKS
        if task not in tasks:
            raise ValueError(f"Unknown verifiable task {task!r}; choose from {sorted(tasks)}")
        self.task = task
        self.rule = tasks[task]
        self.name = name or f"verifiable/{task}"

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts and {len(completions)} completions")
        values = [self.rule(p, c) for p, c in zip(prompts, completions)]
        return torch.tensor(values, dtype=torch.float32, device=_device_of(input_ids))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r})"
