"""Collators: lists of tokenized examples -> the batch dicts of ``docs/CONTRACTS_INTERNAL.md``.

Padding is dynamic (to the longest sequence of the batch, optionally rounded up to a multiple).
Training batches are right padded; prompt batches are LEFT padded so that generation appends new tokens
right after every prompt's last real token. Masks are explicit and ``int64``; nothing downstream infers
them from the pad id (which may equal EOS).

Notation: B batch, T tokens, P prompt tokens, K objectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["pad_sequences", "DemonstrationCollator", "PreferenceCollator", "PromptCollator"]


def pad_sequences(
    sequences: Sequence[Sequence[int]],
    pad_value: int,
    *,
    side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> torch.Tensor:
    """``(B, T)`` int64 tensor of ``sequences`` padded with ``pad_value`` on ``side``; T is the longest
    length, rounded up to ``pad_to_multiple_of`` when given."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    length = max((len(s) for s in sequences), default=0)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    out = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if not len(seq):
            continue
        values = torch.as_tensor(seq, dtype=torch.long)
        if side == "right":
            out[i, : len(seq)] = values
        else:
            out[i, length - len(seq):] = values
    return out


def _sequences(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, multiple: int | None
) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion: ``input_ids``, ``attention_mask``, ``completion_mask``, each ``(B, T)``."""
    input_ids = pad_sequences([list(p) + list(c) for p, c in zip(prompts, completions)], pad_id, pad_to_multiple_of=multiple)
    attention = pad_sequences([[1] * (len(p) + len(c)) for p, c in zip(prompts, completions)], 0, pad_to_multiple_of=multiple)
    completion = pad_sequences(
        [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)], 0, pad_to_multiple_of=multiple
    )
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def _index(features: Sequence[dict[str, Any]]) -> torch.Tensor:
    return torch.tensor([f["index"] for f in features], dtype=torch.long)


@dataclass
class DemonstrationCollator:
    """Demonstration batch: ``input_ids``, ``attention_mask``, ``completion_mask`` ``(B, T)`` (the last is 1 on
    completion tokens including EOS), ``index (B,)``.

    Args:
        pad_token_id: id written into padded positions (masked out everywhere).
        pad_to_multiple_of: round T up to a multiple of this (e.g. 8 for tensor cores); ``None`` = no rounding.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = _sequences(
            [f["prompt_ids"] for f in features], [f["completion_ids"] for f in features], self.pad_token_id, self.pad_to_multiple_of
        )
        batch["index"] = _index(features)
        return batch


@dataclass
class PreferenceCollator:
    """Preference batch: ``{chosen,rejected}_{input_ids,attention_mask,completion_mask}`` (right padded,
    ``(B, Tc)`` and ``(B, Tr)`` — each side padded to its own longest), ``index (B,)``, and when the records
    have them ``margin (B,)`` float32 and ``chosen_scores`` / ``rejected_scores`` ``(B, K)`` float32.

    Args:
        pad_token_id: id written into padded positions.
        pad_to_multiple_of: round Tc and Tr up to a multiple of this; ``None`` = no rounding.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        prompts = [f["prompt_ids"] for f in features]
        for side in ("chosen", "rejected"):
            tensors = _sequences(prompts, [f[f"{side}_ids"] for f in features], self.pad_token_id, self.pad_to_multiple_of)
            batch.update({f"{side}_{name}": value for name, value in tensors.items()})
        batch["index"] = _index(features)
        # The loader guarantees every record has the same optional columns, so the first decides.
        if "margin" in features[0]:
            batch["margin"] = torch.tensor([f["margin"] for f in features], dtype=torch.float32)
        for key in ("chosen_scores", "rejected_scores"):
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)
        return batch


@dataclass
class PromptCollator:
    """Prompt batch (LEFT padded, for generation): ``prompt_input_ids``, ``prompt_attention_mask`` ``(B, P)``,
    ``index (B,)``, ``prompt_text: list[str]``; extra record fields come along as lists under their own names.

    Args:
        pad_token_id: id written into padded positions.
        pad_to_multiple_of: round P up to a multiple of this; ``None`` = no rounding.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        prompts = [f["prompt_ids"] for f in features]
        batch: dict[str, Any] = {
            "prompt_input_ids": pad_sequences(prompts, self.pad_token_id, side="left", pad_to_multiple_of=self.pad_to_multiple_of),
            "prompt_attention_mask": pad_sequences(
                [[1] * len(p) for p in prompts], 0, side="left", pad_to_multiple_of=self.pad_to_multiple_of
            ),
            "index": _index(features),
            "prompt_text": [f["prompt_text"] for f in features],
        }
        extra = sorted({key for f in features for key in f} - {"prompt_ids", "prompt_text", "index"})
        for key in extra:
            batch[key] = [f.get(key) for f in features]
        return batch
