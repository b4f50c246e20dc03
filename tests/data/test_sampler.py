"""The resumable training order: a function of (seed, epoch) only, resumed at a position, and the
DataModule's checkpoint state that carries it."""

from __future__ import annotations

import logging
import os

import torch

from rlhf_lightning.data import PreferenceDataModule
from rlhf_lightning.data.sampler import ResumableSampler, epoch_permutation


def test_order_depends_on_seed_and_epoch_only():
    torch.manual_seed(123)  # the global RNG plays no part
    first = epoch_permutation(10, seed=1, epoch=0)
    torch.manual_seed(456)
    assert epoch_permutation(10, seed=1, epoch=0) == first and sorted(first) == list(range(10))
    assert epoch_permutation(10, seed=1, epoch=1) != first and epoch_permutation(10, seed=2, epoch=0) != first
    assert epoch_permutation(5, seed=1, epoch=3, shuffle=False) == [0, 1, 2, 3, 4]


def test_resume_skips_the_trained_part_of_that_epoch_once():
    sampler = ResumableSampler(10, seed=7)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.resume_at(epoch=2, position=4)
    assert list(sampler) == full[4:] and len(sampler) == 10
    assert list(sampler) == full  # one pass only
    sampler.resume_at(epoch=1, position=4)  # another epoch: nothing to skip in this one
    assert list(sampler) == full


def test_datamodule_state_round_trip_and_mismatch_warning(tokenizer_dir, assets_dir, caplog):
    path = os.path.join(assets_dir, "pairs_tiny.jsonl")
    data = PreferenceDataModule(train_file=path, tokenizer=tokenizer_dir, batch_size=4, seed=5)
    data.setup("fit")
    order = [int(i) for batch in data.train_dataloader() for i in batch["index"]]
    state = {"train_sampler": data._train_sampler.state(8) | {"epoch": 0}}
    resumed = PreferenceDataModule(train_file=path, tokenizer=tokenizer_dir, batch_size=4, seed=5)
    resumed.setup("fit")
    resumed.load_state_dict(state)
    assert [int(i) for batch in resumed.train_dataloader() for i in batch["index"]] == order[8:]
    other = PreferenceDataModule(train_file=path, tokenizer=tokenizer_dir, batch_size=4, seed=6)
    other.setup("fit")
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(state)
    assert "differs from this run's" in caplog.text
    assert len([int(i) for batch in other.train_dataloader() for i in batch["index"]]) == 32
