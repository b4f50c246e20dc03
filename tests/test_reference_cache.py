"""Per-index value cache: computed in file order by ``index``, fingerprinted, saved atomically, reloaded."""

from __future__ import annotations

import os

import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import DataLoader

from rlhf_lightning.reference_cache import (
    cached_per_index,
    combine_fingerprints,
    dataset_fingerprint,
    load_values,
    model_fingerprint,
    save_values,
)


def items(n=10, offset=0):
    return [{"ids": [i, i + offset], "index": i} for i in range(n)]


def collate(features):
    return {"ids": torch.tensor([f["ids"] for f in features]), "index": torch.tensor([f["index"] for f in features])}


def loader(data, shuffle=True):
    return DataLoader(data, batch_size=3, shuffle=shuffle, collate_fn=collate)


def doubled(batch):
    return {"a": batch["ids"][:, 0].float() * 2, "b": batch["ids"][:, 1].float()}


def test_values_are_stored_by_index_and_looked_up(tmp_path):
    values, hit = cached_per_index(loader(items()), doubled, fingerprint="f" * 64, cache_dir=None, name="x")
    assert not hit and len(values) == 10
    got = values.lookup(torch.tensor([7, 0, 3]))
    assert_close(got["a"], torch.tensor([14.0, 0.0, 6.0]))
    with pytest.raises(KeyError):
        values.lookup(torch.tensor([10]))


def test_computing_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    cached_per_index(loader(items()), doubled, fingerprint="f" * 64, cache_dir=None, name="x")
    assert_close(torch.rand(3), expected)


def test_second_call_hits_the_cache_without_computing(tmp_path):
    calls = []

    def fn(batch):
        calls.append(1)
        return doubled(batch)

    fp = combine_fingerprints(data=dataset_fingerprint(items()), average=False)
    first, hit1 = cached_per_index(loader(items()), fn, fingerprint=fp, cache_dir=str(tmp_path), name="ref")
    n = len(calls)
    second, hit2 = cached_per_index(loader(items()), fn, fingerprint=fp, cache_dir=str(tmp_path), name="ref")
    assert (hit1, hit2) == (False, True) and len(calls) == n
    assert_close(second.values["a"], first.values["a"])
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no staging leftovers


def test_fingerprints_change_with_content():
    assert dataset_fingerprint(items()) == dataset_fingerprint(items())
    assert dataset_fingerprint(items()) != dataset_fingerprint(items(offset=1))
    assert dataset_fingerprint(items()) != dataset_fingerprint(items(n=9))
    assert combine_fingerprints(a=1, b=True) != combine_fingerprints(a=1, b=False)
    model = torch.nn.Linear(2, 2)
    before = model_fingerprint(model)
    with torch.no_grad():
        model.weight[0, 0] += 1e-3
    assert model_fingerprint(model) != before


def test_wrong_fingerprint_or_corrupt_file_is_a_miss(tmp_path):
    values, _ = cached_per_index(loader(items()), doubled, fingerprint="a" * 64, cache_dir=None, name="x")
    path = save_values(str(tmp_path / "v.pt"), values, fingerprint="a" * 64)
    assert load_values(path, fingerprint="a" * 64) is not None
    assert load_values(path, fingerprint="b" * 64) is None
    with open(path, "wb") as f:
        f.write(b"not a torch file")
    assert load_values(path, fingerprint="a" * 64) is None
