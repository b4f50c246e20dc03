"""The critic-free family (PolicyGradientModule and its GRPO / RLOO / REINFORCE++ aliases): a smoke fit per
advantage estimator and variant (DAPO, GSPO, ReMax), no value model anywhere, the group advantages reach the
loss, dynamic sampling keeps informative groups at a constant batch size, kl_placement, clear errors, and
learning tests (tiny model on a programmatic reward; the SFT policy on the embedded world's gold sentiment)."""

from __future__ import annotations

import os

import pytest
import torch
from torch.testing import assert_close

import rlhf_lightning.modules.policy_gradient as pg_module
from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.generation import SamplingConfig
from rlhf_lightning.losses import group_advantages
from rlhf_lightning.modules import GRPOModule, Optimization, PolicyGradientModule, ReinforcePPModule, RLOOModule
from rlhf_lightning.rewards import FunctionRewardSource, GoldRewardSource

from tests.modules.test_ppo import (
    RecordMetrics, _fixture_or_skip, count_great, count_positive, fit, prompts_datamodule,
)

TRAIN_METRICS = (
    "reward/raw", "reward/score", "kl", "kl_coef", "advantage/std", "entropy", "policy/clipfrac", "policy/approx_kl",
    "loss/policy", "response_length", "finished_fraction",
)

VARIANTS = {
    "grpo": dict(advantage="grpo"),
    "dr_grpo": dict(advantage="dr_grpo"),
    "dapo": dict(advantage="grpo", clip_range_low=0.2, clip_range_high=0.28, loss_aggregation="token_mean",
                 dynamic_sampling=True, kl_coef=0.0),
    "gspo": dict(advantage="grpo", ratio_level="sequence", clip_range_low=3e-4, clip_range_high=4e-4),
    "rloo": dict(advantage="rloo"),
    "reinforce_pp": dict(advantage="reinforce_pp"),
    "remax": dict(advantage="remax"),
}


def make_module(tiny_config, tokenizer_dir, seed=0, cls=PolicyGradientModule, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("reward", FunctionRewardSource(count_positive))
    kwargs.setdefault("sampling", SamplingConfig(max_new_tokens=6, num_samples_per_prompt=4))
    kwargs.setdefault("ppo_epochs", 2)
    kwargs.setdefault("num_minibatches", 2)
    kwargs.setdefault("optim", Optimization(lr=3e-3, schedule="constant"))
    kwargs.setdefault("log_samples_every_n_steps", 0)
    return cls(tiny_config, tokenizer_dir, **kwargs)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_smoke_fit(variant, tmp_path, tokenizer_dir, assets_dir, tiny_config):
    module = make_module(tiny_config, tokenizer_dir, **VARIANTS[variant])
    assert module.value_model is None and module.critic is None
    policy_before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer = fit(module, tmp_path, tokenizer_dir, assets_dir, max_steps=2)
    assert trainer.global_step == 2  # one Lightning step per rollout (2 epochs x 2 minibatches inside)
    for name in TRAIN_METRICS:
        assert name in trainer.callback_metrics and torch.isfinite(trainer.callback_metrics[name]), name
    assert module.last_rollout_size == 16  # 4 prompts x 4 samples (dynamic sampling keeps the size)
    assert any(not torch.equal(policy_before[k], v) for k, v in module.policy.state_dict().items()), "policy did not move"
    # Critic-free: the optimizer holds exactly the policy's parameters, nothing else.
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.policy.parameters()}
    assert module.export_model() is module.policy
    if variant == "remax":
        assert "reward/greedy" in trainer.callback_metrics
    if VARIANTS[variant]["advantage"] in ("grpo", "dr_grpo", "rloo"):
        assert 0 <= trainer.callback_metrics["groups/informative_fraction"] <= 1


def test_aliases_pick_their_advantage(tokenizer_dir, tiny_config):
    assert make_module(tiny_config, tokenizer_dir, cls=GRPOModule).advantage == "grpo"
    assert make_module(tiny_config, tokenizer_dir, cls=RLOOModule).advantage == "rloo"
    module = make_module(tiny_config, tokenizer_dir, cls=ReinforcePPModule)
    assert module.advantage == "reinforce_pp" and module.loss_aggregation == "token_mean" and module.kl_placement == "reward"
    module = make_module(tiny_config, tokenizer_dir, cls=GRPOModule)
    assert module.loss_aggregation == "sequence_mean" and module.kl_placement == "loss"
    assert make_module(tiny_config, tokenizer_dir, cls=RLOOModule, advantage="remax").advantage == "remax"


@pytest.mark.parametrize("advantage,baseline,scale", [("grpo", "mean", "std"), ("dr_grpo", "mean", "none"),
                                                      ("rloo", "leave_one_out", "none")])
def test_group_advantages_reach_the_loss(advantage, baseline, scale, monkeypatch, tmp_path, tokenizer_dir, assets_dir, tiny_config):
    """With the KL in the loss (or kl_coef 0), the advantages handed to the loss are group_advantages of the
    rollout's scores, on every completion token."""
    seen = []
    real = pg_module.policy_gradient_loss

    def spy(logprobs, old_logprobs, advantages, mask, **kwargs):
        seen.append((advantages.clone(), mask.clone()))
        return real(logprobs, old_logprobs, advantages, mask, **kwargs)

    monkeypatch.setattr(pg_module, "policy_gradient_loss", spy)
    module = make_module(tiny_config, tokenizer_dir, advantage=advantage, kl_coef=0.0, ppo_epochs=1, num_minibatches=1)
    collected = []
    real_collect = module.collect
    module.collect = lambda batch, **kw: collected.append(real_collect(batch, **kw)) or collected[-1]
    fit(module, tmp_path, tokenizer_dir, assets_dir, max_steps=1)
    rollout = collected[0]
    expected = group_advantages(rollout.scores, 4, baseline=baseline, scale=scale)
    advantages, mask = seen[0]  # one minibatch = the whole rollout, in the order of a permutation
    # Each row's advantage is constant over its tokens; compare as sorted multisets (rows were permuted).
    per_row = (advantages * mask).sum(1) / mask.sum(1)
    assert_close(per_row.sort().values, expected.sort().values)
    assert_close(advantages * mask, per_row.unsqueeze(1) * mask)


def test_kl_in_reward_lowers_the_group_score(tokenizer_dir, tiny_config, assets_dir):
    """kl_placement=reward: the score entering the group baseline is s - kl_coef * sequence KL."""
    module = make_module(tiny_config, tokenizer_dir, advantage="rloo", kl_coef=0.5)
    batch = next(iter(prompts_datamodule(tokenizer_dir, assets_dir).train_dataloader()))
    rollout = module.collect(batch)
    kl = torch.rand_like(rollout.logprobs) * rollout.mask
    advantages = module.compute_advantages(rollout, kl)
    expected = group_advantages(rollout.scores - 0.5 * (kl * rollout.mask).sum(1), 4, baseline="leave_one_out", scale="none")
    assert_close(advantages, expected.unsqueeze(1) * rollout.mask)


def test_dynamic_sampling_drops_all_equal_groups_and_refills(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    """Reward = completion-length parity on horror prompts, 0 elsewhere. The first batch (4 comedy prompts)
    has only all-equal groups; the refill (the 4 horror prompts) brings informative groups, which come
    first; all-equal groups fill the rest, so the rollout keeps its size."""

    def reward(prompt, completion):
        return float("horror" in prompt) * float(len(completion.split()) % 2)

    module = make_module(tiny_config, tokenizer_dir, reward=FunctionRewardSource(reward), advantage="grpo",
                         dynamic_sampling=True, max_refill_rounds=1, ppo_epochs=1, num_minibatches=1)
    comedy, horror = list(prompts_datamodule(tokenizer_dir, assets_dir, shuffle=False).train_dataloader())[:2]
    rollout = module.collect(comedy)
    assert not module._informative(rollout).any()
    refills = iter([horror])
    module._next_refill_batch = lambda: next(refills)
    sampled = module.dynamically_sample(rollout)
    assert len(sampled) == len(rollout) and sampled.group_size == 4
    refill = module.collect(horror, seed_offset=1)  # the same draw the refill made
    num_new = int(module._informative(refill).sum())
    assert num_new > 0, "the refill must bring informative groups, or the test proves nothing"
    assert module._informative(sampled).tolist() == [True] * num_new + [False] * (4 - num_new)
    for g in range(4):
        rows = slice(g * 4, g * 4 + 4)
        assert len(set(sampled.prompt_text[rows])) == 1 and sampled.prompt_index[rows].unique().numel() == 1
        assert ("horror" in sampled.prompt_text[g * 4]) == (g < num_new)
    assert sampled.prompt_index.view(-1, 4)[:, 0].unique().numel() == 4  # distinct group ids after the merge
    assert_close(sampled.scores[: 4 * num_new], refill.scores.view(-1, 4)[module._informative(refill)].reshape(-1))
    # The merged rollout keeps the shared layout: completions start at prompt_length for every row.
    assert torch.all(sampled.completion_mask[:, : sampled.prompt_length] == 0)


def test_bad_arguments(tokenizer_dir, tiny_config):
    with pytest.raises(ValueError, match="advantage must be one of"):
        make_module(tiny_config, tokenizer_dir, advantage="a2c")
    with pytest.raises(ValueError, match="num_samples_per_prompt >= 2"):
        make_module(tiny_config, tokenizer_dir, advantage="grpo", sampling=SamplingConfig(num_samples_per_prompt=1))
    with pytest.raises(ValueError, match="dynamic_sampling needs a group advantage"):
        make_module(tiny_config, tokenizer_dir, advantage="reinforce_pp", dynamic_sampling=True)
    with pytest.raises(ValueError, match="kl_placement"):
        make_module(tiny_config, tokenizer_dir, kl_placement="both")
    with pytest.raises(ValueError, match="loss_aggregation"):
        make_module(tiny_config, tokenizer_dir, loss_aggregation="sum")
    with pytest.raises(ValueError, match="ptx_data"):
        make_module(tiny_config, tokenizer_dir, ptx_coef=0.1)
    # REINFORCE++ and ReMax work with one sample per prompt.
    make_module(tiny_config, tokenizer_dir, advantage="reinforce_pp", sampling=SamplingConfig(num_samples_per_prompt=1))


@pytest.mark.slow
@pytest.mark.parametrize("advantage", ["grpo"])
def test_learns_to_say_great(advantage, tmp_path, tokenizer_dir, assets_dir, tiny_config):
    """Reward = number of "great" tokens (~0.1 in 8 tokens for the random tiny LM): the reward rises by > 1
    within 15 rollouts with a weak KL, as PPO's test asks (RLOO and REINFORCE++ passed it too, 10 s each;
    they are left to the embedded-world tests below to keep the suite short)."""
    module = make_module(
        tiny_config, tokenizer_dir, reward=FunctionRewardSource(count_great), advantage=advantage,
        sampling=SamplingConfig(max_new_tokens=8, num_samples_per_prompt=4), kl_coef=0.01,
    )
    recorder = RecordMetrics()
    fit(module, tmp_path, tokenizer_dir, assets_dir, callbacks=[recorder], max_steps=15,
        datamodule=prompts_datamodule(tokenizer_dir, assets_dir, batch_size=8))
    early, late = recorder.mean("reward/raw", slice(0, 3)), recorder.mean("reward/raw", slice(-3, None))
    assert late > early + 1.0, (early, late)


@pytest.mark.slow
@pytest.mark.parametrize("advantage", ["grpo", "rloo", "reinforce_pp"])
def test_gold_sentiment_rises_on_the_embedded_world(advantage, request, tmp_path):
    """From the session's SFT policy, against the gold sentiment scorer: gold sentiment rises (one module per
    family: GRPOModule's, RLOOModule's and ReinforcePPModule's estimator)."""
    world_dir = _fixture_or_skip(request, "world_dir")
    sft_policy_dir = _fixture_or_skip(request, "sft_policy_dir")
    torch.manual_seed(0)
    module = PolicyGradientModule(
        sft_policy_dir, os.path.join(world_dir, "tokenizer"), reward=GoldRewardSource("sentiment"), advantage=advantage,
        sampling=SamplingConfig(max_new_tokens=24, num_samples_per_prompt=4), ppo_epochs=1, num_minibatches=2,
        kl_coef=0.02, optim=Optimization(lr=1e-4, schedule="constant"), log_samples_every_n_steps=0,
    )
    datamodule = PromptDataModule(train_file=os.path.join(world_dir, "prompts_train.jsonl"), batch_size=8)
    recorder = RecordMetrics()
    # 40 rollouts: at 20 the per-rollout reward (32 samples, s.d. ~0.15 rollout to rollout) had not left its
    # noise band for any of the three estimators (measured: late - early +0.15 / +0.18 / +0.09 with 3-rollout
    # windows); at 40 they gain +0.4 / +0.4 / +0.2 over 5-rollout windows.
    fit(module, tmp_path, None, None, callbacks=[recorder], datamodule=datamodule, max_steps=40)
    early, late = recorder.mean("reward/raw", slice(0, 5)), recorder.mean("reward/raw", slice(-5, None))
    assert late > early + 0.12, (early, late)


@pytest.mark.parametrize("config", ["grpo.yaml", "rloo.yaml", "reinforce_pp.yaml"])
def test_cli_runs_the_config(config, tmp_path, tokenizer_dir, assets_dir, tiny_config):
    """Each shipped config through the console script, shrunk to a tiny policy, the gold reward and 2
    rollouts: it writes the metrics CSV, a checkpoint and the exported HF policy."""
    import json

    from transformers import AutoModelForCausalLM

    from rlhf_lightning.cli import cli_main

    root = tmp_path / "run"
    prompts = os.path.join(assets_dir, "prompts_tiny.jsonl")
    reward = {"class_path": "rlhf_lightning.rewards.GoldRewardSource", "init_args": {"objective": "sentiment"}}
    cli_main([
        "fit", "--config", os.path.join(os.path.dirname(__file__), "..", "..", "configs", config),
        f"--model.init_args.policy={json.dumps(tiny_config)}", f"--model.init_args.tokenizer={tokenizer_dir}",
        f"--model.init_args.reward={json.dumps(reward)}", "--model.init_args.gold_objectives=[sentiment]",
        "--model.init_args.sampling.max_new_tokens=4", "--model.init_args.ppo_epochs=1",
        f"--data.init_args.train_file={prompts}", f"--data.init_args.val_file={prompts}", "--data.init_args.batch_size=4",
        "--data.init_args.val_batch_size=8", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
        f"--run_dir={root}",
    ])
    metrics = list(root.glob("logs/version_*/metrics.csv"))
    assert metrics, "no metrics CSV written"
    header = metrics[0].read_text().splitlines()[0].split(",")
    for name in ("reward/raw", "kl", "kl_coef", "loss/policy", "val/gold/sentiment", "val/kl_to_reference"):
        assert name in header, name
    assert list(root.rglob("*.ckpt")), "no checkpoint written"
    exported = AutoModelForCausalLM.from_pretrained(root / "hf" / "final")
    assert exported.config.hidden_size == tiny_config["hidden_size"]


@pytest.mark.slow
def test_grpo_learns_the_verifiable_task(request, tmp_path):
    """RL with a verifiable reward: GRPO against the rule "state the prompt's rating" (states_rating) raises
    the share of completions that pass it, from the SFT policy's."""
    from rlhf_lightning.rewards import VerifiableRewardSource

    world_dir = _fixture_or_skip(request, "world_dir")
    sft_policy_dir = _fixture_or_skip(request, "sft_policy_dir")
    torch.manual_seed(0)
    module = GRPOModule(
        sft_policy_dir, os.path.join(world_dir, "tokenizer"), reward=VerifiableRewardSource("states_rating"),
        sampling=SamplingConfig(max_new_tokens=32, num_samples_per_prompt=4), ppo_epochs=1, num_minibatches=2,
        kl_coef=0.01, optim=Optimization(lr=3e-4, schedule="constant"), log_samples_every_n_steps=0,
    )
    datamodule = PromptDataModule(train_file=os.path.join(world_dir, "prompts_train.jsonl"), batch_size=8)
    recorder = RecordMetrics()
    fit(module, tmp_path, None, None, callbacks=[recorder], datamodule=datamodule, max_steps=20)
    early, late = recorder.mean("reward/raw", slice(0, 3)), recorder.mean("reward/raw", slice(-3, None))
    assert late > early + 0.15, (early, late)


def test_resume_equals_uninterrupted_run(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    """GRPO with an adaptive KL controller: resumed from the checkpoint after rollout 2 of 4, it ends with the
    weights, optimizer state and kl_coef of the uninterrupted run (the base's checkpoint hooks, its own key)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from rlhf_lightning.callbacks import AdaptiveKLController

    def run(root, ckpt_path=None):
        module = make_module(tiny_config, tokenizer_dir, cls=GRPOModule, sampling=SamplingConfig(max_new_tokens=6, num_samples_per_prompt=2))
        controller = AdaptiveKLController(init_kl_coef=0.1, target=1.0, horizon=20)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / root, every_n_train_steps=2, save_top_k=-1, filename="{step}")
        trainer = fit(module, tmp_path / root, tokenizer_dir, assets_dir, callbacks=[controller, checkpoints], max_steps=4,
                      ckpt_path=ckpt_path, enable_checkpointing=True,
                      datamodule=prompts_datamodule(tokenizer_dir, assets_dir, shuffle=False, batch_size=8))
        return module, trainer

    full, full_trainer = run("full")
    mid = tmp_path / "full" / "step=2.ckpt"
    saved = torch.load(mid, weights_only=False)
    assert "policy_gradient" in saved and not any(k.startswith("ref_model.") for k in saved["state_dict"])
    resumed, resumed_trainer = run("resumed", ckpt_path=str(mid))
    assert resumed_trainer.global_step == full_trainer.global_step == 4
    assert resumed.kl_coef == full.kl_coef != 0.1
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    full_state = full_trainer.optimizers[0].state_dict()["state"]
    resumed_state = resumed_trainer.optimizers[0].state_dict()["state"]
    for key in full_state:
        assert int(resumed_state[key]["step"]) == int(full_state[key]["step"]) == 16  # 4 rollouts x 2 x 2
