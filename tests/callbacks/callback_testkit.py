"""Tiny modules and trainer helpers for the callback tests.

The modules expose the hooks callbacks rely on (``policy``; ``kl_coef`` / ``last_rollout_kl`` /
``last_rollout_size`` for the PPO-like one). Their training data is drawn from a generator seeded with
``global_step`` (and the rank), so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import glob
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def step_generator(module: L.LightningModule) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + 7919 * module.global_rank + module.global_step)


class MLPPolicyModule(L.LightningModule):
    """A 2-layer MLP regression "policy" with automatic optimization (Adam)."""

    def __init__(self, seed: int = 0, lr: float = 0.05):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.lr = lr

    @property
    def policy(self) -> nn.Module:
        return self.net

    def _loss(self, generator: torch.Generator) -> torch.Tensor:
        x = torch.randn(8, 4, generator=generator)
        y = torch.sin(x.sum(-1, keepdim=True))
        return nn.functional.mse_loss(self.net(x), y)

    def training_step(self, batch, batch_idx):
        return self._loss(step_generator(self))

    def validation_step(self, batch, batch_idx):
        loss = self._loss(torch.Generator().manual_seed(batch_idx))
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class PPOLikeModule(MLPPolicyModule):
    """Reports a scripted KL per rollout through the KL-controller hook contract and records the
    ``kl_coef`` in force at each training step."""

    def __init__(self, kl_values, rollout_size: int = 4, seed: int = 0):
        super().__init__(seed=seed)
        self.kl_values = list(kl_values)
        self.rollout_size = rollout_size
        self.kl_coef = -1.0  # must be overwritten by the controller at fit start
        self.last_rollout_kl = None
        self.last_rollout_size = 0
        self.coefs_seen: list[float] = []

    def training_step(self, batch, batch_idx):
        self.coefs_seen.append(self.kl_coef)
        self.last_rollout_kl = torch.tensor(self.kl_values[self.global_step], dtype=torch.float64)
        self.last_rollout_size = self.rollout_size
        return super().training_step(batch, batch_idx)


class HFPolicyModule(L.LightningModule):
    """Wraps a tiny HF causal LM; LM loss on random token sequences."""

    def __init__(self, model: nn.Module, tokenizer=None, lr: float = 0.05):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.lr = lr

    @property
    def policy(self) -> nn.Module:
        return self.model

    def training_step(self, batch, batch_idx):
        ids = torch.randint(4, self.model.config.vocab_size, (2, 8), generator=step_generator(self))
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def dataloader(n: int = 64) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=1)


def make_trainer(root, max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(root),
    )
    options.update(kwargs)
    return L.Trainer(callbacks=list(callbacks), **options)


class Crash(RuntimeError):
    pass


class CrashAtStep(Callback):
    """Raises when a batch starts at ``global_step == step`` (after the checkpoint of step ``step``)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash(f"simulated crash at step {self.step}")


def crash_then_resume(root, make_module, make_callbacks, total_steps: int, crash_step: int, **trainer_kwargs):
    """Fit until a crash after ``crash_step`` steps (checkpointed), then resume a *fresh* module and fresh
    callbacks from the checkpoint to ``total_steps``. Returns ``(module, callbacks)`` of the resumed run."""
    import pytest

    ckpt_dir = os.path.join(str(root), "ckpt")
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=crash_step, save_top_k=-1)
    first = make_trainer(
        root, total_steps, [*make_callbacks(), checkpoint, CrashAtStep(crash_step)], enable_checkpointing=True,
        **trainer_kwargs,
    )
    with pytest.raises(Crash):
        first.fit(make_module(0), dataloader())
    (path,) = glob.glob(os.path.join(ckpt_dir, f"*step={crash_step}.ckpt"))
    module, callbacks = make_module(123), make_callbacks()  # another seed: state must come from the checkpoint
    make_trainer(root, total_steps, callbacks, **trainer_kwargs).fit(module, dataloader(), ckpt_path=path)
    return module, callbacks


def uninterrupted(root, make_module, make_callbacks, total_steps: int, **trainer_kwargs):
    module, callbacks = make_module(0), make_callbacks()
    make_trainer(root, total_steps, callbacks, **trainer_kwargs).fit(module, dataloader())
    return module, callbacks


def assert_same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def params(module: nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in module.named_parameters()}
