"""Per-example values of a frozen model, computed once over a dataset and cached on disk.

DPO's reference log-probs depend only on the (frozen) reference and the example, so they can be
computed in one pass before training and the reference dropped from memory (TRL's
``precompute_ref_log_probs``). MODPO's margins (scores of frozen reward models) are the same kind of
thing. This module holds the machinery: a fingerprint of what the values depend on, a pass over a
dataloader that stores values by the batch's ``index`` column (the dataset row), and an atomic
save/load keyed by the fingerprint.

A cache file is ``<cache_dir>/<name>-<fingerprint[:16]>.pt`` holding ``{"fingerprint", "values":
{key: (N,) float32}, "meta"}``; a stale file can never be hit, because anything that changes the
values (tokenized data, model weights, the averaging flag, ...) changes the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

__all__ = [
    "PerIndexValues",
    "dataset_fingerprint",
    "model_fingerprint",
    "combine_fingerprints",
    "compute_per_index",
    "save_values",
    "load_values",
    "cached_per_index",
]

log = logging.getLogger(__name__)


class PerIndexValues:
    """Values by dataset row: ``values[key]`` is ``(N,)`` float32, NaN where a row was never computed.

    ``lookup(index)`` gathers ``(B,)`` tensors for a batch's ``index (B,)`` on the index's device.
    """

    def __init__(self, values: Mapping[str, torch.Tensor]):
        self.values = {key: value.detach().float().cpu() for key, value in values.items()}
        self._device_values: dict[torch.device, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return next(iter(self.values.values())).shape[0] if self.values else 0

    def lookup(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        device = index.device
        if device not in self._device_values:  # one host-to-device copy, not one per step
            self._device_values[device] = {key: value.to(device) for key, value in self.values.items()}
        table = self._device_values[device]
        if len(index) and int(index.max()) >= len(self):
            raise KeyError(f"index {int(index.max())} is outside the cached values (N = {len(self)})")
        out = {key: value[index] for key, value in table.items()}
        for key, value in out.items():
            if torch.isnan(value).any():
                raise KeyError(f"cached {key!r} is missing for some rows of index {index.tolist()}")
        return out


def _hash_update(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        h.update(str((obj.dtype, tuple(obj.shape))).encode())
        h.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if obj.numel() else b"")
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())


def dataset_fingerprint(dataset: Iterable[Any]) -> str:
    """sha256 of every item of a map-style dataset (token ids and all; tensors by their bytes).

    Hashes what the values depend on — the tokenized examples — not the file they came from, so a
    different tokenizer or truncation setting gives a different fingerprint.
    """
    h = hashlib.sha256()
    n = 0
    for item in (dataset[i] for i in range(len(dataset))) if hasattr(dataset, "__len__") else dataset:
        if isinstance(item, Mapping):
            for key in sorted(item):
                h.update(str(key).encode())
                _hash_update(h, item[key])
        else:
            _hash_update(h, item)
        n += 1
    h.update(f"n={n}".encode())
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes of every tensor); a model that
    holds its weights elsewhere (the adapter-disabled reference of a LoRA policy) gives them through
    ``reference_state_dict()``."""
    h = hashlib.sha256()
    own = getattr(model, "reference_state_dict", None)
    state = own() if callable(own) else model.state_dict()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        _hash_update(h, tensor)
    return h.hexdigest()


def combine_fingerprints(**parts: Any) -> str:
    """One sha256 from named parts (strings, numbers, flags)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _unshuffled(loader: DataLoader) -> DataLoader:
    """The same dataset and collation in file order. Iterating it neither consumes the global RNG (a
    DataLoader iterator draws its base seed from its ``generator``, else from the global RNG, which
    would change the training shuffle) nor depends on a distributed sampler's shard."""
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size or 1,
        shuffle=False,
        collate_fn=loader.collate_fn,
        num_workers=0,
        generator=torch.Generator().manual_seed(0),
    )


@torch.no_grad()
def compute_per_index(
    dataloader: DataLoader,
    fn: Callable[[dict[str, Any]], Mapping[str, torch.Tensor]],
    *,
    device: torch.device | str | None = None,
    shard: tuple[int, int] = (0, 1),
) -> PerIndexValues:
    """Run ``fn(batch) -> {key: (B,) tensor}`` over every batch (in file order) and store by ``batch["index"]``.

    Args:
        dataloader: yields batches with an ``index (B,)`` column; its dataset must be map-style.
        fn: the per-batch computation (e.g. reference log-probs); called under ``torch.no_grad()``.
        device: where tensor fields of each batch are moved before ``fn``.
        shard: ``(rank, world_size)``: compute only batches ``rank, rank + world_size, ...``; the other
            rows stay NaN (see :func:`cached_per_index`, which merges the ranks' shards).
    """
    rank, world_size = shard
    size = len(dataloader.dataset)
    values: dict[str, torch.Tensor] = {}
    for batch_number, batch in enumerate(_unshuffled(dataloader)):
        if batch_number % world_size != rank:
            continue
        if "index" not in batch:
            raise KeyError("precomputing per-example values needs an `index` column in every batch")
        if device is not None:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        index = batch["index"].cpu()
        for key, value in fn(batch).items():
            if key not in values:
                values[key] = torch.full((size,), float("nan"))
            values[key][index] = value.detach().float().cpu()
    return PerIndexValues(values)


def save_values(path: str, values: PerIndexValues, *, fingerprint: str, meta: Mapping[str, Any] | None = None) -> str:
    """Write ``values`` atomically (a temporary file in the same folder, then ``os.replace``)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=".cache-", suffix=".pt", dir=os.path.dirname(path))
    os.close(fd)
    try:
        torch.save({"fingerprint": fingerprint, "values": values.values, "meta": dict(meta or {})}, staging)
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.remove(staging)
        raise
    return path


def load_values(path: str, *, fingerprint: str) -> PerIndexValues | None:
    """The values stored at ``path`` if it exists and carries ``fingerprint``; else None."""
    if not os.path.isfile(path):
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated/foreign file is a miss, not a crash
        log.warning("ignoring unreadable cache file %s: %s", path, error)
        return None
    if payload.get("fingerprint") != fingerprint:
        return None
    return PerIndexValues(payload["values"])


def cached_per_index(
    dataloader: DataLoader,
    fn: Callable[[dict[str, Any]], Mapping[str, torch.Tensor]],
    *,
    fingerprint: str,
    cache_dir: str | None,
    name: str,
    device: torch.device | str | None = None,
    write: bool = True,
) -> tuple[PerIndexValues, bool]:
    """Load the values for ``fingerprint`` from ``cache_dir``, or compute them with :func:`compute_per_index`
    and save them there.

    Args:
        fingerprint: everything the values depend on (see :func:`combine_fingerprints`).
        cache_dir: folder of cache files; ``None`` computes in memory only.
        name: file name prefix (e.g. ``"dpo-ref-train"``).
        write: save on a miss (set False on all but one data-parallel rank).

    Under ``torch.distributed`` (world size > 1, every rank calling this with the same arguments), each
    rank computes one ``world_size``-th of the batches and the shards are all-gathered: the values are
    computed once in all, not once per rank.

    Returns:
        ``(values, hit)``.
    """
    path = os.path.join(cache_dir, f"{name}-{fingerprint[:16]}.pt") if cache_dir else None
    rank, world_size = _process_group()
    cached = load_values(path, fingerprint=fingerprint) if path is not None else None
    # Ranks agree on hit or miss (a file one rank sees and another does not would otherwise leave one
    # rank waiting in the gather below).
    if _all_ranks(cached is not None, world_size):
        return cached, True
    values = compute_per_index(dataloader, fn, device=device, shard=(rank, world_size))
    if world_size > 1:
        values = _merge_shards(values, world_size)
    if path is not None and write:
        save_values(path, values, fingerprint=fingerprint, meta={"name": name, "rows": len(values)})
    return values, False


def _process_group() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_ranks(flag: bool, world_size: int) -> bool:
    if world_size == 1:
        return flag
    flags: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(flags, bool(flag))
    return all(flags)


def _merge_shards(values: PerIndexValues, world_size: int) -> PerIndexValues:
    """Every rank's rows (NaN elsewhere) gathered into one table, the same on every rank."""
    shards: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(shards, values.values)
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        for key, column in shard.items():
            if key not in merged:
                merged[key] = column.clone()
            else:
                filled = ~torch.isnan(column)
                merged[key][filled] = column[filled]
    return PerIndexValues(merged)
