"""Rule-based (verifiable) rewards of the embedded world as a reward source.

``rlhf_lightning.synthetic`` is imported on first use, as for the gold source.
"""

from __future__ import annotations

import importlib

from rlhf_lightning.rewards.base import FunctionRewardSource

__all__ = ["VerifiableRewardSource"]


class VerifiableRewardSource(FunctionRewardSource):
    """0/1 reward of a verifiable task of the embedded world (see ``rlhf_lightning.synthetic.verifiable``):
    a :class:`FunctionRewardSource` over the task's rule, named in YAML by the task alone.

    Args:
        task: ``"states_rating"`` (the review states the prompt's rating, and no other) or
            ``"states_facts"`` (genre, actor and rating all named, none wrong).
        name: label in logs; defaults to ``"verifiable/<task>"``.
    """

    def __init__(self, task: str = "states_rating", name: str | None = None) -> None:
        tasks = importlib.import_module("rlhf_lightning.synthetic.verifiable").VERIFIABLE_TASKS
        if task not in tasks:
            raise ValueError(f"Unknown verifiable task {task!r}; choose from {sorted(tasks)}")
        super().__init__(tasks[task], name=name or f"verifiable/{task}")
        self.task = task
        self.rule = self.fn

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r})"
