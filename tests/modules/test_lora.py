"""``peft:`` (LoRA) on every module: only adapters (and score / value heads) train, the reference is the
base model with adapters disabled (no second copy), precomputed reference log-probs work, PPO's value
head sits on the adapted trunk, the RM's score pooling works, exports load with peft (adapter) and plain
transformers (merged), and ``disable_dropout`` makes DPO's implicit reward 0 and PPO's first ratio 1
with a dropout-heavy config."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

peft = pytest.importorskip("peft")

import rlhf_lightning.modules.ppo as ppo_module  # noqa: E402
from rlhf_lightning.callbacks import HFExport  # noqa: E402
from rlhf_lightning.models import (  # noqa: E402
    AdapterDisabledReference,
    load_causal_lm,
    load_reward_model,
    reward_model_scores,
    trainable_parameter_share,
)
from rlhf_lightning.modules import (  # noqa: E402
    DPOModule,
    FineGrainedPPOModule,
    MODPOModule,
    Optimization,
    PPOModule,
    RewardModelModule,
    SFTModule,
)
from rlhf_lightning.modules.pair_forward import pair_logps, reference_pair_logps  # noqa: E402
from rlhf_lightning.rewards import FunctionRewardSource, GoldSegmentScorer, SegmentRewardSpec  # noqa: E402

from tests.modules.test_ppo import count_positive, prompts_datamodule  # noqa: E402
from tests.modules.test_reward_model import pairs_datamodule, tiny_trainer  # noqa: E402

LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
# Every dropout of the Llama config turned up: without disable_dropout, train mode != eval mode.
DROPOUT = {"attention_dropout": 0.5}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer, tiny_config):
    """A tiny Llama saved as a HF directory: adapters written on it are loadable by name."""
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = load_causal_lm(tiny_config, tokenizer=tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def sft_datamodule(tokenizer_dir, assets_dir):
    import os

    from rlhf_lightning.data import DemonstrationDataModule

    return DemonstrationDataModule(train_file=os.path.join(assets_dir, "sft_tiny.jsonl"), tokenizer=tokenizer_dir, batch_size=4)


def _lora_only(module) -> list[str]:
    """Names of trainable parameters that are not LoRA adapters."""
    return [n for n, p in module.named_parameters() if p.requires_grad and "lora_" not in n]


def _frozen_state(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}


def _fit(module, tmp_path, datamodule, **kwargs):
    import lightning as L

    L.seed_everything(0)
    trainer = tiny_trainer(tmp_path, **kwargs)
    trainer.fit(module, datamodule=datamodule)
    return trainer


# ---------------------------------------------------------------------------------------------- SFT


def test_sft_lora_trains_adapters_only_and_exports_adapter_and_merged(tmp_path, base_dir, tokenizer_dir, assets_dir):
    module = SFTModule(base_dir, peft=LORA, optim=Optimization(lr=1e-2))
    assert _lora_only(module) == []
    trainable, total = trainable_parameter_share(module)
    assert 0 < trainable < 0.25 * total
    frozen = _frozen_state(module)
    lora_before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    export = HFExport(str(tmp_path / "hf"), on_best=False, merge_adapters=True)
    _fit(module, tmp_path, sft_datamodule(tokenizer_dir, assets_dir), max_steps=3, callbacks=[export], limit_val_batches=0)
    for name, value in module.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), f"frozen base weight {name} changed"
    assert any(not torch.equal(p, lora_before[n]) for n, p in module.named_parameters() if p.requires_grad)

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=ids, attention_mask=mask).logits
    adapter = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "hf" / "final")).eval()
    merged = load_causal_lm(str(tmp_path / "hf" / "final-merged")).eval()  # plain from_pretrained
    via_loader = load_causal_lm(str(tmp_path / "hf" / "final")).eval()  # adapter dir -> merged base
    with torch.no_grad():
        for model in (adapter, merged, via_loader):
            assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-4, rtol=1e-4)
    assert not any("lora" in n for n, _ in merged.named_parameters())


# ---------------------------------------------------------------------------------------- reward model


def test_reward_model_lora_scores_with_peft_and_reloads(tmp_path, base_dir, tokenizer_dir, assets_dir):
    module = RewardModelModule(base_dir, peft=LORA, optim=Optimization(lr=1e-2))
    trainable = [n for n in _lora_only(module)]
    assert trainable and all("score" in n for n in trainable), trainable  # the score head trains fully
    export = HFExport(str(tmp_path / "hf"), on_best=False, merge_adapters=True)
    _fit(module, tmp_path, pairs_datamodule(tokenizer_dir, assets_dir), max_steps=3, callbacks=[export], limit_val_batches=0)
    ids = torch.tensor([[5, 6, 7, 8, 2, 2], [9, 10, 11, 12, 13, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    module.model.eval()
    with torch.no_grad():
        expected = reward_model_scores(module.model, ids, mask)  # the PeftModel itself (pooling fixed)
        for path in ("final", "final-merged"):
            reloaded = load_reward_model(str(tmp_path / "hf" / path)).eval()
            assert_close(reward_model_scores(reloaded, ids, mask), expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ DPO


def test_dpo_lora_reference_is_the_base_model_without_a_copy(tmp_path, tiny_config, tokenizer_dir, assets_dir):
    torch.manual_seed(0)
    full = DPOModule(dict(tiny_config), tokenizer_dir)
    torch.manual_seed(0)
    module = DPOModule(dict(tiny_config), tokenizer_dir, peft=LORA, optim=Optimization(lr=1e-2))
    assert isinstance(module.reference, AdapterDisabledReference)
    base_params = sum(p.numel() for n, p in module.named_parameters() if "lora_" not in n)
    # The full fine-tuning module holds policy + a reference copy; the LoRA module holds one base model.
    assert base_params * 2 == sum(p.numel() for p in full.parameters())
    assert "ref_model" not in " ".join(module.state_dict())
    assert _lora_only(module) == []

    data = pairs_datamodule(tokenizer_dir, assets_dir)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.train()
    policy = pair_logps(module.model, batch)
    reference = reference_pair_logps(module.reference, batch)
    assert_close(policy.chosen_logps, reference.chosen_logps)  # LoRA B = 0 at init: policy == base
    frozen = _frozen_state(module)
    trainer = _fit(module, tmp_path, data, max_steps=4, val_check_interval=4)
    for name, value in module.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name
    # The adapter moved the policy away from the base, which still gives the reference log-probs.
    module.eval()
    moved = pair_logps(module.model, batch)
    assert not torch.allclose(moved.chosen_logps, policy.chosen_logps, atol=1e-4)
    assert_close(reference_pair_logps(module.reference, batch).chosen_logps, reference.chosen_logps)
    assert module.model.training is False  # the reference's eval switch restored the policy's mode
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_dpo_lora_precomputed_reference_equals_live(tmp_path, tiny_config, tokenizer_dir, assets_dir):
    torch.manual_seed(0)
    live = DPOModule(dict(tiny_config), tokenizer_dir, peft=LORA)
    torch.manual_seed(0)
    pre = DPOModule(dict(tiny_config), tokenizer_dir, peft=LORA, precompute_reference=True,
                    reference_cache_dir=str(tmp_path / "cache"))
    data = pairs_datamodule(tokenizer_dir, assets_dir)
    data.setup("fit")
    pre.precompute_reference_logps({"train": data.train_dataloader()})
    assert pre.reference is None and len(list(pre.parameters())) == len(list(live.parameters()))
    batch = next(iter(data.train_dataloader()))
    assert_close(pre._reference_logps(batch, "train"), live._reference_logps(batch, "train"))
    loss, _ = pre._step(batch, "train")
    assert_close(loss, torch.tensor(math.log(2.0)), atol=1e-5, rtol=0)  # step 0: policy == reference


def test_modpo_lora_smoke(tmp_path, tiny_config, tokenizer_dir, assets_dir):
    module = MODPOModule(dict(tiny_config), tokenizer_dir, peft=LORA, weights=[0.7, 0.3], margin_score_columns=["sentiment"],
                         precompute_reference=True, optim=Optimization(lr=1e-2))
    assert _lora_only(module) == []
    frozen = _frozen_state(module)
    trainer = _fit(module, tmp_path, pairs_datamodule(tokenizer_dir, assets_dir), max_steps=3, val_check_interval=3)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(torch.equal(p, frozen[n]) for n, p in module.named_parameters() if n in frozen)


# ------------------------------------------------------------------------------------------------ PPO


def test_ppo_lora_value_head_on_adapted_trunk_kl_zero_and_ratio_one(monkeypatch, tmp_path, tiny_config, tokenizer_dir, assets_dir):
    calls = []
    real = ppo_module.ppo_policy_loss

    def spy(logprobs, old_logprobs, advantages, mask, **kwargs):
        calls.append((logprobs.detach().clone(), old_logprobs.clone(), mask.clone()))
        return real(logprobs, old_logprobs, advantages, mask, **kwargs)

    monkeypatch.setattr(ppo_module, "ppo_policy_loss", spy)
    torch.manual_seed(0)
    config = dict(tiny_config, **DROPOUT)
    module = PPOModule(config, tokenizer_dir, peft=dict(LORA, lora_dropout=0.0), reward=FunctionRewardSource(count_positive),
                       sampling={"max_new_tokens": 6, "num_samples_per_prompt": 2}, ppo_epochs=1, num_minibatches=2,
                       optim=Optimization(lr=1e-2, schedule="constant"), log_samples_every_n_steps=0)
    assert isinstance(module.reference, AdapterDisabledReference)
    assert sorted(_lora_only(module)) == ["model.v_head.bias", "model.v_head.weight"]
    frozen = _frozen_state(module)
    rollouts = []
    original_collect = module.collect
    monkeypatch.setattr(module, "collect", lambda batch: rollouts.append(original_collect(batch)) or rollouts[-1])
    trainer = _fit(module, tmp_path, prompts_datamodule(tokenizer_dir, assets_dir), max_steps=2, limit_val_batches=0)
    first = rollouts[0]
    assert_close(first.logprobs * first.mask, first.ref_logprobs * first.mask)  # KL = 0 on the first rollout
    logprobs, old, mask = calls[0]
    assert_close(logprobs, old, atol=1e-5, rtol=1e-5)  # first ratio 1 (dropout disabled)
    assert all(torch.equal(p, frozen[n]) for n, p in module.named_parameters() if n in frozen)
    assert float(trainer.callback_metrics["kl"]) != 0.0  # the second rollout: the adapters moved the policy


def test_ppo_separate_critic_with_its_own_lora(tmp_path, tiny_config, tokenizer_dir, assets_dir):
    module = PPOModule(dict(tiny_config), tokenizer_dir, peft=LORA, critic=dict(tiny_config), critic_peft=LORA,
                       reward=FunctionRewardSource(count_positive), sampling={"max_new_tokens": 4},
                       ppo_epochs=1, num_minibatches=1, log_samples_every_n_steps=0)
    assert sorted(_lora_only(module)) == ["critic.v_head.bias", "critic.v_head.weight"]
    _fit(module, tmp_path, prompts_datamodule(tokenizer_dir, assets_dir), max_steps=1, limit_val_batches=0)


def test_fine_grained_lora_smoke(tmp_path, tiny_config, tokenizer_dir, assets_dir):
    spec = SegmentRewardSpec(GoldSegmentScorer("sentiment"), "sentence", weight=1.0)
    module = FineGrainedPPOModule(dict(tiny_config), tokenizer_dir, segment_rewards=[spec], peft=LORA, ppo_epochs=1,
                                  num_minibatches=1, sampling={"max_new_tokens": 6}, log_samples_every_n_steps=0)
    assert isinstance(module.reference, AdapterDisabledReference)
    trainer = _fit(module, tmp_path, prompts_datamodule(tokenizer_dir, assets_dir), max_steps=1, limit_val_batches=0)
    assert torch.isfinite(trainer.callback_metrics["loss/policy"])


# -------------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("disable", [True, False])
def test_dpo_implicit_reward_is_zero_at_init_only_without_dropout(disable, tiny_config, tokenizer_dir, assets_dir):
    torch.manual_seed(0)
    module = DPOModule(dict(tiny_config, **DROPOUT), tokenizer_dir, disable_dropout=disable)
    data = pairs_datamodule(tokenizer_dir, assets_dir)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.train()
    module.reference.eval()
    torch.manual_seed(1)
    _, metrics = module._step(batch, "train")
    rewards = torch.stack([metrics["rewards/chosen"], metrics["rewards/rejected"]])
    if disable:
        assert_close(rewards, torch.zeros_like(rewards), atol=1e-5, rtol=0)
    else:
        assert rewards.abs().max() > 1e-3  # dropout in the policy's train-mode forward


def test_ppo_first_ratio_is_one_with_a_dropout_config(monkeypatch, tmp_path, tiny_config, tokenizer_dir, assets_dir):
    calls = []
    real = ppo_module.ppo_policy_loss

    def spy(logprobs, old_logprobs, advantages, mask, **kwargs):
        calls.append((logprobs.detach().clone(), old_logprobs.clone()))
        return real(logprobs, old_logprobs, advantages, mask, **kwargs)

    monkeypatch.setattr(ppo_module, "ppo_policy_loss", spy)
    torch.manual_seed(0)
    module = PPOModule(dict(tiny_config, **DROPOUT), tokenizer_dir, reward=FunctionRewardSource(count_positive),
                       sampling={"max_new_tokens": 6}, ppo_epochs=1, num_minibatches=1, log_samples_every_n_steps=0)
    _fit(module, tmp_path, prompts_datamodule(tokenizer_dir, assets_dir), max_steps=1, limit_val_batches=0)
    assert_close(calls[0][0], calls[0][1], atol=1e-5, rtol=1e-5)


def test_peft_argument_errors(tiny_config, tokenizer_dir):
    with pytest.raises(ValueError, match="LoraConfig does not take"):
        SFTModule(dict(tiny_config), tokenizer_dir, peft={"rank": 4})
    with pytest.raises(ValueError, match="critic_peft needs a separate"):
        PPOModule(dict(tiny_config), tokenizer_dir, critic_peft=LORA, reward=FunctionRewardSource(count_positive))


# ------------------------------------------------------------------------------------ critic from an RM


def test_critic_from_a_reward_model_starts_at_its_scores_and_warms_up_alone(tmp_path, tiny_config, tokenizer, tokenizer_dir, assets_dir):
    """``critic=<RM folder>``: the critic's value at a sequence's last token is the reward model's score
    of it (same trunk, score head copied into the value head). ``critic_warmup_steps=1``: the first
    rollout updates the critic only."""
    torch.manual_seed(0)
    rm = load_reward_model(dict(tiny_config), tokenizer=tokenizer)
    with torch.no_grad():
        rm.score.weight.normal_(0.0, 1.0)
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    module = PPOModule(dict(tiny_config), tokenizer_dir, critic=str(tmp_path / "rm"), critic_warmup_steps=1,
                       reward=FunctionRewardSource(count_positive), sampling={"max_new_tokens": 4}, ppo_epochs=1,
                       num_minibatches=1, log_samples_every_n_steps=0, optim=Optimization(lr=1e-2))
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        values = module.critic.values(ids, mask)
        scores = reward_model_scores(rm.eval(), ids, mask)
    assert_close(values[torch.arange(2), mask.sum(-1) - 1], scores, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in module.critic.pretrained_model.score.parameters())  # copied, unused

    policy_before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    critic_before = {n: p.detach().clone() for n, p in module.critic.named_parameters()}
    _fit(module, tmp_path, prompts_datamodule(tokenizer_dir, assets_dir), max_steps=1, limit_val_batches=0)
    assert all(torch.equal(p, policy_before[n]) for n, p in module.model.named_parameters()), "warm-up moved the policy"
    assert any(not torch.equal(p, critic_before[n]) for n, p in module.critic.named_parameters())
    with pytest.raises(ValueError, match="critic_warmup_steps"):
        PPOModule(dict(tiny_config), tokenizer_dir, critic_warmup_steps=2, reward=FunctionRewardSource(count_positive))


def test_peft_from_the_command_line(tokenizer_dir, assets_dir, tmp_path):
    """``--model.init_args.peft='{...}'`` on a shipped config builds a LoRA policy."""
    import os

    from rlhf_lightning.cli import cli_main

    from tests.modules.test_sft import REPO, TINY_MODEL_ARGS

    cli = cli_main([
        "--config", os.path.join(REPO, "configs", "dpo.yaml"), "--model.init_args.model.model_type=llama", *TINY_MODEL_ARGS,
        f"--model.init_args.tokenizer={tokenizer_dir}", "--model.init_args.peft={r: 4, lora_alpha: 8, target_modules: all-linear}",
        f"--data.init_args.train_file={os.path.join(assets_dir, 'pairs_tiny.jsonl')}", "--data.init_args.val_file=null",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
    ], run=False)
    assert cli.model.hparams["peft"] == {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    assert isinstance(cli.model.reference, AdapterDisabledReference) and _lora_only(cli.model) == []
