"""Optimizer + learning-rate schedule shared by every module (AdamW, linear warmup, cosine/linear/constant decay).

Every module takes an ``optim: Optimization`` argument, so YAML reads the same everywhere::

    model:
      init_args:
        optim: {lr: 1.0e-4, weight_decay: 0.0, warmup_steps: 20, schedule: cosine}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

import torch

__all__ = ["Optimization", "build_optimizer", "lr_lambda"]


@dataclass
class Optimization:
    """AdamW and its schedule.

    Args:
        lr: peak learning rate.
        weight_decay: decoupled weight decay; not applied to biases and norm weights (1-D tensors).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: linear warmup from 0 to ``lr`` over this many optimizer steps.
        schedule: decay after warmup: ``cosine`` to ``min_lr_ratio * lr``, ``linear`` to it, or ``constant``.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"Unknown schedule {schedule!r}; use cosine, linear or constant.")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_optimizer(parameters: Iterable[tuple[str, torch.nn.Parameter]], optim: Optimization, total_steps: int):
    """AdamW over trainable ``(name, parameter)`` pairs + a per-step LambdaLR.

    Returns the dict Lightning's ``configure_optimizers`` expects.
    """
    decay, no_decay = [], []
    for _, parameter in parameters:
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(
        [group for group in groups if group["params"]], lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps
    )
    total_steps = max(1, int(total_steps)) if total_steps is not None and math.isfinite(total_steps) else 1_000_000
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_lambda(
            step,
            warmup_steps=optim.warmup_steps,
            total_steps=total_steps,
            schedule=optim.schedule,
            min_lr_ratio=optim.min_lr_ratio,
        ),
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# Modules keep ``optim`` in their hyperparameters; let ``load_from_checkpoint`` (weights_only=True by
# default in torch >= 2.6) unpickle it.
torch.serialization.add_safe_globals([Optimization])
