"""Conversational records with a ChatML byte-level BPE tokenizer (pad == eos, end-of-turn != eos): every
record kind accepts the Hub's message layouts, the loss covers the assistant reply only, the template's
end-of-turn token stops generation by default, and a tokenizer without a template is a clear error."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.data import DemonstrationDataModule, PreferenceDataModule, PromptDataModule
from rlhf_lightning.data.chat import end_of_turn_token_ids
from rlhf_lightning.data.records import RecordError, load_records
from rlhf_lightning.generation import generate
from rlhf_lightning.models import load_causal_lm, load_tokenizer

USER = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the movie was"}]
GOOD = [{"role": "assistant", "content": "great fun"}]
BAD = [{"role": "assistant", "content": "so boring"}]


@pytest.fixture()
def chat_tokenizer(bpe_tokenizer_dir):
    return load_tokenizer(bpe_tokenizer_dir)


def _first(dm, tokenizer):
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _completion_text(tokenizer, ids, mask):
    return tokenizer.decode([int(i) for i, m in zip(ids, mask) if m])


def test_pad_is_eos_and_end_of_turn_is_another_token(chat_tokenizer):
    assert chat_tokenizer.pad_token_id == chat_tokenizer.eos_token_id
    assert chat_tokenizer.convert_ids_to_tokens(end_of_turn_token_ids(chat_tokenizer)) == ["<|im_end|>"]


def test_every_pair_layout_gives_the_same_tokens_and_scores_the_reply_only(chat_tokenizer):
    layouts = [
        {"prompt": USER, "chosen": GOOD, "rejected": BAD},  # prompt + reply messages
        {"chosen": USER + GOOD, "rejected": USER + BAD},  # full conversations sharing a prefix
    ]
    batches = [_first(PreferenceDataModule(dataset=[record], batch_size=1, shuffle=False), chat_tokenizer) for record in layouts]
    for key in ("chosen_input_ids", "chosen_completion_mask", "rejected_input_ids", "rejected_completion_mask"):
        assert torch.equal(batches[0][key], batches[1][key]), key
    batch = batches[0]
    eos = chat_tokenizer.eos_token
    assert _completion_text(chat_tokenizer, batch["chosen_input_ids"][0], batch["chosen_completion_mask"][0]) == f"great fun<|im_end|>{eos}"
    assert _completion_text(chat_tokenizer, batch["rejected_input_ids"][0], batch["rejected_completion_mask"][0]) == f"so boring<|im_end|>{eos}"
    prompt = _completion_text(chat_tokenizer, batch["chosen_input_ids"][0],
                              batch["chosen_attention_mask"][0] * (1 - batch["chosen_completion_mask"][0]))
    assert prompt == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nthe movie was<|im_end|>\n<|im_start|>assistant\n"


def test_demonstration_layouts_score_the_last_assistant_turn_only(chat_tokenizer):
    for record in ({"messages": USER + GOOD}, {"prompt": USER, "completion": GOOD}):
        batch = _first(DemonstrationDataModule(dataset=[record], batch_size=1, shuffle=False), chat_tokenizer)
        scored = _completion_text(chat_tokenizer, batch["input_ids"][0], batch["completion_mask"][0])
        assert scored == f"great fun<|im_end|>{chat_tokenizer.eos_token}", record


def test_prompt_layouts_end_with_the_generation_prompt(chat_tokenizer):
    texts = [load_records([record], "prompt", tokenizer=chat_tokenizer).records[0]["prompt"]
             for record in ({"prompt": USER}, {"messages": USER}, {"messages": USER + GOOD})]
    assert texts[0] == texts[1] == texts[2] and texts[0].endswith("<|im_start|>assistant\n")
    batch = _first(PromptDataModule(dataset=[{"prompt": USER}], batch_size=1), chat_tokenizer)
    assert batch["prompt_attention_mask"].sum() == len(chat_tokenizer(texts[0])["input_ids"])


def test_tokenizer_without_a_template_is_a_clear_error(tmp_path):
    from tests.conftest import build_bpe_tokenizer

    plain = load_tokenizer(build_bpe_tokenizer(tmp_path / "plain", chat_template=None))
    assert end_of_turn_token_ids(plain) == []
    for kind, record in (("prompt", {"prompt": USER}), ("pair", {"prompt": USER, "chosen": GOOD, "rejected": BAD}),
                         ("demonstration", {"prompt": USER, "completion": GOOD})):
        with pytest.raises(RecordError, match="need a tokenizer with a chat template"):
            load_records([record], kind, tokenizer=plain)


def test_generation_stops_at_the_end_of_turn_token_by_default(chat_tokenizer, tiny_config):
    """A model that always predicts <|im_end|> (LM head: zero weights, a bias on that token): with the
    template the completion is that one token and finished; without a template it runs to the limit."""
    torch.manual_seed(0)
    model = load_causal_lm(dict(tiny_config), tokenizer=chat_tokenizer)
    (end_of_turn,) = end_of_turn_token_ids(chat_tokenizer)
    head = torch.nn.Linear(tiny_config["hidden_size"], len(chat_tokenizer), bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[end_of_turn] = 10.0
    model.lm_head = head
    ids = torch.tensor([chat_tokenizer("<|im_start|>user\nthe movie<|im_end|>\n<|im_start|>assistant\n")["input_ids"]])
    out = generate(model, chat_tokenizer, ids, torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.completion_lengths.tolist() == [1] and out.finished.tolist() == [True]
    assert out.completion_ids[0, 0] == end_of_turn
    chat_tokenizer.chat_template = None
    out = generate(model, chat_tokenizer, ids, torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.completion_lengths.tolist() == [5] and out.finished.tolist() == [False]
