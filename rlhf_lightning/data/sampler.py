"""A training-data order that survives a crash: keyed by ``(seed, epoch, position)``, saved in checkpoints.

The order of epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)`` alone — not
from the global RNG, whose state a resumed process does not share. How far into the epoch a run got
is taken from Lightning's own loop counters when a checkpoint is written (the batches it trained on
this epoch), stored through the DataModule's ``state_dict``, and on resume the sampler starts the
epoch's permutation right after them. So a run killed mid-epoch and resumed from its last checkpoint
sees exactly the batches an uninterrupted run sees, in the same order.

The sampler works at the index level; collation (padding, packing) is untouched. It is a
``DistributedSampler``: under data parallelism (DDP, FSDP2, even with one process) each rank takes
every ``world_size``-th index of the same permutation, and Lightning, which only swaps in its own
sampler when the loader has none of that type, leaves it in place. (Lightning's wrapper around a
plain sampler lists the sampler's indices once and indexes that list by the full epoch length, so a
resumed, shortened epoch crashed there with an ``IndexError``.) The saved position counts this rank's
records; a resume with another number of processes restarts the epoch (with a warning).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DistributedSampler

__all__ = ["ResumableSampler", "epoch_permutation"]


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order of the ``n`` training indices in ``epoch``: a function of ``(seed, epoch)`` only."""
    if not shuffle:
        return list(range(n))
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))
    return torch.randperm(n, generator=generator).tolist()


class ResumableSampler(DistributedSampler):
    """Indices ``0..n-1`` in the order of :func:`epoch_permutation`; ``resume_at(epoch, position)`` makes
    the next pass over that epoch start at ``position`` (the indices before it were already trained on).
    With ``num_replicas > 1`` rank ``r`` takes positions ``r, r + R, r + 2R, ...`` of the permutation
    (padded by its head to a multiple of ``R``, as ``DistributedSampler`` does).

    Lightning calls :meth:`set_epoch` before every epoch. ``len()`` stays a full epoch (this rank's
    share), so Lightning's per-epoch batch count, and with it any schedule, is the same in a resumed run.
    """

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(int(n)), num_replicas=int(num_replicas), rank=int(rank), shuffle=bool(shuffle),
                         seed=int(seed), drop_last=False)
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, position: int) -> None:
        self._resume = (int(epoch), int(position))

    def epoch_order(self) -> list[int]:
        """This epoch's order, a function of ``(seed, epoch)`` only (subclasses change how it is drawn)."""
        return epoch_permutation(self.n, self.seed, self.epoch, self.shuffle)

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        if self.num_replicas > 1:
            while len(order) < self.total_size:
                order = order + order[: self.total_size - len(order)]
            order = order[self.rank : self.total_size : self.num_replicas]
        start = 0
        if self._resume is not None:
            epoch, position = self._resume
            if epoch == self.epoch:
                start = min(max(position, 0), len(order))
            self._resume = None  # one pass only; later epochs start at 0
        return iter(order[start:])

    def __len__(self) -> int:
        return self.num_samples

    def state(self, position: int) -> dict[str, Any]:
        """``position``: this rank's records of the current epoch already trained on."""
        return {"seed": self.seed, "shuffle": self.shuffle, "epoch": self.epoch, "position": int(position), "n": self.n,
                "num_replicas": self.num_replicas}
