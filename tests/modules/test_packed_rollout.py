"""Padding-free on-policy forwards: per-token log-probs, values and entropy of packed episodes (left-padded
prompt + right-padded completion) equal the padded forward's per architecture family and attention
implementation, with a shared value head and a separate critic; PPO and GRPO runs give the same losses and
trained weights with ``padding_free`` on and off."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from rlhf_lightning.data.packing import pack_episodes
from rlhf_lightning.models import CausalLMWithValueHead, load_causal_lm
from rlhf_lightning.modules import Optimization
from rlhf_lightning.modules.packed_forward import packing_mode
from rlhf_lightning.rollout import policy_forward

from tests.modules.test_packed_forward import EXACT_OPTIM, architecture, with_attention
from tests.modules.test_ppo import RecordMetrics, fit
from tests.modules.test_ppo import make_module as make_ppo
from tests.modules.test_policy_gradient import make_module as make_pg

# (prompt length, completion length) per episode; P = 5, C = 6, so T = 11.
SHAPES = [(5, 6), (2, 1), (3, 4), (1, 6), (4, 2)]
PROMPT, COMPLETION = 5, 6


def episodes(vocab_size: int, seed: int = 0):
    """A rollout-shaped batch: prompts left padded to P, completions right padded to C (pad id 0)."""
    generator = torch.Generator().manual_seed(seed)
    n, width = len(SHAPES), PROMPT + COMPLETION
    input_ids = torch.zeros(n, width, dtype=torch.long)
    attention_mask = torch.zeros(n, width, dtype=torch.long)
    completion_mask = torch.zeros(n, width, dtype=torch.long)
    for i, (p, c) in enumerate(SHAPES):
        span = slice(PROMPT - p, PROMPT + c)
        input_ids[i, span] = torch.randint(3, vocab_size, (p + c,), generator=generator)
        attention_mask[i, span] = 1
        completion_mask[i, PROMPT : PROMPT + c] = 1
    return input_ids, attention_mask, completion_mask


def test_pack_episodes_lays_out_real_tokens_only():
    input_ids, attention_mask, completion_mask = episodes(50)
    packed = pack_episodes(input_ids, attention_mask, completion_mask, max_tokens=16)
    assert packed.real_tokens == int(attention_mask.sum())
    assert packed.label_ids.numel() == int((completion_mask[:, 1:] * attention_mask[:, 1:]).sum())
    # Labels come out in the padded layout's row-major order of the shifted-grid mask.
    mask = (completion_mask[:, 1:] * attention_mask[:, 1:]).bool()
    assert torch.equal(packed.label_ids, input_ids[:, 1:][mask])
    holes = attention_mask.clone()
    holes[0, PROMPT] = 0  # a hole inside an episode
    with pytest.raises(ValueError, match="one span"):
        pack_episodes(input_ids, holes, completion_mask)
    no_prompt = completion_mask.clone()
    no_prompt[3, PROMPT - 1] = 1  # episode 3's only prompt token marked as completion
    with pytest.raises(ValueError, match="prompt token"):
        pack_episodes(input_ids, attention_mask, no_prompt)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_policy_forward_equals_padded(arch, implementation, tokenizer, tiny_config):
    config = architecture(arch, tiny_config)
    torch.manual_seed(0)
    shared = CausalLMWithValueHead(config, tokenizer=tokenizer, value_head_init_std=0.5).eval()
    with_attention(shared.pretrained_model, implementation)
    critic = CausalLMWithValueHead(config, tokenizer=tokenizer, value_head_init_std=0.5).eval()
    with_attention(critic.pretrained_model, implementation)
    policy = with_attention(load_causal_lm(config, tokenizer=tokenizer).eval(), implementation)
    assert packing_mode(policy) == "mask"  # so the packed path really runs
    batch = episodes(shared.config.vocab_size)
    cases = {"value_head": dict(model=shared), "critic": dict(model=policy, value_model=critic), "lm": dict(model=policy)}
    for name, kwargs in cases.items():
        for temperature in (1.0, 0.7):
            padded = policy_forward(*_args(kwargs, batch), temperature=temperature, return_entropy=True, **_rest(kwargs))
            for budget in (None, 32):  # one episode per row / several per row
                got = policy_forward(
                    *_args(kwargs, batch), temperature=temperature, return_entropy=True, padding_free=True,
                    max_row_tokens=budget, **_rest(kwargs),
                )
                msg = f"{name} T={temperature} budget={budget}"
                assert torch.equal(got.mask, padded.mask), msg
                assert_close(got.logprobs, padded.logprobs, atol=1e-5, rtol=0, msg=msg)
                assert_close(got.entropy, padded.entropy, atol=1e-5, rtol=0, msg=msg)
                if name == "lm":
                    assert got.values is None and padded.values is None
                else:
                    assert padded.values.abs().max() > 0.01  # a non-trivial head
                    assert_close(got.values, padded.values, atol=1e-5, rtol=0, msg=msg)


def _args(kwargs, batch):
    return (kwargs["model"], *batch)


def _rest(kwargs):
    return {k: v for k, v in kwargs.items() if k != "model"}


def test_packed_gradients_equal_padded(tokenizer, tiny_config):
    torch.manual_seed(0)
    model = CausalLMWithValueHead(tiny_config, tokenizer=tokenizer, value_head_init_std=0.5)
    batch = episodes(model.config.vocab_size)
    grads = {}
    for padding_free in (False, True):
        model.zero_grad()
        out = policy_forward(model, *batch, return_entropy=True, padding_free=padding_free)
        (out.logprobs.sum() + out.values.pow(2).sum() + out.entropy.sum()).backward()
        grads[padding_free] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and len(grads[False]) > 0
    for name, grad in grads[False].items():
        assert_close(grads[True][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_losses_and_trained_weights_equal_padded(kind, monkeypatch, tmp_path, tokenizer_dir, assets_dir, tiny_config):
    import rlhf_lightning.rollout as rollout_module

    packed_calls = []
    packed_forward = rollout_module._packed_policy_forward
    def counted(*args, **kwargs):
        packed_calls.append(1)
        return packed_forward(*args, **kwargs)

    monkeypatch.setattr(rollout_module, "_packed_policy_forward", counted)
    runs = {}
    for padding_free in (False, True):
        make = make_ppo if kind == "ppo" else make_pg
        extra = {} if kind == "ppo" else {"advantage": "grpo"}
        module = make(tiny_config, tokenizer_dir, padding_free=padding_free, optim=Optimization(**EXACT_OPTIM), **extra)
        assert packing_mode(module.policy) is not None
        recorder = RecordMetrics()
        fit(module, tmp_path / str(padding_free), tokenizer_dir, assets_dir, callbacks=[recorder], max_steps=2,
            limit_val_batches=0)
        runs[padding_free] = (recorder.history, {k: v.clone() for k, v in module.model.state_dict().items()})
        # 2 rollouts x (old + reference forwards) + 2 x 2 epochs x 2 minibatches of update forwards
        assert len(packed_calls) == (0 if not padding_free else 12), len(packed_calls)
    (base, weights), (history, state) = runs[False], runs[True]
    assert len(base) == 2
    names = [n for n in base[0] if n.startswith(("loss/", "policy/", "value/", "entropy", "kl"))]
    assert "loss/policy" in names and (kind == "grpo" or "loss/value" in names)
    for step, (got, want) in enumerate(zip(history, base)):
        for name in names:
            assert abs(got[name] - want[name]) < 1e-5, f"step {step} {name}: {got[name]} vs {want[name]}"
    for name, value in weights.items():
        assert_close(state[name], value, atol=1e-5, rtol=0, msg=name)
    initial = _initial(kind, tiny_config, tokenizer_dir)
    assert any(not torch.equal(value, value0) for value, value0 in zip(weights.values(), initial))  # the runs trained


def _initial(kind, tiny_config, tokenizer_dir):
    module = (make_ppo if kind == "ppo" else make_pg)(tiny_config, tokenizer_dir)
    return list(module.model.state_dict().values())


def test_ptx_loss_equals_padded(monkeypatch, tokenizer_dir, assets_dir, tiny_config):
    """The PPO-ptx SFT term packs its demonstrations as SFTModule does: the same NLL and gradients."""
    import os

    import rlhf_lightning.modules.on_policy as on_policy_module
    from rlhf_lightning.data import DemonstrationDataModule

    packed_calls = []
    original = on_policy_module.packed_logprobs

    def counted(*args, **kwargs):
        packed_calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(on_policy_module, "packed_logprobs", counted)
    results = {}
    for padding_free in (False, True):
        sft = DemonstrationDataModule(train_file=os.path.join(assets_dir, "sft_tiny.jsonl"), batch_size=4, shuffle=False)
        module = make_ppo(tiny_config, tokenizer_dir, ptx_coef=1.0, ptx_data=sft, padding_free=padding_free)
        losses = [module._ptx_loss() for _ in range(2)]
        losses[0].backward()
        grads = {name: p.grad.clone() for name, p in module.policy.named_parameters() if p.grad is not None}
        results[padding_free] = (torch.stack(losses).detach(), grads)
    assert len(packed_calls) == 2
    assert_close(results[True][0], results[False][0], atol=1e-5, rtol=0)
    assert len(results[False][1]) > 0
    for name, grad in results[False][1].items():
        assert_close(results[True][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_unsupported_attention_falls_back_to_padded(monkeypatch, caplog, tokenizer, tiny_config):
    """An attention implementation that takes no packed rows runs the padded forward, with the one-time
    warning of ``packing_mode``."""
    import logging

    import rlhf_lightning.modules.packed_forward as packed_forward_module
    import rlhf_lightning.rollout as rollout_module

    torch.manual_seed(0)
    model = CausalLMWithValueHead(tiny_config, tokenizer=tokenizer, value_head_init_std=0.5).eval()
    batch = episodes(model.config.vocab_size)
    padded = policy_forward(model, *batch)
    monkeypatch.setattr(packed_forward_module, "_MASK_IMPLEMENTATIONS", ())  # sdpa no longer "supported"
    monkeypatch.setattr(packed_forward_module, "_warned", set())
    monkeypatch.setattr(rollout_module, "_packed_policy_forward", lambda *a, **k: pytest.fail("packed path taken"))
    with caplog.at_level(logging.WARNING):
        got = policy_forward(model, *batch, padding_free=True)
    assert "falling back to padded" in caplog.text
    assert torch.equal(got.logprobs, padded.logprobs) and torch.equal(got.values, padded.values)
