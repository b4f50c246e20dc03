"""Model loading: inline configs, the real from_pretrained path (a local directory), RM pooling, value head."""

import os

import pytest
import torch

from rlhf_lightning.logprobs import position_ids_from_attention_mask
from rlhf_lightning.models import (
    CausalLMWithValueHead,
    build_config,
    freeze,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    resolve_dtype,
    reward_model_scores,
)


def test_inline_config_takes_vocab_and_special_ids_from_tokenizer(tokenizer, tiny_config):
    config = build_config(tiny_config, tokenizer)
    assert config.vocab_size == len(tokenizer)
    assert config.pad_token_id == tokenizer.pad_token_id and config.eos_token_id == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="model_type"):
        build_config({"hidden_size": 8})


def test_from_pretrained_local_directory_roundtrip(tmp_path, tiny_model, tokenizer):
    tiny_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_causal_lm(str(tmp_path))
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    torch.testing.assert_close(reloaded(ids).logits, tiny_model(ids).logits, atol=1e-5, rtol=0)
    assert load_tokenizer(str(tmp_path)).pad_token_id == tokenizer.pad_token_id


def test_tokenizer_without_pad_token_gets_eos(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    import json

    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("pad_token", None)
    config_path.write_text(json.dumps(config))
    loaded = load_tokenizer(str(tmp_path), padding_side="left")
    assert loaded.pad_token == loaded.eos_token
    assert loaded.padding_side == "left"
    with pytest.raises(ValueError, match="padding_side"):
        load_tokenizer(str(tmp_path), padding_side="middle")


@pytest.mark.parametrize("pad_equals_eos", [False, True])
def test_reward_model_reads_last_real_token_for_both_padding_sides(tokenizer, tiny_config, pad_equals_eos):
    torch.manual_seed(0)
    reward_model = freeze(load_reward_model(tiny_config, tokenizer=tokenizer))
    pad = tokenizer.eos_token_id if pad_equals_eos else tokenizer.pad_token_id
    rows = [[2, 10, 11, 3], [2, 12, 13, 14, 15, 3]]
    singles = torch.stack([reward_model_scores(reward_model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))[0] for r in rows])
    width = max(map(len, rows))
    for side in ("left", "right"):
        ids = torch.full((2, width), pad)
        mask = torch.zeros(2, width, dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
            ids[i, sl] = torch.tensor(r)
            mask[i, sl] = 1
        torch.testing.assert_close(reward_model_scores(reward_model, ids, mask), singles, atol=1e-5, rtol=0)


def test_value_head_shapes_and_logits_match_plain_lm(tokenizer, tiny_config):
    torch.manual_seed(0)
    with_value = CausalLMWithValueHead(tiny_config, tokenizer=tokenizer, value_head_init_std=0.02)
    ids = torch.tensor([[2, 10, 11, 12], [2, 13, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    logits, values = with_value(ids, mask)
    assert logits.shape == (2, 4, len(tokenizer)) and values.shape == (2, 4)
    plain = with_value.pretrained_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[0], plain[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(with_value.values(ids, mask), values)


def test_freeze_and_dtype_aliases(tiny_model):
    freeze(tiny_model)
    assert not tiny_model.training and not any(p.requires_grad for p in tiny_model.parameters())
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("auto") is None
    with pytest.raises(ValueError):
        resolve_dtype("float7")


# ---- weight soups as model specs (SALSA reference, WARM reward model) -------------------------------------


@pytest.fixture()
def two_checkpoints(tmp_path, tokenizer, tiny_config):
    """Two tiny Llamas of one architecture, different weights, saved with the tokenizer: (dir_a, dir_b, sd_a, sd_b)."""
    dirs, states = [], []
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        model = load_causal_lm(tiny_config, tokenizer=tokenizer)
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        dirs.append(str(tmp_path / name))
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return dirs[0], dirs[1], states[0], states[1]


def assert_is_mix(model, state_a, state_b, weight_a):
    """Every tensor equals weight_a * a + (1 - weight_a) * b, element by element."""
    state = model.state_dict()
    assert state.keys() == state_a.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, weight_a * state_a[name] + (1.0 - weight_a) * state_b[name], rtol=0, atol=1e-6)


@torch.no_grad()
def test_soup_spec_is_the_weighted_average_of_its_checkpoints(two_checkpoints, tokenizer):
    dir_a, dir_b, state_a, state_b = two_checkpoints
    assert_is_mix(load_causal_lm({"soup": [dir_a, dir_b]}, tokenizer=tokenizer), state_a, state_b, 0.5)
    # weights are normalised: [3, 1] -> 0.75 / 0.25
    soup = load_causal_lm({"soup": [dir_a, dir_b], "weights": [3, 1]}, tokenizer=tokenizer)
    assert_is_mix(soup, state_a, state_b, 0.75)
    assert soup.config.pad_token_id == tokenizer.pad_token_id
    # a one-member soup is that checkpoint, bit for bit; a soup can be nested in a soup
    assert_is_mix(load_causal_lm({"soup": [dir_a]}), state_a, state_b, 1.0)
    nested = load_causal_lm({"soup": [{"soup": [dir_a, dir_b]}, dir_b]})  # (a + b) / 2 averaged with b
    assert_is_mix(nested, state_a, state_b, 0.25)


@torch.no_grad()
def test_reward_model_soup(tmp_path, tokenizer, tiny_config):
    states, dirs = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = load_reward_model(tiny_config, tokenizer=tokenizer)
        model.save_pretrained(tmp_path / f"rm{seed}")
        dirs.append(str(tmp_path / f"rm{seed}"))
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    soup = load_reward_model({"soup": dirs, "weights": [0.2, 0.8]}, tokenizer=tokenizer)
    assert any("score" in name for name in soup.state_dict())  # the score heads are averaged too
    assert_is_mix(soup, states[0], states[1], 0.2)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"soup": []}, "at least one"),
        ({"soup": "outputs/sft/hf/final"}, "list of model specs"),
        ({"soup": ["a", "b"], "weights": [1.0]}, "1 values for 2 models"),
        ({"soup": ["a", "b"], "weights": [1.0, -1.0]}, ">= 0"),
        ({"soup": ["a", "b"], "weights": [0, 0]}, "not all zero"),
        ({"soup": ["a", "b"], "weights": ["x", 1]}, "numbers"),
        ({"soup": ["a", "b"], "model_type": "llama"}, "extra keys"),
    ],
)
def test_bad_soup_specs_are_rejected_before_loading(spec, message):
    with pytest.raises(ValueError, match=message):
        load_causal_lm(spec)


@torch.no_grad()
def test_dpo_and_ppo_take_a_soup_reference(two_checkpoints, tmp_path, assets_dir):
    """The reference of DPO and PPO is the soup (the policy is the first checkpoint), and both train with it."""
    from rlhf_lightning.generation import SamplingConfig
    from rlhf_lightning.modules import DPOModule, Optimization, PPOModule
    from rlhf_lightning.rewards import FunctionRewardSource

    from tests.modules.test_dpo import fit as fit_dpo
    from tests.modules.test_ppo import count_positive, fit as fit_ppo

    dir_a, dir_b, state_a, state_b = two_checkpoints
    soup = {"soup": [dir_a, dir_b], "weights": [0.25, 0.75]}
    dpo = DPOModule(dir_a, reference=soup, optim=Optimization(lr=1e-3))
    ppo = PPOModule(
        dir_a, reference=soup, reward=FunctionRewardSource(count_positive), ppo_epochs=1, num_minibatches=1,
        sampling=SamplingConfig(max_new_tokens=4), log_samples_every_n_steps=0,
    )
    for module in (dpo, ppo):
        assert_is_mix(module.reference, state_a, state_b, 0.25)
        assert_is_mix(module.policy, state_a, state_b, 1.0)
    with torch.enable_grad():
        fit_dpo(dpo, tmp_path / "dpo", dir_a, assets_dir, max_steps=1, limit_val_batches=0)
        fit_ppo(ppo, tmp_path / "ppo", dir_a, assets_dir, max_steps=1)
    for module in (dpo, ppo):  # the frozen soup is untouched by training
        assert_is_mix(module.reference, state_a, state_b, 0.25)
    assert "soup" in dpo.hparams["reference"]  # the spec is saved, so a checkpoint rebuilds the same reference


def test_soup_reference_from_yaml(two_checkpoints, tmp_path, assets_dir):
    """A soup reference written in YAML on top of configs/dpo.yaml reaches the module."""
    from rlhf_lightning.cli import cli_main

    dir_a, dir_b, state_a, state_b = two_checkpoints
    override = tmp_path / "soup_reference.yaml"
    override.write_text(
        "model:\n"
        "  init_args:\n"
        f"    model: {dir_a}\n"
        "    reference:\n"
        f"      soup: [{dir_a}, {dir_b}]\n"
        "      weights: [0.5, 0.5]\n"
        "data:\n"
        "  init_args:\n"
        f"    train_file: {os.path.join(assets_dir, 'pairs_tiny.jsonl')}\n"
        f"    val_file: {os.path.join(assets_dir, 'pairs_tiny.jsonl')}\n"
    )
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "dpo.yaml")
    cli = cli_main(["--config", config, "--config", str(override), f"--run_dir={tmp_path / 'run'}"], run=False)
    assert_is_mix(cli.model.reference, state_a, state_b, 0.5)
    assert_is_mix(cli.model.policy, state_a, state_b, 1.0)


# Architectures that post-process the LM head's output: the value-head path must keep it, or PPO's KL
# to an identical reference is not 0 (Gemma-2 final_logit_softcapping was skipped).
_POSTPROCESSING_CONFIGS = {
    "gemma2": {"model_type": "gemma2", "final_logit_softcapping": 0.5, "head_dim": 8, "query_pre_attn_scalar": 8},
    "cohere": {"model_type": "cohere", "logit_scale": 0.25},
    "granite": {"model_type": "granite", "logits_scaling": 4.0},
}


@pytest.mark.parametrize("arch", sorted(_POSTPROCESSING_CONFIGS))
def test_value_head_path_keeps_logit_postprocessing_so_kl_to_identical_reference_is_zero(arch, tokenizer, tiny_config):
    import copy

    from rlhf_lightning.logprobs import token_logprobs
    from rlhf_lightning.losses import kl_penalty

    config = {k: v for k, v in tiny_config.items() if k != "model_type"}
    config.update(_POSTPROCESSING_CONFIGS[arch])
    torch.manual_seed(0)
    with_value = CausalLMWithValueHead(config, tokenizer=tokenizer).eval()
    reference = copy.deepcopy(with_value.pretrained_model).eval()
    ids = torch.tensor([[2, 10, 11, 12, 13], [2, 13, 14, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    with torch.no_grad():
        logits, values = with_value(ids, mask)
        ref_logits = reference(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_attention_mask(mask)).logits
    labels = ids[:, 1:]
    kl = kl_penalty(token_logprobs(logits[:, :-1], labels), token_logprobs(ref_logits[:, :-1], labels), kind="k1")
    assert kl.abs().max().item() < 1e-6
    torch.testing.assert_close(values, with_value.values(ids, mask), atol=1e-6, rtol=0)


def test_pad_id_outside_the_vocabulary_is_a_clear_error_at_load_time(tokenizer_dir, tiny_config, tmp_path):
    """A tokenizer whose added pad token has id >= the model's vocabulary size used to pass loading and
    fail with an IndexError inside the embedding lookup of the first padded batch."""
    from rlhf_lightning.models import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    vocab = len(tok)
    tok.add_special_tokens({"pad_token": "<extra_pad>"})
    assert tok.pad_token_id == vocab
    with pytest.raises(ValueError, match=rf"pad_token_id = {vocab} \('<extra_pad>'\) is outside the vocabulary .* {vocab} embedding rows"):
        load_causal_lm({**tiny_config, "vocab_size": vocab}, tokenizer=tok)
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        load_reward_model({**tiny_config, "vocab_size": vocab}, tokenizer=tok)
    load_causal_lm({**tiny_config, "vocab_size": vocab + 1}, tokenizer=tok)  # a row for it: fine
    load_causal_lm(tiny_config, tokenizer=load_tokenizer(tokenizer_dir)).save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match=rf"pad_token_id = {vocab} .* outside the vocabulary of model .*saved"):
        load_causal_lm(str(tmp_path / "saved"), tokenizer=tok)
