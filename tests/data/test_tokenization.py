"""Tokenization convention, truncation policies, and the on-disk cache."""

from __future__ import annotations

import json
import logging
import os

import pytest

from rlhf_lightning.data import RecordError, TokenizeConfig, load_records, load_tokenized, tokenize_records


def ids(tokenizer, text, special):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def demo(prompt="one two three four five", completion="great fun movie"):
    return load_records([{"prompt": prompt, "completion": completion}], "demonstration")


def test_convention_prompt_with_bos_completion_with_eos(tokenizer):
    data = tokenize_records(demo(), tokenizer)
    feature = data.features[0]
    assert feature["prompt_ids"] == ids(tokenizer, "one two three four five", True)
    assert feature["prompt_ids"][0] == tokenizer.bos_token_id
    assert feature["completion_ids"] == ids(tokenizer, "great fun movie", False) + [tokenizer.eos_token_id]
    assert tokenizer.bos_token_id not in feature["completion_ids"]


def test_keep_end_cuts_prompt_start_keeps_bos_and_cuts_completion_end(tokenizer):
    config = TokenizeConfig(max_length=6, max_prompt_length=4, truncation="keep_end")
    data = tokenize_records(demo(), tokenizer, config)
    feature = data.features[0]
    # prompt: <s> one two three four five -> <s> three four five ; completion: great fun movie </s> -> great fun
    assert feature["prompt_ids"] == [tokenizer.bos_token_id] + ids(tokenizer, "three four five", False)
    assert feature["completion_ids"] == ids(tokenizer, "great fun", False)
    assert data.num_truncated == 1 and data.num_dropped == 0


def test_keep_end_without_prompt_limit_leaves_one_completion_token(tokenizer):
    data = tokenize_records(demo(), tokenizer, TokenizeConfig(max_length=4))
    feature = data.features[0]
    assert len(feature["prompt_ids"]) == 3 and feature["prompt_ids"][-1] == ids(tokenizer, "five", False)[0]
    assert feature["completion_ids"] == ids(tokenizer, "great", False)


def test_error_policy_names_the_record(tokenizer, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(
        json.dumps({"prompt": "a movie", "completion": "fun"}) + "\n"
        + json.dumps({"prompt": "a movie", "completion": "very very very very fun"}) + "\n"
    )
    with pytest.raises(RecordError, match="max_length=6") as info:
        tokenize_records(load_records(str(path), "demonstration"), tokenizer, TokenizeConfig(max_length=6, truncation="error"))
    assert f"{path}, line 2" in str(info.value) and "'completion'" in str(info.value)


def test_drop_policy_drops_counts_and_logs(tokenizer, caplog):
    records = load_records(
        [{"prompt": "a", "chosen": "fun", "rejected": "bad"}, {"prompt": "a", "chosen": "fun", "rejected": "very very very bad"}],
        "pair",
    )
    with caplog.at_level(logging.WARNING, logger="rlhf_lightning.data.tokenization"):
        data = tokenize_records(records, tokenizer, TokenizeConfig(max_length=5, truncation="drop"))
    assert len(data) == 1 and data.rows == [0] and data.num_dropped == 1
    assert "Dropped 1 of 2 pair records" in caplog.text


def test_prompt_kind_uses_prompt_limit_only(tokenizer):
    records = load_records([{"prompt": "one two three four five"}], "prompt")
    data = tokenize_records(records, tokenizer, TokenizeConfig(max_length=3))
    assert data.features[0]["prompt_ids"] == [tokenizer.bos_token_id] + ids(tokenizer, "four five", False)
    assert data.features[0]["prompt_text"] == "one two three four five"


def test_config_rejects_bad_limits():
    with pytest.raises(ValueError, match="smaller than max_length"):
        TokenizeConfig(max_length=8, max_prompt_length=8)
    with pytest.raises(ValueError, match="truncation must be one of"):
        TokenizeConfig(truncation="keep_start")


def test_disk_cache_hit_does_not_tokenize(tokenizer, assets_dir, tmp_path, counting_tokenizer):
    source = os.path.join(assets_dir, "pairs_tiny.jsonl")
    config = TokenizeConfig(max_length=32)
    first_tok = counting_tokenizer(tokenizer)
    first = load_tokenized(source, "pair", first_tok, config, cache_dir=tmp_path)
    assert first_tok.calls > 0
    files = os.listdir(tmp_path)
    assert len(files) == 1 and not files[0].startswith(".tmp")  # atomic write leaves no temp file

    second_tok = counting_tokenizer(tokenizer)
    second = load_tokenized(source, "pair", second_tok, config, cache_dir=tmp_path)
    assert second_tok.calls == 0
    assert second == first

    # Another length policy is another entry.
    third_tok = counting_tokenizer(tokenizer)
    load_tokenized(source, "pair", third_tok, TokenizeConfig(max_length=16), cache_dir=tmp_path)
    assert third_tok.calls > 0 and len(os.listdir(tmp_path)) == 2


def test_disk_cache_is_keyed_by_file_content(tokenizer, tmp_path, counting_tokenizer):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "the movie was"}) + "\n")
    cache = tmp_path / "cache"
    load_tokenized(str(path), "prompt", tokenizer, cache_dir=cache)
    path.write_text(json.dumps({"prompt": "the film was"}) + "\n")
    counting = counting_tokenizer(tokenizer)
    data = load_tokenized(str(path), "prompt", counting, cache_dir=cache)
    assert counting.calls > 0 and data.features[0]["prompt_text"] == "the film was"
