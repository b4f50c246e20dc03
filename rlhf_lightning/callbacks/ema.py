"""Exponential moving average of the policy's trainable weights, swapped in for validation.

``ParameterSnapshot`` / ``ParameterEMA`` are the small stateful holders shared (by composition) with
``ElasticReset``; the arithmetic itself is ``rlhf_lightning.weights.ema_update_``.

Departures from a textbook EMA: no bias correction / warm-up (the EMA starts as a copy of the weights at
fit start, so it is never biased towards zero); the EMA is kept in float32 whatever the parameter dtype,
because ``decay * ema + (1 - decay) * theta`` with decay 0.999 rounds away in bf16.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from rlhf_lightning.callbacks._hooks import check_state_key, get_policy
from rlhf_lightning.weights import copy_params_, ema_update_, trainable_named_parameters

__all__ = ["EMA", "ParameterSnapshot", "ParameterEMA"]


class ParameterSnapshot:
    """Copies of a fixed, named list of parameters (e.g. the initial weights).

    Args:
        device: where the copies live (``None``: next to each parameter; ``"cpu"`` saves accelerator memory).
        dtype: dtype of the copies (``None``: the parameter's own, so restoring is exact).
    """

    def __init__(self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.names: list[str] = []
        self.tensors: list[torch.Tensor] = []

    @property
    def initialized(self) -> bool:
        return bool(self.tensors)

    @torch.no_grad()
    def capture_(self, named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
        """(Re)allocate the copies from ``named_params``' current values."""
        named_params = list(named_params)
        self.names = [name for name, _ in named_params]
        self.tensors = [
            p.detach().to(device=self.device or p.device, dtype=self.dtype or p.dtype, copy=True) for _, p in named_params
        ]

    def copy_to_(self, params: Sequence[torch.Tensor]) -> None:
        """In place: ``params <- copies``."""
        copy_params_(params, self.tensors)

    def copy_from_(self, params: Sequence[torch.Tensor]) -> None:
        """In place: ``copies <- params``."""
        copy_params_(self.tensors, params)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.tensors))

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy saved values into the already captured tensors (names must match)."""
        if list(state_dict) != self.names:
            missing = sorted(set(self.names) - set(state_dict))[:5]
            extra = sorted(set(state_dict) - set(self.names))[:5]
            raise ValueError(
                "Saved weights do not match the policy's trainable parameters "
                f"(missing from checkpoint: {missing}; unexpected: {extra})"
            )
        copy_params_(self.tensors, list(state_dict.values()))


class ParameterEMA(ParameterSnapshot):
    """A float32 exponential moving average of a fixed, named list of parameters."""

    def __init__(self, decay: float, *, device: torch.device | str | None = None):
        super().__init__(device=device, dtype=torch.float32)
        self.decay = decay

    def update_(self, params: Sequence[torch.Tensor]) -> None:
        ema_update_(self.tensors, params, self.decay)


def check_decay(decay: float, owner: str) -> float:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"{owner}: decay must be a float in [0, 1], got {decay!r}")
    return float(decay)


def check_positive_int(value: int, name: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return value


class EMA(Callback):
    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        cpu_offload: bool = False,
        use_for_validation: bool = True,
        state_key: str | None = None,
    ):
        """Keep an exponential moving average of ``pl_module.policy``'s trainable parameters.

        Args:
            decay: ``ema <- decay * ema + (1 - decay) * theta`` at each update; in ``[0, 1]``.
            update_every_n_steps: update once at least this many optimizer steps have passed since the last
                update (override :meth:`should_update` for other schedules).
            cpu_offload: keep the EMA in CPU memory (saves accelerator memory; each update copies the weights
                to the host).
            use_for_validation: swap the EMA weights into the policy for each validation epoch and swap the
                trained weights back afterwards.
            state_key: key of this callback's state in checkpoints; set it when several EMA callbacks with the
                same ``decay`` and ``update_every_n_steps`` coexist.

        Module hook used: ``pl_module.policy`` (an ``nn.Module``). The EMA starts as a copy of the policy at
        fit start, is saved in checkpoints, and a resumed run continues it exactly. Updates happen after a
        training batch that advanced ``trainer.global_step``.
        """
        super().__init__()
        self.decay = check_decay(decay, "EMA")
        self.update_every_n_steps = check_positive_int(update_every_n_steps, "update_every_n_steps", "EMA")
        self.cpu_offload = bool(cpu_offload)
        self.use_for_validation = bool(use_for_validation)
        self._state_key = check_state_key(state_key, "EMA")
        self._ema = ParameterEMA(self.decay, device="cpu" if self.cpu_offload else None)
        self._pending: dict[str, torch.Tensor] | None = None
        self._backup: list[torch.Tensor] | None = None
        self.num_updates = 0
        self.last_update_step = 0

    @property
    @override
    def state_key(self) -> str:
        if self._state_key is not None:
            return self._state_key
        return self._generate_state_key(decay=self.decay, update_every_n_steps=self.update_every_n_steps)

    def should_update(self, trainer: L.Trainer, step: int) -> bool:
        """Whether to update the EMA now that ``trainer.global_step == step`` (> the last updated step)."""
        return step - self.last_update_step >= self.update_every_n_steps

    def _params(self, pl_module: L.LightningModule) -> list[torch.Tensor]:
        return [p for _, p in trainable_named_parameters(get_policy(pl_module, "EMA"))]

    def _materialize(self, pl_module: L.LightningModule) -> None:
        """Allocate the EMA from the policy if needed, then apply any state restored from a checkpoint."""
        if not self._ema.initialized:
            self._ema.capture_(trainable_named_parameters(get_policy(pl_module, "EMA")))
        if self._pending is not None:
            self._ema.load_state_dict(self._pending)
            self._pending = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Called when fit begins: the EMA starts as a copy of the policy (or the checkpointed EMA)."""
        if self._pending is None:  # a fresh fit, not a resume
            self.num_updates = self.last_update_step = 0
        self._ema.capture_(trainable_named_parameters(get_policy(pl_module, "EMA")))
        self._materialize(pl_module)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Called when training begins: apply EMA state restored after setup (sharded strategies)."""
        self._materialize(pl_module)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        """Called when a training batch ends: update the EMA if an optimizer step happened and is due."""
        step = trainer.global_step
        if step > self.last_update_step and self.should_update(trainer, step):
            self._materialize(pl_module)
            self._ema.update_(self._params(pl_module))
            self.num_updates += 1
            self.last_update_step = step

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Called when a validation epoch begins: swap the EMA weights in."""
        if not self.use_for_validation or not (self._ema.initialized or self._pending is not None):
            return
        self._materialize(pl_module)
        params = self._params(pl_module)
        self._backup = [p.detach().clone() for p in params]
        self._ema.copy_to_(params)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Called when a validation epoch ends: swap the trained weights back."""
        self._restore(pl_module)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Called when fit/validate raises: never leave the EMA weights in the policy by accident."""
        self._restore(pl_module)

    def _restore(self, pl_module: L.LightningModule) -> None:
        if self._backup is not None:
            copy_params_(self._params(pl_module), self._backup)
            self._backup = None

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """``{parameter name in the policy: float32 EMA tensor}`` (empty before fit)."""
        return dict(self._pending) if self._pending is not None else self._ema.state_dict()

    def copy_to(self, module: torch.nn.Module) -> None:
        """Write the EMA into ``module`` (the policy, or a model with the same trainable parameter names)."""
        named = dict(module.named_parameters())
        ema = self.ema_state_dict()
        missing = [name for name in ema if name not in named]
        if missing:
            raise ValueError(f"EMA.copy_to: module has no parameters named {missing[:5]}")
        copy_params_([named[name] for name in ema], list(ema.values()))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "ema": self.ema_state_dict(),
            "num_updates": self.num_updates,
            "last_update_step": self.last_update_step,
            "decay": self.decay,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied to the policy-sized tensors at the next hook (see _materialize): checkpoint callbacks are
        # restored before on_fit_start for most strategies and after it for sharded ones.
        self._pending = dict(state_dict["ema"]) if state_dict.get("ema") else None
        self.num_updates = int(state_dict["num_updates"])
        self.last_update_step = int(state_dict["last_update_step"])
