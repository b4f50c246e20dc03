"""Model loading: inline configs, the real from_pretrained path (a local directory), RM pooling, value head."""

import pytest
import torch

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
