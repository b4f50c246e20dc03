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


def _sharded_worker(rank, world_size, init_file, cache_dir, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        computed_rows = []

        def fn(batch):
            computed_rows.extend(batch["index"].tolist())
            return doubled(batch)

        for attempt in range(2):  # a miss (computed, rank 0 writes), then a hit on every rank
            values, hit = cached_per_index(loader(items()), fn, fingerprint="d" * 64, cache_dir=cache_dir, name="x",
                                           write=rank == 0)
            torch.distributed.barrier()
            torch.save({"values": values.values, "hit": hit, "rows": list(computed_rows)},
                       os.path.join(out_dir, f"rank{rank}_attempt{attempt}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_ranks_compute_a_share_each_and_all_get_every_row(tmp_path):
    """2 gloo processes: the 4 batches of 10 rows are split 2 + 2 between the ranks (each row computed
    once in all), every rank ends with all 10 rows equal to a single-process run, and the file rank 0
    writes is then a hit on both ranks."""
    import torch.multiprocessing as mp

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "cache"), str(out_dir)), nprocs=2)
    single, _ = cached_per_index(loader(items()), doubled, fingerprint="d" * 64, cache_dir=None, name="x")
    first = [torch.load(out_dir / f"rank{rank}_attempt0.pt") for rank in range(2)]
    second = [torch.load(out_dir / f"rank{rank}_attempt1.pt") for rank in range(2)]
    assert sorted(first[0]["rows"]) == [0, 1, 2, 6, 7, 8] and sorted(first[1]["rows"]) == [3, 4, 5, 9]
    for result in first:
        assert not result["hit"]
        for key, column in single.values.items():
            assert_close(result["values"][key], column)
    for rank, result in enumerate(second):
        assert result["hit"] and result["rows"] == first[rank]["rows"]  # nothing computed again
