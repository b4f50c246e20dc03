"""The shared module base: the non-finite guard (``on_nonfinite: error | skip``) on automatic (DPO, SFT)
and manual (PPO) optimization — a NaN/inf loss or gradient never reaches the weights."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from rlhf_lightning.modules import DPOModule, Optimization
from rlhf_lightning.modules.base import NonFiniteError
from rlhf_lightning.rewards import FunctionRewardSource

from tests.modules import test_ppo
from tests.modules.test_dpo import fit as fit_dpo
from tests.modules.test_dpo import make_module as make_dpo


class Snapshots(L.Callback):
    """Parameters after every training batch (to see which steps changed them)."""

    def __init__(self):
        self.losses, self.params = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.params.append(torch.cat([p.detach().reshape(-1) for p in pl_module.policy.parameters()]).clone())


def test_default_error_names_step_and_loss_and_weights_stay_finite(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    """lr = 1e30: step 0 is finite, its update makes the step-1 loss NaN. Before: NaN losses, exit 0."""
    module = make_dpo(tiny_config, tokenizer_dir, optim=Optimization(lr=1e30, warmup_steps=0))
    assert module.on_nonfinite == "error"
    with pytest.raises(NonFiniteError, match=r"Non-finite loss \(nan\) at global step 1 \(epoch 0\) in DPOModule.*on_nonfinite: skip"):
        fit_dpo(module, tmp_path, tokenizer_dir, assets_dir, max_steps=4)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_skip_drops_the_step_and_leaves_weights_and_optimizer_state_untouched(tmp_path, tokenizer_dir, assets_dir, tiny_config, caplog):
    module = make_dpo(tiny_config, tokenizer_dir, optim=Optimization(lr=1e30, warmup_steps=0), on_nonfinite="skip")
    snapshots = Snapshots()
    with caplog.at_level("WARNING"):
        fit_dpo(module, tmp_path, tokenizer_dir, assets_dir, callbacks=[snapshots], max_steps=4)
    assert math.isfinite(snapshots.losses[0]) and all(math.isnan(x) for x in snapshots.losses[1:])
    assert module.nonfinite_skipped_steps == 3
    for before, after in zip(snapshots.params[1:], snapshots.params[2:]):
        assert torch.equal(before, after)  # skipped steps change nothing
    assert "optimizer step skipped (3 skipped so far" in caplog.text


def test_a_non_finite_gradient_with_a_finite_loss_names_the_parameter(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    module = make_dpo(tiny_config, tokenizer_dir)
    name, param = next((n, p) for n, p in module.named_parameters() if "layers.1.mlp.up_proj" in n)
    param.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteError, match=rf"Non-finite gradient \(first: {name}\) at global step 0"):
        fit_dpo(module, tmp_path, tokenizer_dir, assets_dir, max_steps=2)


def test_manual_optimization_ppo_nan_reward_is_caught(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    """A reward function that returns NaN: PPO's loss is NaN at the first inner step."""
    module = test_ppo.make_module(tiny_config, tokenizer_dir, reward=FunctionRewardSource(lambda p, c: float("nan")))
    with pytest.raises(NonFiniteError, match=r"Non-finite loss \(nan\) at global step 0 .* in PPOModule"):
        test_ppo.fit(module, tmp_path, tokenizer_dir, assets_dir, max_steps=1)
    skipping = test_ppo.make_module(
        tiny_config, tokenizer_dir, reward=FunctionRewardSource(lambda p, c: float("nan")), on_nonfinite="skip"
    )
    before = [p.detach().clone() for p in skipping.policy.parameters()]
    test_ppo.fit(skipping, tmp_path / "skip", tokenizer_dir, assets_dir, max_steps=1)
    assert skipping.nonfinite_skipped_steps == 4  # ppo_epochs 2 x minibatches 2, every one dropped
    assert all(torch.equal(a, b) for a, b in zip(before, skipping.policy.parameters()))


def test_on_nonfinite_is_validated(tokenizer_dir, tiny_config):
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        DPOModule(tiny_config, tokenizer_dir, on_nonfinite="ignore")
