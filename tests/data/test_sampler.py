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


def test_ranks_share_one_order_and_resume_their_own_position():
    """Two data-parallel ranks take alternate positions of the single-process order (padded by its head to
    an even length); each resumes at its own saved position; Lightning keeps the sampler (it is a
    DistributedSampler, so no wrapper lists and re-indexes a shortened epoch)."""
    from torch.utils.data import DistributedSampler

    single = list(ResumableSampler(7, seed=3))
    ranks = [ResumableSampler(7, seed=3, num_replicas=2, rank=r) for r in range(2)]
    padded = single + single[:1]
    assert [list(s) for s in ranks] == [padded[0::2], padded[1::2]]
    assert all(isinstance(s, DistributedSampler) and len(s) == 4 for s in ranks)
    ranks[1].resume_at(0, 2)
    assert list(ranks[1]) == padded[1::2][2:]
    assert list(ranks[1]) == padded[1::2]  # one resumed pass only
    assert ranks[0].state(2)["num_replicas"] == 2
