"""KL-penalty coefficient controllers for PPO-style modules (Ziegler et al. 2019, "Fine-Tuning Language
Models from Human Preferences", section 2.2).

The controller logic is a small pure object (``FixedKL``, ``AdaptiveKL``: ``update(current_kl, n_steps)
-> new coefficient``); the callbacks (``FixedKLController``, ``AdaptiveKLController``) connect it to a module.

Module hook contract (see docs/CONTRACTS_INTERNAL.md):

* ``pl_module.kl_coef`` (float attribute): the coefficient the module multiplies its KL penalty by. The
  callback sets it at fit start and after every update; the module only reads it.
* ``pl_module.last_rollout_kl`` (float or 0-d tensor, or None): set by the module in ``training_step`` to the
  mean over episodes of the per-sequence KL (summed over completion tokens) of the rollout it just scored,
  measured with the coefficient in force for that rollout.
* ``pl_module.last_rollout_size`` (int): the number of episodes in that rollout (this rank's).

After each training batch the callback reads the pair, sets ``last_rollout_kl`` back to None (so a batch
without a rollout is not counted twice), and updates the coefficient. Under DDP the KL is averaged over all
ranks' episodes (weighted by ``last_rollout_size``) and ``n_steps`` is the global episode count, so every rank
keeps the same coefficient; every rank must then report a rollout in the same batches.

Departure from the paper: none in the update rule. ``n_steps`` counts episodes (as the paper's horizon is
in episodes, e.g. 10k), not optimizer steps.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from rlhf_lightning.callbacks._hooks import require_attribute

__all__ = ["FixedKL", "AdaptiveKL", "KLController", "FixedKLController", "AdaptiveKLController"]


def _check_coef(value: float, name: str, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a finite float >= 0, got {value!r}")
    return float(value)


class FixedKL:
    """A constant coefficient: ``update`` returns it unchanged."""

    def __init__(self, kl_coef: float):
        self.value = _check_coef(kl_coef, "kl_coef", "FixedKL")
        self.steps = 0

    def update(self, current_kl: float, n_steps: int) -> float:
        self.steps += int(n_steps)
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"kl_coef": self.value, "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.value = float(state_dict["kl_coef"])
        self.steps = int(state_dict["steps"])


class AdaptiveKL(FixedKL):
    """Proportional controller towards a target KL (Ziegler et al. 2019)::

        e = clip(KL / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    Args:
        init_kl_coef: initial beta.
        target: target per-sequence KL (nats), > 0.
        horizon: episodes over which the error is corrected, > 0.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        if not isinstance(target, (int, float)) or isinstance(target, bool) or not target > 0 or not math.isfinite(target):
            raise ValueError(f"AdaptiveKL: target must be a finite float > 0, got {target!r}")
        if not isinstance(horizon, (int, float)) or isinstance(horizon, bool) or not horizon > 0:
            raise ValueError(f"AdaptiveKL: horizon must be > 0, got {horizon!r}")
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value = self.value * (1.0 + error * n_steps / self.horizon)
        self.steps += int(n_steps)
        return self.value


class KLController(Callback):
    """Connects a controller object (``FixedKL`` / ``AdaptiveKL`` or any object with ``value``,
    ``update(current_kl, n_steps)``, ``state_dict`` and ``load_state_dict``) to ``pl_module.kl_coef``;
    the hook contract is in this module's docstring."""

    def __init__(self, controller: FixedKL):
        super().__init__()
        self.controller = controller
        self.num_updates = 0

    @property
    def kl_coef(self) -> float:
        return self.controller.value

    def _read_rollout(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[float, int] | None:
        kl = getattr(pl_module, "last_rollout_kl", None)
        if kl is None:
            return None
        pl_module.last_rollout_kl = None
        kl = float(kl.detach().item()) if isinstance(kl, torch.Tensor) else float(kl)
        size = int(getattr(pl_module, "last_rollout_size", 0) or 0)
        if size < 1:
            raise ValueError(
                f"{type(self).__name__}: `{type(pl_module).__name__}.last_rollout_size` must be the number of "
                f"episodes (>= 1) of the rollout whose KL is in `last_rollout_kl`; got {size}"
            )
        if not math.isfinite(kl):
            raise ValueError(f"{type(self).__name__}: the module reported a non-finite KL ({kl})")
        if trainer.world_size > 1:
            stats = torch.tensor([kl * size, float(size)], dtype=torch.float64, device=pl_module.device)
            stats = trainer.strategy.reduce(stats, reduce_op="sum")
            kl, size = (stats[0] / stats[1]).item(), int(stats[1].item())
        return kl, size

    def _apply(self, pl_module: L.LightningModule) -> None:
        pl_module.kl_coef = self.controller.value

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Called when fit begins: set ``pl_module.kl_coef`` (the restored value when resuming)."""
        require_attribute(pl_module, "kl_coef", type(self).__name__, "the KL penalty coefficient it sets")
        self._apply(pl_module)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Called when training begins: set the coefficient again (state restored after setup)."""
        self._apply(pl_module)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        """Called when a training batch ends: update the coefficient from the rollout's measured KL."""
        rollout = self._read_rollout(trainer, pl_module)
        if rollout is not None:
            self.controller.update(*rollout)
            self.num_updates += 1
            self._apply(pl_module)
        pl_module.log("kl_coef", self.controller.value, on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.controller.state_dict(), "num_updates": self.num_updates}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.controller.load_state_dict(state_dict)
        self.num_updates = int(state_dict["num_updates"])


class FixedKLController(KLController):
    def __init__(self, kl_coef: float = 0.05):
        """Keep ``pl_module.kl_coef`` constant.

        Args:
            kl_coef: the KL penalty coefficient beta, >= 0.
        """
        super().__init__(FixedKL(kl_coef))


class AdaptiveKLController(KLController):
    def __init__(self, init_kl_coef: float = 0.2, target: float = 6.0, horizon: int = 10000):
        """Adapt ``pl_module.kl_coef`` so the rollouts' KL tracks ``target`` (Ziegler et al. 2019).

        Args:
            init_kl_coef: beta at the start of training, >= 0 (0.2 is a common starting point).
            target: target per-sequence KL in nats, > 0 (6 is a common choice for short continuations).
            horizon: number of episodes over which a KL error is corrected, > 0 (commonly 10000).
        """
        super().__init__(AdaptiveKL(init_kl_coef, target, horizon))
