"""Record loading and validation: every bad record names its file, line and field."""

from __future__ import annotations

import json
import os

import pytest

from rlhf_lightning.data import RecordError, load_records

GOOD_PAIR = {"prompt": "the movie was", "chosen": "great!", "rejected": "bad."}


def write_jsonl(path, lines) -> str:
    """Write raw lines (dicts are JSON-encoded, strings written verbatim)."""
    with open(path, "w", encoding="utf-8") as handle:
        for line in lines:
            handle.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def test_assets_validate(assets_dir):
    assert len(load_records(os.path.join(assets_dir, "sft_tiny.jsonl"), "demonstration")) == 64
    pairs = load_records(os.path.join(assets_dir, "pairs_tiny.jsonl"), "pair")
    assert len(pairs) == 32 and pairs.has_margin and pairs.score_names == ["length", "sentiment"]
    assert len(load_records(os.path.join(assets_dir, "prompts_tiny.jsonl"), "prompt")) == 16


def test_bad_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_PAIR, "", '{"prompt": "the movie", "chosen": '])
    with pytest.raises(RecordError, match="invalid JSON") as info:
        load_records(path, "pair")
    assert f"{path}, line 3" in str(info.value)  # the blank line 2 still counts
    assert info.value.location.line == 3


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_PAIR, GOOD_PAIR, {"prompt": "it was", "chosen": "fun."}])
    with pytest.raises(RecordError) as info:
        load_records(path, "pair")
    message = str(info.value)
    assert f"{path}, line 3" in message and "'rejected'" in message and "missing" in message
    assert info.value.field == "rejected"


def test_wrong_type_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{**GOOD_PAIR, "chosen": 3}])
    with pytest.raises(RecordError) as info:
        load_records(path, "pair")
    message = str(info.value)
    assert f"{path}, line 1" in message and "'chosen'" in message and "expected a string, got int" in message


def test_empty_completion_is_rejected_but_empty_prompt_allowed(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "", "completion": "fun."}, {"prompt": "a", "completion": "  "}])
    with pytest.raises(RecordError, match="non-empty") as info:
        load_records(path, "demonstration")
    assert f"{path}, line 2" in str(info.value) and "'completion'" in str(info.value)


def test_non_object_line_and_bad_margin(tmp_path):
    with pytest.raises(RecordError, match="line 1: expected a JSON object, got list"):
        load_records(write_jsonl(tmp_path / "a.jsonl", ["[1, 2]"]), "pair")
    with pytest.raises(RecordError, match="field 'margin': expected a number, got str"):
        load_records(write_jsonl(tmp_path / "b.jsonl", [{**GOOD_PAIR, "margin": "1"}]), "pair")
    with pytest.raises(RecordError, match="field 'margin': expected a number, got bool"):
        load_records(write_jsonl(tmp_path / "c.jsonl", [{**GOOD_PAIR, "margin": True}]), "pair")


def test_in_memory_records_name_their_row():
    with pytest.raises(RecordError, match=r"<records>, row 1: field 'prompt': missing"):
        load_records([{"prompt": "fun"}, {"text": "fun"}], "prompt")


def test_optional_pair_columns_must_be_consistent():
    with pytest.raises(RecordError, match=r"row 1: field 'margin': present in some"):
        load_records([{**GOOD_PAIR, "margin": 1.0}, GOOD_PAIR], "pair")
    scored = {**GOOD_PAIR, "chosen_scores": {"b": 1, "a": 2}, "rejected_scores": {"a": 0, "b": 0.5}}
    with pytest.raises(RecordError, match=r"row 1: field 'rejected_scores': objectives"):
        load_records([scored, {**scored, "rejected_scores": {"a": 0}}], "pair")
    with pytest.raises(RecordError, match=r"row 0: field 'rejected_scores': missing"):
        load_records([{**GOOD_PAIR, "chosen_scores": {"a": 1.0}}], "pair")


def test_scores_follow_sorted_objective_names():
    loaded = load_records(
        [{**GOOD_PAIR, "chosen_scores": {"b": 1, "a": 2}, "rejected_scores": {"a": 0, "b": 0.5}}], "pair"
    )
    assert loaded.score_names == ["a", "b"]
    assert loaded.records[0]["chosen_scores"] == [2.0, 1.0]
    assert loaded.records[0]["rejected_scores"] == [0.0, 0.5]


def test_hf_dataset_input_treats_null_as_absent():
    datasets = pytest.importorskip("datasets")
    # Rows without a margin become None in an Arrow table: that must read as "no margin", not a type error.
    ds = datasets.Dataset.from_list([{**GOOD_PAIR, "note": "x"}, {**GOOD_PAIR, "note": None}])
    loaded = load_records(ds, "pair")
    assert len(loaded) == 2 and not loaded.has_margin
    bad = datasets.Dataset.from_list([GOOD_PAIR, {**GOOD_PAIR, "rejected": None}])
    with pytest.raises(RecordError, match=r"<datasets.Dataset .*>, row 1: field 'rejected': expected a string, got null"):
        load_records(bad, "pair")


def test_prompt_extra_fields_pass_through_and_reserved_names_fail():
    loaded = load_records([{"prompt": "the movie was", "stars": 5}], "prompt")
    assert loaded.records == [{"prompt": "the movie was", "stars": 5}]
    with pytest.raises(RecordError, match="field 'index': this name is reserved"):
        load_records([{"prompt": "the movie was", "index": 5}], "prompt")


# ----------------------------------------------------------------------------------------------- chat

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)
CHAT = [
    {"role": "user", "content": "review this movie."},
    {"role": "assistant", "content": "it was great!"},
]


@pytest.fixture()
def chat_tokenizer(tokenizer_dir):
    from rlhf_lightning.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)  # a fresh copy: the session tokenizer must stay template-free
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_chat_without_template_is_a_clear_error(tokenizer):
    with pytest.raises(RecordError, match=r"row 0: field 'messages': chat \(messages\) records need a tokenizer with a chat template"):
        load_records([{"messages": CHAT}], "demonstration", tokenizer=tokenizer)


def test_chat_demonstration_is_split_at_the_last_assistant_turn(chat_tokenizer):
    record = load_records([{"messages": CHAT}], "demonstration", tokenizer=chat_tokenizer).records[0]
    # BOS written by the template is dropped (the tokenizer adds it); EOS too (the data layer appends it).
    assert record == {"prompt": "user review this movie.\nassistant ", "completion": "it was great!"}


def test_chat_prompts_and_pairs(chat_tokenizer):
    prompt = load_records([{"messages": CHAT}], "prompt", tokenizer=chat_tokenizer).records[0]
    assert prompt["prompt"] == "user review this movie.\nassistant "
    reply = [{"role": "assistant", "content": "fun."}]
    worse = [{"role": "assistant", "content": "bad."}]
    pair = load_records([{"prompt": CHAT[:1], "chosen": reply, "rejected": worse}], "pair", tokenizer=chat_tokenizer)
    assert pair.records[0] == {"prompt": "user review this movie.\nassistant ", "chosen": "fun.", "rejected": "bad."}
    full = load_records([{"chosen": CHAT[:1] + reply, "rejected": CHAT[:1] + worse}], "pair", tokenizer=chat_tokenizer)
    assert full.records[0] == pair.records[0]
    with pytest.raises(RecordError, match=r"field 'messages\[1\].role': the last message"):
        load_records([{"messages": [CHAT[0], CHAT[0]]}], "demonstration", tokenizer=chat_tokenizer)
