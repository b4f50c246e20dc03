"""DataModules and collators: batch keys and padding of the contract, splits, tokenizer resolution, caching."""

from __future__ import annotations

import os
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from rlhf_lightning.data import (
    DemonstrationDataModule,
    PreferenceDataModule,
    PromptCollator,
    PromptDataModule,
    pad_sequences,
)

PAIR_KEYS = {
    f"{side}_{name}" for side in ("chosen", "rejected") for name in ("input_ids", "attention_mask", "completion_mask")
}


def asset(assets_dir, name):
    return os.path.join(assets_dir, name)


def first_batch(dm):
    dm.setup("fit")
    loader = dm.train_dataloader()
    return next(iter(loader))


def test_demonstration_batch_is_right_padded_with_completion_mask(tokenizer):
    records = [{"prompt": "the movie", "completion": "was fun."}, {"prompt": "a long boring film", "completion": "bad"}]
    dm = DemonstrationDataModule(dataset=records, batch_size=2, shuffle=False)
    dm.set_tokenizer(tokenizer)
    batch = first_batch(dm)
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "index"}
    # row 0: <s> the movie | was fun . </s>  (7 tokens);  row 1: <s> a long boring film | bad </s>  (7 tokens)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    expected0 = tokenizer("the movie")["input_ids"] + tokenizer("was fun.", add_special_tokens=False)["input_ids"] + [eos]
    assert batch["input_ids"][0].tolist() == expected0 and expected0[0] == bos
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 7]
    assert batch["index"].tolist() == [0, 1]

    records[1]["completion"] = "bad."  # longer batch to see padding on the right
    records.append({"prompt": "a", "completion": "fun"})
    dm = DemonstrationDataModule(dataset=records, batch_size=3, shuffle=False, pad_to_multiple_of=5)
    dm.set_tokenizer(tokenizer)
    batch = first_batch(dm)
    assert batch["input_ids"].shape == (3, 10)  # longest row has 8 tokens, rounded up to a multiple of 5
    assert batch["attention_mask"][2].tolist() == [1, 1, 1, 1] + [0] * 6
    assert batch["completion_mask"][2].tolist() == [0, 0, 1, 1] + [0] * 6
    assert (batch["input_ids"][2, 4:] == pad).all()
    assert batch["input_ids"].dtype == torch.long and batch["completion_mask"].dtype == torch.long


def test_preference_batch_keys_margin_and_scores(tokenizer, assets_dir):
    dm = PreferenceDataModule(asset(assets_dir, "pairs_tiny.jsonl"), batch_size=4, shuffle=False)
    dm.set_tokenizer(tokenizer)
    batch = first_batch(dm)
    assert set(batch) == PAIR_KEYS | {"index", "margin", "chosen_scores", "rejected_scores"}
    assert dm.score_names == ["length", "sentiment"]
    assert batch["chosen_scores"].shape == (4, 2) and batch["chosen_scores"].dtype == torch.float32
    assert batch["chosen_scores"][:, 1].tolist() == [1.0] * 4  # "sentiment" is column 1 (sorted names)
    assert batch["rejected_scores"][:, 1].tolist() == [-1.0] * 4
    assert batch["margin"].shape == (4,) and batch["index"].tolist() == [0, 1, 2, 3]
    for side in ("chosen", "rejected"):
        mask, completion = batch[f"{side}_attention_mask"], batch[f"{side}_completion_mask"]
        lengths = mask.sum(-1)
        for row in range(4):  # right padded: ones then zeros; EOS is the last real token
            assert mask[row].tolist() == [1] * lengths[row] + [0] * (mask.shape[1] - lengths[row])
            assert batch[f"{side}_input_ids"][row, lengths[row] - 1] == tokenizer.eos_token_id
            assert completion[row, lengths[row] - 1] == 1 and (completion[row] <= mask[row]).all()
    # the prompt part is identical in both sequences
    prompt_len = (batch["chosen_attention_mask"] - batch["chosen_completion_mask"]).sum(-1)
    assert torch.equal(prompt_len, (batch["rejected_attention_mask"] - batch["rejected_completion_mask"]).sum(-1))


def test_pairs_without_optional_columns_have_no_margin_or_scores(tokenizer):
    dm = PreferenceDataModule(dataset=[{"prompt": "a", "chosen": "fun", "rejected": "bad"}], batch_size=1)
    dm.set_tokenizer(tokenizer)
    assert set(first_batch(dm)) == PAIR_KEYS | {"index"}
    assert dm.score_names == []


def test_prompt_batch_is_left_padded_with_text_and_extras(tokenizer, assets_dir):
    dm = PromptDataModule(asset(assets_dir, "prompts_tiny.jsonl"), batch_size=4, shuffle=False)
    dm.set_tokenizer(tokenizer)
    batch = first_batch(dm)
    assert set(batch) == {"prompt_input_ids", "prompt_attention_mask", "index", "prompt_text", "stars", "genre"}
    assert batch["prompt_text"][0] == "one star. this comedy movie was"
    assert batch["stars"] == [1, 2, 4, 5] and batch["genre"] == ["comedy"] * 4

    texts = ["the movie was", "a very very long and boring film was", "it"]
    dm = PromptDataModule(dataset=[{"prompt": t} for t in texts], batch_size=3, shuffle=False)
    dm.set_tokenizer(tokenizer)
    batch = first_batch(dm)
    mask, input_ids = batch["prompt_attention_mask"], batch["prompt_input_ids"]
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]  # 4, 9, 2 (with BOS)
    assert mask.shape == (3, max(lengths))
    for row, length in enumerate(lengths):  # left padded: zeros then ones, every prompt ends in the last column
        assert mask[row].tolist() == [0] * (max(lengths) - length) + [1] * length
        assert (input_ids[row, : max(lengths) - length] == tokenizer.pad_token_id).all()
        assert input_ids[row][mask[row].bool()].tolist() == tokenizer(texts[row])["input_ids"]
    assert batch["prompt_text"] == texts and batch["index"].tolist() == [0, 1, 2]


def test_pad_to_multiple_of():
    out = pad_sequences([[1, 2, 3], [4]], 0, side="left", pad_to_multiple_of=4)
    assert out.tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]]
    collate = PromptCollator(pad_token_id=0, pad_to_multiple_of=8)
    batch = collate([{"prompt_ids": [5, 6, 7], "prompt_text": "x", "index": 0}])
    assert batch["prompt_input_ids"].shape == (1, 8) and batch["prompt_attention_mask"].sum() == 3


def test_val_split_is_deterministic_by_seed(tokenizer, assets_dir):
    def val_texts(seed):
        dm = PromptDataModule(asset(assets_dir, "prompts_tiny.jsonl"), val_fraction=0.25, seed=seed)
        dm.set_tokenizer(tokenizer)
        dm.setup("fit")
        assert len(dm.train_set) == 12 and len(dm.val_set) == 4
        train = {f["prompt_text"] for f in dm.train_set.data.features}
        val = [f["prompt_text"] for f in dm.val_set.data.features]
        assert not train & set(val)
        return val

    assert val_texts(0) == val_texts(0)
    assert val_texts(0) != val_texts(1)


def test_limit_train_records_and_val_file(tokenizer, assets_dir):
    dm = DemonstrationDataModule(
        asset(assets_dir, "sft_tiny.jsonl"), val_file=asset(assets_dir, "sft_tiny.jsonl"), limit_train_records=10, batch_size=4
    )
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    assert len(dm.train_set) == 10 and len(dm.val_set) == 64
    assert len(dm.train_dataloader()) == 3 and len(dm.val_dataloader()) == 16


def test_hf_dataset_input(tokenizer):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": "the movie was", "completion": f"{w}."} for w in ("fun", "good", "bad")])
    dm = DemonstrationDataModule(dataset=ds, batch_size=3, shuffle=False)
    dm.set_tokenizer(tokenizer)
    batch = first_batch(dm)
    assert batch["input_ids"].shape[0] == 3 and batch["completion_mask"].sum().item() == 9  # word . </s> each


def test_tokenizer_from_name_and_from_attached_module(tokenizer, tokenizer_dir, assets_dir):
    dm = PromptDataModule(asset(assets_dir, "prompts_tiny.jsonl"), tokenizer=tokenizer_dir)
    dm.setup("fit")
    assert dm.tokenizer.get_vocab() == tokenizer.get_vocab()

    dm = PromptDataModule(asset(assets_dir, "prompts_tiny.jsonl"))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        dm.setup("fit")
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tokenizer))
    dm.setup("fit")
    assert dm.tokenizer is tokenizer


def test_second_setup_with_cache_dir_does_not_tokenize(tokenizer, assets_dir, tmp_path, counting_tokenizer):
    first = counting_tokenizer(tokenizer)
    dm = DemonstrationDataModule(asset(assets_dir, "sft_tiny.jsonl"), cache_dir=str(tmp_path), max_length=24, val_fraction=0.1)
    dm.set_tokenizer(first)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("validate")  # setup is idempotent: tokenized once per datamodule
    assert first.calls > 0
    calls_after_first_setup = first.calls
    dm.setup("fit")
    assert first.calls == calls_after_first_setup

    second = counting_tokenizer(tokenizer)
    dm2 = DemonstrationDataModule(asset(assets_dir, "sft_tiny.jsonl"), cache_dir=str(tmp_path), max_length=24, val_fraction=0.1)
    dm2.set_tokenizer(second)
    dm2.setup("fit")
    assert second.calls == 0
    assert dm2.train_set.data.features == dm.train_set.data.features
    assert dm2.val_set.data.features == dm.val_set.data.features


def test_drop_policy_count_is_exposed(tokenizer, assets_dir):
    dm = DemonstrationDataModule(asset(assets_dir, "sft_tiny.jsonl"), max_length=12, truncation="drop")
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    assert dm.num_dropped > 0 and len(dm.train_set) == 64 - dm.num_dropped
    assert all(len(f["prompt_ids"]) + len(f["completion_ids"]) <= 12 for f in dm.train_set.data.features)


def test_argument_validation():
    with pytest.raises(ValueError, match="either train_file or dataset"):
        PromptDataModule("a.jsonl", dataset=[{"prompt": "a"}])
    with pytest.raises(ValueError, match="val_fraction"):
        PromptDataModule("a.jsonl", val_fraction=1.0)
    with pytest.raises(ValueError, match="smaller than max_length"):
        PromptDataModule("a.jsonl", max_length=8, max_prompt_length=10)


def test_cli_signature_parses_and_documents_arguments(assets_dir):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(PreferenceDataModule, "data")
    config = parser.parse_args(["--data.train_file=x.jsonl", "--data.truncation=drop", "--data.max_length=64"])
    assert config.data.truncation == "drop" and config.data.max_length == 64 and config.data.tokenizer is None
    help_text = parser.format_help()
    assert "deterministic split by" in help_text and "keep_end" in help_text


class _TinyLM(L.LightningModule):
    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.embed = torch.nn.Embedding(len(tokenizer), 8)
        self.seen = 0

    def training_step(self, batch, batch_idx):
        self.seen += batch["prompt_input_ids"].shape[0]
        return self.embed(batch["prompt_input_ids"]).mean()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_prompt_datamodule_runs_for_max_steps_with_trainer(tokenizer, assets_dir, tmp_path):
    # 12 training prompts / batch 4 = 3 steps per epoch; max_steps=7 needs three epochs.
    dm = PromptDataModule(asset(assets_dir, "prompts_tiny.jsonl"), batch_size=4, val_fraction=0.25, cache_dir=str(tmp_path))
    model = _TinyLM(tokenizer)  # no tokenizer given to the datamodule: it takes the module's
    trainer = L.Trainer(
        max_steps=7, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 7 and model.seen == 28
    assert dm.tokenizer is tokenizer
