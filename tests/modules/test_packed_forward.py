"""Packed layouts (padding-free, shared prompt) give the padded path's numbers: per-sequence log-probs and
rewards per architecture family (rotary Llama, absolute-position GPT-2) and attention implementation,
gradients, and the losses and trained weights of DPO, the reward model and SFT after a few steps."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.testing import assert_close

from rlhf_lightning.data import DemonstrationCollator
from rlhf_lightning.data.packing import pack_pairs, pack_sequences
from rlhf_lightning.logprobs import causal_lm_logprobs
from rlhf_lightning.models import load_causal_lm, load_reward_model
from rlhf_lightning.modules import Optimization, RewardModelModule, SFTModule
from rlhf_lightning.modules.packed_forward import packed_logprobs, packing_mode, reward_packing_supported
from rlhf_lightning.modules.pair_forward import concatenate_pair, pair_logps, reward_pair_scores

from tests.modules.test_dpo import RecordLosses, fit, make_module
from tests.modules.test_pair_forward import PAIRS, make_batch
from tests.modules.test_reward_model import pairs_datamodule, tiny_trainer

TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
PACKED = ("padding_free", "shared_prompt")
# Adam divides by sqrt(v) + eps: with eps = 1e-8 a parameter whose gradient is ~1e-9 (rounding noise
# around zero, e.g. a token's embedding seen only where it barely matters) takes a full lr-sized step in
# whichever direction the noise points, so trained weights would compare rounding noise, not the
# layouts. eps = 1e-4 keeps real gradients' steps (|g| >> 1e-4) and damps the noise's.
EXACT_OPTIM = dict(lr=1e-3, eps=1e-4)
# Longer pairs than PAIRS, several per row at a larger budget, prompts of different lengths.
MORE_PAIRS = PAIRS + [
    ("the acting and the music were", "fun fun fun", "slow"),
    ("we", "really loved the ending and the story", "hated the ending but the music was good"),
]


def architecture(name: str, tiny_config: dict) -> dict:
    return dict(tiny_config) if name == "llama" else dict(TINY_GPT2)


def with_attention(model, implementation: str):
    model.config._attn_implementation = implementation
    return model


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pair_logps_and_rewards_equal_padded(arch, implementation, tokenizer, tiny_config):
    config = architecture(arch, tiny_config)
    torch.manual_seed(0)
    policy = with_attention(load_causal_lm(config, tokenizer=tokenizer).eval(), implementation)
    reward_model = with_attention(load_reward_model(config, tokenizer=tokenizer).eval(), implementation)
    batch = make_batch(tokenizer, MORE_PAIRS)
    for average in (False, True):
        padded = pair_logps(policy, batch, average=average, return_logits_mean=True)
        for layout in PACKED:
            for budget in (None, 64):  # one unit per row / several units per row
                got = pair_logps(policy, batch, average=average, return_logits_mean=True, layout=layout, max_row_tokens=budget)
                for field in ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens", "chosen_logits_mean",
                              "rejected_logits_mean"):
                    assert_close(getattr(got, field), getattr(padded, field), atol=1e-5, rtol=0, msg=f"{layout} {budget} {field}")
    assert reward_packing_supported(reward_model)  # so the packed path below really runs packed
    chosen, rejected = reward_pair_scores(reward_model, batch)
    for layout in PACKED:
        got_chosen, got_rejected = reward_pair_scores(reward_model, batch, layout=layout, max_row_tokens=64)
        assert_close(got_chosen, chosen, atol=1e-5, rtol=0)
        assert_close(got_rejected, rejected, atol=1e-5, rtol=0)


def test_packing_computes_fewer_tokens_and_a_leaky_mask_is_caught(tokenizer, tiny_model):
    """The shared prompt really is laid out once, and the comparison above can fail: letting the packed
    sequences see each other (one segment per row) changes the log-probs."""
    batch = make_batch(tokenizer, MORE_PAIRS)
    pair = concatenate_pair(batch)
    real = int(pair.attention_mask.sum())
    free = pack_pairs(pair.input_ids, pair.attention_mask, pair.completion_mask, pair.num_pairs, shared_prompt=False)
    tree = pack_pairs(pair.input_ids, pair.attention_mask, pair.completion_mask, pair.num_pairs)
    prompts = int((pair.attention_mask[: pair.num_pairs] * (1 - pair.completion_mask[: pair.num_pairs])).sum())
    assert free.real_tokens == real and tree.real_tokens == real - prompts
    assert free.input_ids.numel() < pair.input_ids.numel() and tree.input_ids.numel() < free.input_ids.numel()
    tiny_model.eval()
    exact = packed_logprobs(tiny_model, free).sequence
    leaky = free._replace(segment_ids=torch.where(free.segment_ids >= 0, 0, -1))
    assert free.num_rows < len(MORE_PAIRS) * 2  # several sequences share a row, so a leak has something to see
    assert (packed_logprobs(tiny_model, leaky).sequence - exact).abs().max() > 1e-3
    assert not tiny_model.get_output_embeddings()._forward_pre_hooks  # the gathering hook is removed after the forward


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_transformers_packed_position_ids_agree_with_our_mask(arch, tokenizer, tiny_config):
    """What flash-attention runs on (``packing_mode == "position_ids"``): transformers finds the packed
    sequences from ``position_ids`` when no mask is given and no cache is in use (``use_cache=False``;
    with a cache it does not look). Checked here with SDPA on CPU against the mask we build."""
    torch.manual_seed(0)
    model = load_causal_lm(architecture(arch, tiny_config), tokenizer=tokenizer).eval()
    pair = concatenate_pair(make_batch(tokenizer, MORE_PAIRS))
    packed = pack_pairs(pair.input_ids, pair.attention_mask, pair.completion_mask, pair.num_pairs, shared_prompt=False, max_tokens=40)
    inputs = {"input_ids": packed.input_ids, "position_ids": packed.position_ids, "use_cache": False}
    ours = model(attention_mask=packed.attention_allowed(), **inputs).logits
    theirs = model(attention_mask=None, **inputs).logits
    real = packed.segment_ids >= 0
    assert_close(theirs[real], ours[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sft_token_logps_and_gradients_equal_padded(arch, tokenizer, tiny_config):
    torch.manual_seed(0)
    model = load_causal_lm(architecture(arch, tiny_config), tokenizer=tokenizer).eval()
    features = [{"prompt_ids": tokenizer(p)["input_ids"], "completion_ids": tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id], "index": i}
                for i, (p, c, _) in enumerate(MORE_PAIRS)]
    batch = DemonstrationCollator(pad_token_id=tokenizer.pad_token_id)(features)
    score = batch["completion_mask"] * batch["attention_mask"]

    def loss_and_grads(packed: bool):
        model.zero_grad(set_to_none=True)
        if packed:
            out = packed_logprobs(model, pack_sequences(batch["input_ids"], batch["attention_mask"], score, max_tokens=40))
            sequence, loss = out.sequence, -out.token_logps.sum() / out.tokens.sum()
        else:
            out = causal_lm_logprobs(model, batch["input_ids"], batch["attention_mask"], score)
            sequence, loss = out.sequence, -out.tokens.sum() / out.mask.sum()
        loss.backward()
        return sequence.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    padded, packed = loss_and_grads(False), loss_and_grads(True)
    assert_close(packed[0], padded[0], atol=1e-5, rtol=0)
    assert_close(packed[1], padded[1], atol=1e-6, rtol=0)
    for name, grad in padded[2].items():
        assert_close(packed[2][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_unknown_attention_implementation_is_not_packed(caplog):
    class Stub(torch.nn.Module):
        def __init__(self, implementation):
            super().__init__()
            self.config = type("Config", (), {"_attn_implementation": implementation})()

    assert packing_mode(Stub("sdpa")) == "mask" and packing_mode(Stub("eager")) == "mask"
    assert packing_mode(Stub("flash_attention_2")) == "position_ids"
    with caplog.at_level(logging.WARNING):
        assert packing_mode(Stub("some_custom_kernel")) is None
    assert "falling back to padded" in caplog.text


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_losses_and_trained_weights_equal_padded(precompute, tmp_path, tokenizer_dir, assets_dir, tiny_config):
    runs = {}
    for layout in ("padded", "padding_free", "shared_prompt"):
        module = make_module(
            tiny_config, tokenizer_dir, precompute_reference=precompute,
            padding_free=layout != "padded", shared_prompt=layout == "shared_prompt", optim=Optimization(**EXACT_OPTIM),
        )
        assert module.pair_layout == layout
        recorder = RecordLosses()
        fit(module, tmp_path / layout, tokenizer_dir, assets_dir, callbacks=[recorder], max_steps=4, val_check_interval=2)
        runs[layout] = (recorder, module.model.state_dict())
    base, weights = runs["padded"]
    assert len(base.train) == 4 and len(base.val) > 0
    for layout in PACKED:
        recorder, state = runs[layout]
        assert_close(torch.tensor(recorder.train), torch.tensor(base.train), atol=1e-5, rtol=0)
        assert_close(torch.tensor(recorder.val), torch.tensor(base.val), atol=1e-5, rtol=0)
        for name, value in weights.items():
            assert_close(state[name], value, atol=1e-5, rtol=0, msg=f"{layout} {name}")


def test_reward_model_and_sft_trained_weights_equal_padded(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    from rlhf_lightning.data import DemonstrationDataModule

    import lightning as L
    import os

    for kind in ("rm", "sft"):
        states = {}
        for padding_free in (False, True):
            L.seed_everything(0)
            if kind == "rm":
                module = RewardModelModule(tiny_config, tokenizer_dir, padding_free=padding_free, optim=Optimization(**EXACT_OPTIM))
                data = pairs_datamodule(tokenizer_dir, assets_dir)
            else:
                module = SFTModule(tiny_config, tokenizer_dir, padding_free=padding_free, optim=Optimization(**EXACT_OPTIM))
                data = DemonstrationDataModule(train_file=os.path.join(assets_dir, "sft_tiny.jsonl"), tokenizer=tokenizer_dir, batch_size=4)
            trainer = tiny_trainer(tmp_path / f"{kind}{padding_free}", max_steps=3, limit_val_batches=0)
            trainer.fit(module, datamodule=data)
            states[padding_free] = (float(trainer.callback_metrics["train/loss"]), module.model.state_dict())
        assert abs(states[True][0] - states[False][0]) < 1e-5, kind
        for name, value in states[False][1].items():
            assert_close(states[True][1][name], value, atol=1e-5, rtol=0, msg=f"{kind} {name}")
