"""Exact resume: a run killed with SIGKILL mid-epoch (after a checkpoint) and resumed with ``ckpt_path``
logs the same per-step losses as an uninterrupted run — SFT, RM, DPO, MODPO, PPO and Fine-Grained RLHF,
with shuffling on, across an epoch boundary.

The killed run is a forked child process that sends itself SIGKILL at the start of step ``kill_at``
(its last checkpoint is the one written after step ``kill_at - 1``); the uninterrupted and the resumed
runs run here. Tiny models, a handful of steps each.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from rlhf_lightning.data import DemonstrationDataModule, PreferenceDataModule, PromptDataModule
from rlhf_lightning.generation import SamplingConfig
from rlhf_lightning.modules import (
    DPOModule,
    FineGrainedPPOModule,
    MODPOModule,
    Optimization,
    PPOModule,
    RewardModelModule,
    SFTModule,
)
from rlhf_lightning.rewards import FunctionRewardSource, GoldSegmentScorer, SegmentRewardSpec

TOLERANCE = 1e-6


def _count_positive(prompt: str, completion: str) -> float:
    return float(sum(word in ("great", "good", "fun", "loved") for word in completion.split()))


def _words(prompt: str, completion: str) -> float:
    return float(len(completion.split()))


# name -> (module factory, datamodule factory, max_steps, kill_at); every DataModule shuffles.
def _setups(tiny_config, tokenizer_dir, assets_dir):
    pairs = os.path.join(assets_dir, "pairs_tiny.jsonl")  # 32 pairs / 4 = 8 batches per epoch
    demos = os.path.join(assets_dir, "sft_tiny.jsonl")  # 64 / 8 = 8 batches per epoch
    prompts = os.path.join(assets_dir, "prompts_tiny.jsonl")  # 16 / 4 = 4 rollouts per epoch
    optim = Optimization(lr=1e-3, warmup_steps=2)
    sampling = SamplingConfig(max_new_tokens=6, num_samples_per_prompt=2)
    pair_data = lambda: PreferenceDataModule(train_file=pairs, tokenizer=tokenizer_dir, batch_size=4, seed=3)  # noqa: E731
    prompt_data = lambda: PromptDataModule(train_file=prompts, tokenizer=tokenizer_dir, batch_size=4, seed=3)  # noqa: E731
    ppo_args = dict(sampling=sampling, ppo_epochs=1, num_minibatches=2, optim=optim, log_samples_every_n_steps=0)
    return {
        "sft": (lambda: SFTModule(tiny_config, tokenizer_dir, optim=optim),
                lambda: DemonstrationDataModule(train_file=demos, tokenizer=tokenizer_dir, batch_size=8, seed=3), 10, 5),
        "reward_model": (lambda: RewardModelModule(tiny_config, tokenizer_dir, optim=optim), pair_data, 10, 5),
        "dpo": (lambda: DPOModule(tiny_config, tokenizer_dir, optim=optim), pair_data, 10, 5),
        "modpo": (lambda: MODPOModule(tiny_config, tokenizer_dir, optim=optim, margin_sources=[FunctionRewardSource(_words)],
                                      weights=[0.7, 0.3]), pair_data, 10, 5),
        "ppo": (lambda: PPOModule(tiny_config, tokenizer_dir, reward=FunctionRewardSource(_count_positive), **ppo_args),
                prompt_data, 6, 3),
        "fine_grained": (lambda: FineGrainedPPOModule(
            tiny_config, tokenizer_dir, segment_rewards=[SegmentRewardSpec(GoldSegmentScorer("sentiment"), "sentence")], **ppo_args),
            prompt_data, 6, 3),
    }


class RecordStepLosses(L.Callback):
    """Per optimizer step: the loss (automatic optimization) and every float ``train/`` metric, appended
    to a JSONL file at once (the killed run leaves what it logged before SIGKILL)."""

    def __init__(self, path: str, kill_at: int | None = None):
        self.path, self.kill_at = path, kill_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.kill_at is not None and trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # the checkpoint of step kill_at - 1 is on disk

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch}
        if isinstance(outputs, dict) and "loss" in outputs:
            row["loss"] = float(outputs["loss"])
        elif isinstance(outputs, torch.Tensor):
            row["loss"] = float(outputs)
        for key, value in trainer.callback_metrics.items():
            if not key.startswith("val/") and key not in row:
                row[key] = float(value)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()


def _run(setup, root, record, *, kill_at=None, ckpt_path=None):
    make_module, make_data, max_steps, _ = setup
    torch.manual_seed(0)
    module = make_module()
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1, default_root_dir=str(root),
        callbacks=[RecordStepLosses(str(record), kill_at), ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=1, save_last=True)],
    )
    trainer.fit(module, datamodule=make_data(), ckpt_path=ckpt_path)


def _read(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def max_resume_gap(setup, tmp_path) -> tuple[float, float, int, list[dict]]:
    """``(max |Δ| over every logged quantity and step, max |Δ| of the loss (PPO: policy loss), steps
    compared, the uninterrupted run's rows)``."""
    _, _, max_steps, kill_at = setup
    _run(setup, tmp_path / "full", tmp_path / "full.jsonl")
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_run, args=(setup, tmp_path / "killed", tmp_path / "killed.jsonl"), kwargs={"kill_at": kill_at})
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL, f"the run was meant to die by SIGKILL, exit code {child.exitcode}"
    killed = _read(tmp_path / "killed.jsonl")
    assert [row["step"] for row in killed] == list(range(1, kill_at + 1))
    _run(setup, tmp_path / "killed", tmp_path / "resumed.jsonl", ckpt_path=str(tmp_path / "killed" / "ckpt" / "last.ckpt"))
    full, resumed = _read(tmp_path / "full.jsonl"), _read(tmp_path / "resumed.jsonl")
    assert [row["step"] for row in resumed] == list(range(kill_at + 1, max_steps + 1))
    gap = loss_gap = 0.0
    for a, b in zip(full[kill_at:], resumed):
        assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
        keys = [k for k in a if k not in ("step", "epoch")]
        assert keys and set(keys) == set(b) - {"step", "epoch"}
        gap = max(gap, *(abs(a[k] - b[k]) for k in keys))
        loss_key = "loss" if "loss" in a else "loss/policy"
        loss_gap = max(loss_gap, abs(a[loss_key] - b[loss_key]))
    return gap, loss_gap, len(resumed), full


@pytest.mark.parametrize("name", ["sft", "reward_model", "dpo", "modpo", "ppo", "fine_grained"])
def test_killed_and_resumed_run_logs_the_uninterrupted_losses(name, tmp_path, tokenizer_dir, assets_dir, tiny_config):
    setup = _setups(tiny_config, tokenizer_dir, assets_dir)[name]
    gap, loss_gap, compared, full = max_resume_gap(setup, tmp_path)
    print(f"resume {name}: max |delta loss| = {loss_gap:.3g}, max |delta| of any logged value = {gap:.3g} over {compared} steps")
    assert compared >= 3 and {row["epoch"] for row in full} == {0, 1}  # the resumed part crosses an epoch boundary
    assert gap <= TOLERANCE
