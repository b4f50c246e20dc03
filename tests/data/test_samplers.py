"""LengthGroupedSampler: a permutation, batches of similar length, longest first, new order per epoch;
the DataModule option uses it and cuts padding."""

from __future__ import annotations

import os

import torch

from rlhf_lightning.data import PreferenceDataModule
from rlhf_lightning.data.samplers import LengthGroupedSampler, example_lengths


def padded_tokens(lengths, batches):
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_permutation_grouped_longest_first_and_reshuffled_per_epoch():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (203,), generator=g).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=8, window_batches=5, seed=1)
    order = list(sampler)
    assert sorted(order) == list(range(203)) and len(sampler) == 203
    batches = sampler.batches()
    assert all(len(b) == 8 for b in batches[:-1]) and len(batches[-1]) == 203 % 8  # the short batch stays last
    assert max(lengths[i] for i in batches[0]) == max(lengths)
    random_batches = [list(range(k, min(k + 8, 203))) for k in range(0, 203, 8)]
    assert padded_tokens(lengths, batches) < 0.8 * padded_tokens(lengths, random_batches)
    sampler.set_epoch(1)
    assert list(sampler) != order
    sampler.set_epoch(0)
    assert list(sampler) == order  # deterministic per (seed, epoch)
    sampler.resume_at(0, 16)  # as the resumable default order: continue after the records trained on
    assert list(sampler) == order[16:] and list(sampler) == order


def test_datamodule_option_groups_training_batches(tokenizer_dir, assets_dir):
    path = os.path.join(assets_dir, "pairs_tiny.jsonl")
    grouped = PreferenceDataModule(train_file=path, tokenizer=tokenizer_dir, batch_size=2, group_by_length=True)
    grouped.setup("fit")
    loader = grouped.train_dataloader()
    assert isinstance(loader.sampler, LengthGroupedSampler)
    lengths = example_lengths(grouped.train_set.data.features)
    seen = sorted(int(i) for batch in loader for i in batch["index"])
    assert seen == list(range(len(lengths)))
    plain = PreferenceDataModule(train_file=path, tokenizer=tokenizer_dir, batch_size=2)
    plain.setup("fit")
    assert not isinstance(plain.train_dataloader().sampler, LengthGroupedSampler)
