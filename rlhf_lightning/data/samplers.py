"""Length-grouped sampling for padded batches.

A padded batch costs ``B x (longest sequence)`` tokens; drawn at random, a batch of short sequences
often carries one long one. :class:`LengthGroupedSampler` shuffles the data, cuts the order into windows
of ``window_batches`` batches, sorts each window by length (longest first) and cuts it into batches, so
a batch holds sequences of similar length; then it shuffles the order of the batches so the model does
not see lengths in a sawtooth. The batch holding the longest sequence goes first, so an out-of-memory
error shows on the first step, not hours later (as in Hugging Face's ``LengthGroupedSampler``).

Randomness stays: which examples meet in a window is random each epoch, only the grouping inside a
window is by length. With padding-free batches (the default for the pair and demonstration modules)
padding is already gone and grouping brings little; it is for the padded path.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlhf_lightning.data.sampler import ResumableSampler

__all__ = ["LengthGroupedSampler", "example_lengths"]


class LengthGroupedSampler(ResumableSampler):
    def __init__(self, lengths: Sequence[int], batch_size: int, *, window_batches: int = 50, seed: int = 0):
        """Indices in an order where consecutive ``batch_size`` runs have similar lengths.

        Args:
            lengths: length (tokens) of each example.
            batch_size: the DataLoader's batch size (batches are cut at multiples of it).
            window_batches: batches per sorting window; larger groups tighter, smaller keeps more
                randomness (50, as Hugging Face's ``mega batch``).
            seed: the order is a function of ``(seed, epoch)`` only (Lightning sets the epoch through
                ``set_epoch``), so a resumed run continues it exactly (:class:`ResumableSampler`).
        """
        if batch_size < 1 or window_batches < 1:
            raise ValueError(f"batch_size and window_batches must be >= 1, got {batch_size} and {window_batches}")
        super().__init__(len(lengths), seed=seed, shuffle=True)
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.window_batches = window_batches

    def epoch_order(self) -> list[int]:
        return [i for batch in self.batches() for i in batch]

    def batches(self) -> list[list[int]]:
        """This epoch's batches of indices (the last one may be short and stays last)."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        window = self.batch_size * self.window_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: -self.lengths[i])
            batches.extend(chunk[k : k + self.batch_size] for k in range(0, len(chunk), self.batch_size))
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        if not batches:
            return tail
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
        return batches + tail


def example_lengths(features: Sequence[dict]) -> list[int]:
    """Padded length each tokenized example needs: prompt + longest completion (a pair's two sides are
    padded together), prompt + completion, or the prompt alone."""
    lengths = []
    for f in features:
        completions = [len(f[key]) for key in ("completion_ids", "chosen_ids", "rejected_ids") if key in f]
        lengths.append(len(f["prompt_ids"]) + max(completions, default=0))
    return lengths
