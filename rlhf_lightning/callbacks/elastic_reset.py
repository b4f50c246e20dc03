"""Elastic Reset (Noukhovitch et al. 2023, "Language Model Alignment with Elastic Reset").

The policy drifts from its initialisation during RLHF; instead of (only) a KL penalty, Elastic Reset keeps
an EMA of the online policy and periodically resets: ``online <- EMA`` then ``EMA <- initial weights``.

Departures from the paper, and why:

* The EMA is updated once per training batch that took an optimizer step (with manual optimization, PPO
  takes several steps per batch); the paper's loop has one update per step. A rollout batch is the unit at
  which PPO's policy changes meaningfully, and it keeps the callback strategy-agnostic.
* Optimizer state is left alone by default (a reset moves weights only); ``reset_optimizer`` clears the
  state of every optimizer (Adam moments and step counts), for when the old moments are judged stale.
* The EMA is float32; the initial weights are kept in the parameter dtype so ``EMA <- init`` is exact.
* ``reset_critic`` (as in the paper's code) also puts PPO's value model back to its fit-start weights at
  every reset: the critic was fitted to the returns of a policy that no longer exists. With a value
  head on the policy's trunk only the head is the critic (the trunk belongs to the policy, reset to the
  EMA); with a separate critic, the whole critic is reset.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from rlhf_lightning.callbacks._hooks import broadcast_tensors_, check_state_key, get_policy
from rlhf_lightning.callbacks.ema import ParameterEMA, ParameterSnapshot, check_decay, check_positive_int
from rlhf_lightning.weights import trainable_named_parameters

__all__ = ["ElasticReset"]


class ElasticReset(Callback):
    def __init__(
        self,
        decay: float,
        reset_every_n_steps: int,
        reset_ema_to_init: bool = True,
        reset_optimizer: bool = False,
        cpu_offload: bool = False,
        state_key: str | None = None,
        reset_critic: bool = False,
    ):
        """Periodically reset the policy to its EMA, and the EMA to the initial policy.

        Args:
            decay: EMA decay in ``[0, 1]`` (the paper uses values around 0.99-0.995 for hundreds of steps
                between resets: the EMA must average over a good fraction of one reset period).
            reset_every_n_steps: reset once at least this many optimizer steps have passed since the last
                reset (override :meth:`should_reset` for other schedules).
            reset_ema_to_init: after a reset, set the EMA to the weights the policy had at fit start (the
                paper's choice); ``False`` keeps the EMA running.
            reset_optimizer: also clear every optimizer's state (moments, step counts) at each reset.
            cpu_offload: keep the EMA and the initial weights in CPU memory.
            state_key: checkpoint key of this callback's state, when several instances coexist.
            reset_critic: also reset the module's value model (``pl_module.value_model``: PPO's value head
                or separate critic) to its fit-start weights at each reset; an error on a module without one.

        Module hook used: ``pl_module.policy`` (its trainable parameters). The initial weights are captured
        at fit start and saved in checkpoints with the EMA, so a resumed run resets to the same weights.
        Under DDP every rank updates its EMA from identical weights; after a reset rank 0's policy and EMA
        are broadcast anyway, so a rank that drifted (non-determinism, bit flips) is brought back in line.
        """
        super().__init__()
        self.decay = check_decay(decay, "ElasticReset")
        self.reset_every_n_steps = check_positive_int(reset_every_n_steps, "reset_every_n_steps", "ElasticReset")
        self.reset_ema_to_init = bool(reset_ema_to_init)
        self.reset_optimizer = bool(reset_optimizer)
        self.cpu_offload = bool(cpu_offload)
        self._state_key = check_state_key(state_key, "ElasticReset")
        device = "cpu" if self.cpu_offload else None
        self._ema = ParameterEMA(self.decay, device=device)
        self._init = ParameterSnapshot(device=device)
        self.reset_critic = bool(reset_critic)
        self._critic_init = ParameterSnapshot(device=device)
        self._pending: dict[str, Any] | None = None
        self.num_resets = 0
        self.last_update_step = 0
        self.last_reset_step = 0

    @property
    @override
    def state_key(self) -> str:
        if self._state_key is not None:
            return self._state_key
        return self._generate_state_key(decay=self.decay, reset_every_n_steps=self.reset_every_n_steps)

    def should_reset(self, trainer: L.Trainer, step: int) -> bool:
        """Whether to reset now that ``trainer.global_step == step`` (called after the EMA update)."""
        return step - self.last_reset_step >= self.reset_every_n_steps

    def _params(self, pl_module: L.LightningModule) -> list[torch.Tensor]:
        return [p for _, p in trainable_named_parameters(get_policy(pl_module, "ElasticReset"))]

    def _critic_named(self, pl_module: L.LightningModule) -> list[tuple[str, torch.Tensor]]:
        critic = getattr(pl_module, "value_model", None)
        if critic is None:
            raise AttributeError(
                f"ElasticReset(reset_critic=True) needs a module with a `value_model` (PPO's value head or critic); "
                f"{type(pl_module).__name__} has none"
            )
        return trainable_named_parameters(critic)

    def _materialize(self, pl_module: L.LightningModule) -> None:
        if not self._ema.initialized:
            named = trainable_named_parameters(get_policy(pl_module, "ElasticReset"))
            self._ema.capture_(named)
            self._init.capture_(named)
        if self.reset_critic and not self._critic_init.initialized:
            self._critic_init.capture_(self._critic_named(pl_module))
        if self._pending is not None:
            self._ema.load_state_dict(self._pending["ema"])
            self._init.load_state_dict(self._pending["init"])
            if self.reset_critic and self._pending.get("critic_init"):
                self._critic_init.load_state_dict(self._pending["critic_init"])
            self._pending = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Called when fit begins: capture the initial weights (start of the EMA), or restore them."""
        if self._pending is None:  # a fresh fit, not a resume
            self.num_resets = self.last_update_step = self.last_reset_step = 0
        named = trainable_named_parameters(get_policy(pl_module, "ElasticReset"))
        self._ema.capture_(named)
        self._init.capture_(named)
        if self.reset_critic:
            self._critic_init.capture_(self._critic_named(pl_module))
        self._materialize(pl_module)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Called when training begins: apply state restored after setup (sharded strategies)."""
        self._materialize(pl_module)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        """Called when a training batch ends: update the EMA, then reset if due."""
        step = trainer.global_step
        if step <= self.last_update_step:  # no optimizer step in this batch (gradient accumulation)
            return
        self._materialize(pl_module)
        self._ema.update_(self._params(pl_module))
        self.last_update_step = step
        if self.should_reset(trainer, step):
            self.reset(trainer, pl_module)
        pl_module.log("elastic_reset/num_resets", float(self.num_resets), on_step=True, on_epoch=False)

    def reset(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``online <- EMA``; ``EMA <- init`` (if ``reset_ema_to_init``); optimizer state cleared if asked."""
        self._materialize(pl_module)
        params = self._params(pl_module)
        self._ema.copy_to_(params)
        if self.reset_ema_to_init:
            self._ema.copy_from_(self._init.tensors)
        broadcast_tensors_(trainer, params + self._ema.tensors)
        if self.reset_critic:
            critic = [p for _, p in self._critic_named(pl_module)]
            self._critic_init.copy_to_(critic)
            broadcast_tensors_(trainer, critic)
        if self.reset_optimizer:
            for optimizer in trainer.optimizers:
                optimizer.state.clear()
        self.num_resets += 1
        self.last_reset_step = trainer.global_step

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """``{parameter name: float32 EMA tensor}`` (empty before fit)."""
        return dict(self._pending["ema"]) if self._pending is not None else self._ema.state_dict()

    def init_state_dict(self) -> dict[str, torch.Tensor]:
        """``{parameter name: weights at fit start}`` (empty before fit)."""
        return dict(self._pending["init"]) if self._pending is not None else self._init.state_dict()

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {
            "ema": self.ema_state_dict(),
            "init": self.init_state_dict(),
            "num_resets": self.num_resets,
            "last_update_step": self.last_update_step,
            "last_reset_step": self.last_reset_step,
        }
        if self.reset_critic:
            pending = self._pending.get("critic_init") if self._pending is not None else None
            state["critic_init"] = dict(pending) if pending is not None else self._critic_init.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Tensors are applied at the next hook (_materialize): see EMA.load_state_dict.
        if state_dict.get("ema"):
            self._pending = {"ema": dict(state_dict["ema"]), "init": dict(state_dict["init"]),
                             "critic_init": dict(state_dict.get("critic_init") or {})}
        self.num_resets = int(state_dict["num_resets"])
        self.last_update_step = int(state_dict["last_update_step"])
        self.last_reset_step = int(state_dict["last_reset_step"])
