"""What the on-policy base gives PPO and the critic-free family alike: reward whitening before GAE, the
kl_threshold early stop, and the PPO-ptx SFT term (InstructGPT) mixed into every update."""

from __future__ import annotations

import os

import pytest
import torch

import rlhf_lightning.modules.ppo as ppo_module
from rlhf_lightning.data import DemonstrationDataModule
from rlhf_lightning.losses import masked_mean, masked_var
from rlhf_lightning.modules import GRPOModule
from rlhf_lightning.rewards import FunctionRewardSource

from tests.modules import test_policy_gradient as pg_tests
from tests.modules import test_ppo as ppo_tests
from tests.modules.test_ppo import RecordMetrics, fit


def make(kind: str, tiny_config, tokenizer_dir, **kwargs):
    if kind == "ppo":
        return ppo_tests.make_module(tiny_config, tokenizer_dir, **kwargs)
    return pg_tests.make_module(tiny_config, tokenizer_dir, cls=GRPOModule, **kwargs)


def test_whiten_rewards_rescales_the_shaped_rewards_before_gae(monkeypatch, tmp_path, tokenizer_dir, assets_dir, tiny_config):
    """Rewards reaching GAE have std 1 over the rollout's tokens and keep the sign of their mean (no shift)."""
    seen = []
    real = ppo_module.gae

    def spy(rewards, values, mask, **kwargs):
        seen.append((rewards.clone(), mask.clone()))
        return real(rewards, values, mask, **kwargs)

    monkeypatch.setattr(ppo_module, "gae", spy)
    raw = []
    module = ppo_tests.make_module(tiny_config, tokenizer_dir, whiten_rewards=True)
    shape = module.shape_rewards
    module.shape_rewards = lambda rollout, kl: raw.append(shape(rollout, kl)[0]) or (raw[-1], {})
    fit(module, tmp_path, tokenizer_dir, assets_dir, max_steps=1)
    rewards, mask = seen[0]
    torch.testing.assert_close(masked_var(rewards, mask), torch.tensor(1.0), atol=1e-4, rtol=0)
    # shift_mean=False: whitened = (r - mean) / std + mean, i.e. r / std up to the mean's own rescaling.
    original = raw[0]
    std = masked_var(original, mask).sqrt()
    mean = masked_mean(original, mask)
    torch.testing.assert_close(rewards, torch.where(mask.bool(), (original - mean) / std + mean, 0.0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_kl_threshold_skips_the_remaining_epochs(kind, tmp_path, tokenizer_dir, assets_dir, tiny_config):
    """With a threshold every epoch exceeds, only the first of 3 epochs runs (2 of 6 minibatches), and a
    rollout still counts as one global step; without one, all 3 run."""
    for threshold, expected_calls in ((1e-12, 2), (None, 6)):
        module = make(kind, tiny_config, tokenizer_dir, ppo_epochs=3, num_minibatches=2, kl_threshold=threshold)
        calls = []
        loss = module.minibatch_loss
        module.minibatch_loss = lambda *a: calls.append(1) or loss(*a)
        trainer = fit(module, tmp_path / str(threshold), tokenizer_dir, assets_dir, max_steps=2)
        assert trainer.global_step == 2
        assert len(calls) == 2 * expected_calls, (threshold, len(calls))
        if threshold is not None:
            assert trainer.callback_metrics["policy/epochs"] == 1


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_ptx_term_trains_on_the_sft_data(kind, tmp_path, tokenizer_dir, assets_dir, tiny_config):
    """No reward signal (constant score, no KL) and ptx_coef 1: the only learning signal is the SFT NLL of
    ptx_data, which must fall over a few rollouts; ``loss/ptx`` is logged."""
    sft = DemonstrationDataModule(train_file=os.path.join(assets_dir, "sft_tiny.jsonl"), batch_size=4, shuffle=False)
    module = make(kind, tiny_config, tokenizer_dir, reward=FunctionRewardSource(lambda p, c: 1.0), kl_coef=0.0,
                  ptx_coef=1.0, ptx_data=sft, ppo_epochs=2, num_minibatches=2)
    recorder = RecordMetrics()
    fit(module, tmp_path, tokenizer_dir, assets_dir, callbacks=[recorder], max_steps=6)
    first, last = recorder.history[0]["loss/ptx"], recorder.history[-1]["loss/ptx"]
    assert last < first - 0.5, (first, last)


def test_ptx_needs_data_and_bad_threshold(tokenizer_dir, tiny_config):
    with pytest.raises(ValueError, match="ptx_data"):
        ppo_tests.make_module(tiny_config, tokenizer_dir, ptx_coef=0.1)
    with pytest.raises(ValueError, match="kl_threshold"):
        ppo_tests.make_module(tiny_config, tokenizer_dir, kl_threshold=0.0)
