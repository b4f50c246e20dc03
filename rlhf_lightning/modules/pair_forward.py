"""The pair forward shared by DPO and MODPO (and the reward model's pair scoring).

A preference batch holds two right-padded sequence sets, chosen ``(B, Tc)`` and rejected ``(B, Tr)``.
Both are padded to ``T = max(Tc, Tr)`` and stacked into one ``(2B, T)`` batch (chosen rows first), so a
model runs ONE forward per step instead of two: one kernel launch sequence, one FSDP all-gather, and
the same padding for both halves. The result is split back into per-pair ``(B,)`` tensors.

``layout`` picks how the ``2B`` sequences reach the model (:mod:`rlhf_lightning.data.packing`):

* ``"padded"``: the ``(2B, T)`` batch as it is;
* ``"padding_free"``: the sequences packed into rows without padding, attention kept per sequence;
* ``"shared_prompt"``: each pair packed as a tree — its prompt once, then the chosen and the rejected
  completion, both attending to the prompt and not to each other — the prompt computed once, not twice.

All three give the same per-sequence log-probs and rewards (to float rounding; tested). A model whose
attention implementation cannot take packed rows falls back to ``"padded"``
(:func:`~rlhf_lightning.modules.packed_forward.packing_mode`); under flash-attention the tree falls
back to ``"padding_free"``.

Notation: B pairs, T tokens, V vocabulary.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_lightning.data.packing import PackedBatch, pack_pairs
from rlhf_lightning.logprobs import causal_lm_logprobs
from rlhf_lightning.models import reward_model_scores
from rlhf_lightning.modules.packed_forward import packed_logprobs, packed_reward_scores, packing_mode, reward_packing_supported

__all__ = [
    "LAYOUTS",
    "ConcatenatedPair",
    "PairLogps",
    "concatenate_pair",
    "pair_logps",
    "reference_pair_logps",
    "reward_pair_scores",
]

LAYOUTS = ("padded", "padding_free", "shared_prompt")
_SIDES = ("chosen", "rejected")
_FIELDS = ("input_ids", "attention_mask", "completion_mask")


class ConcatenatedPair(NamedTuple):
    """Chosen and rejected stacked into one right-padded batch (rows ``[:B]`` chosen, ``[B:]`` rejected).

    Fields:
        input_ids: ``(2B, T)``.
        attention_mask: ``(2B, T)``, 1 on real tokens.
        completion_mask: ``(2B, T)``, 1 on completion tokens (incl. EOS).
        num_pairs: B.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    num_pairs: int


class PairLogps(NamedTuple):
    """Sequence log-probs of a preference batch under one model, plus what the metrics need.

    Fields:
        chosen_logps: ``(B,)`` float32 summed (or length-averaged) completion log-probs of the chosen side.
        rejected_logps: ``(B,)`` same for the rejected side.
        chosen_tokens: ``(B,)`` number of scored completion tokens (incl. EOS) on the chosen side.
        rejected_tokens: ``(B,)`` same for the rejected side.
        chosen_logits_mean: scalar mean logit over chosen completion tokens and the vocabulary
            (TRL's ``logits/chosen``), detached; ``None`` unless requested.
        rejected_logits_mean: same for the rejected side.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    chosen_logits_mean: torch.Tensor | None = None
    rejected_logits_mean: torch.Tensor | None = None


def _pad_right(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return x if x.shape[1] == length else F.pad(x, (0, length - x.shape[1]), value=value)


def concatenate_pair(batch: Mapping[str, torch.Tensor], *, pad_token_id: int = 0) -> ConcatenatedPair:
    """Stack a preference batch's chosen and rejected sequences into one ``(2B, T)`` right-padded batch.

    Args:
        batch: preference batch (``chosen_input_ids (B, Tc)``, ``rejected_input_ids (B, Tr)``, their
            ``attention_mask`` / ``completion_mask``; see ``docs/CONTRACTS_INTERNAL.md``).
        pad_token_id: id written into new padding (never read: the masks are explicit).
    """
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    stacked = []
    for field in _FIELDS:
        value = pad_token_id if field == "input_ids" else 0
        parts = [_pad_right(batch[f"{side}_{field}"], length, value) for side in _SIDES]
        stacked.append(torch.cat(parts, dim=0))
    return ConcatenatedPair(*stacked, num_pairs=batch["chosen_input_ids"].shape[0])


def pair_logps(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    average: bool = False,
    return_logits_mean: bool = False,
    pad_token_id: int = 0,
    layout: str = "padded",
    max_row_tokens: int | None = None,
) -> PairLogps:
    """Chosen and rejected sequence log-probs from ONE forward over the pair batch (``layout``: see the
    module docstring).

    Args:
        model: HF causal LM.
        batch: preference batch.
        average: length-average the sequence log-probs (IPO) instead of summing them.
        return_logits_mean: also compute the mean completion logits per side (a metric; costs one
            reduction over ``(2B, T, V)``).
        pad_token_id: see :func:`concatenate_pair`.
        layout: ``"padded"``, ``"padding_free"`` or ``"shared_prompt"``.
        max_row_tokens: token budget of a packed row; ``None`` = the longest sequence (tree) of the batch.

    Gradients flow unless the caller is under ``torch.no_grad()`` (see :func:`reference_pair_logps`).
    """
    pair = concatenate_pair(batch, pad_token_id=pad_token_id)
    packed = _pack(model, pair, layout, max_row_tokens, pad_token_id)
    if packed is not None:
        result = packed_logprobs(model, packed, average=average, return_logits_sum=return_logits_mean)
        b = pair.num_pairs
        tokens = result.tokens
        chosen_mean = rejected_mean = None
        if return_logits_mean:
            chosen_mean = result.logits_sum[:b].sum() / tokens[:b].sum().clamp(min=1.0)
            rejected_mean = result.logits_sum[b:].sum() / tokens[b:].sum().clamp(min=1.0)
        return PairLogps(result.sequence[:b], result.sequence[b:], tokens[:b], tokens[b:], chosen_mean, rejected_mean)
    out = causal_lm_logprobs(
        model, pair.input_ids, pair.attention_mask, pair.completion_mask, average=average, return_logits=return_logits_mean
    )
    b = pair.num_pairs
    tokens = out.mask.sum(dim=-1)  # (2B,)
    chosen_mean = rejected_mean = None
    if return_logits_mean:
        with torch.no_grad():
            # Sum over V first, then mask: never materialises a second (2B, T, V) tensor.
            per_token = out.logits.float().sum(dim=-1) * out.mask  # (2B, T-1)
            vocab = out.logits.shape[-1]
            chosen_mean = per_token[:b].sum() / (tokens[:b].sum().clamp(min=1.0) * vocab)
            rejected_mean = per_token[b:].sum() / (tokens[b:].sum().clamp(min=1.0) * vocab)
    return PairLogps(out.sequence[:b], out.sequence[b:], tokens[:b], tokens[b:], chosen_mean, rejected_mean)


def _pack(model: nn.Module, pair: ConcatenatedPair, layout: str, max_row_tokens: int | None, pad_token_id: int) -> PackedBatch | None:
    """The packed batch for ``layout``, or None for the padded path (asked for, or the model cannot take
    packed rows)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "padded":
        return None
    mode = packing_mode(model)
    if mode is None:
        return None
    return pack_pairs(
        pair.input_ids, pair.attention_mask, pair.completion_mask, pair.num_pairs,
        shared_prompt=layout == "shared_prompt" and mode == "mask", max_tokens=max_row_tokens, pad_token_id=pad_token_id,
    )


@torch.no_grad()
def reference_pair_logps(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    average: bool = False,
    pad_token_id: int = 0,
    layout: str = "padded",
    max_row_tokens: int | None = None,
) -> PairLogps:
    """:func:`pair_logps` for a frozen reference: under ``torch.no_grad()``, no logits statistics."""
    return pair_logps(model, batch, average=average, pad_token_id=pad_token_id, layout=layout, max_row_tokens=max_row_tokens)


def reward_pair_scores(
    reward_model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    pad_token_id: int = 0,
    layout: str = "padded",
    max_row_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar rewards of chosen and rejected from ONE reward-model forward over the pair batch
    (``layout``, ``max_row_tokens``: see :func:`pair_logps`; a model without a separate score head is
    scored padded).

    Returns:
        ``(chosen_rewards (B,), rejected_rewards (B,))`` float32, read at each row's last real token
        (:func:`~rlhf_lightning.models.reward_model_scores`).
    """
    pair = concatenate_pair(batch, pad_token_id=pad_token_id)
    if layout != "padded" and reward_packing_supported(reward_model):
        packed = _pack(reward_model, pair, layout, max_row_tokens, pad_token_id)
        if packed is not None:
            scores = packed_reward_scores(reward_model, packed)  # (2B,)
            return scores[: pair.num_pairs], scores[pair.num_pairs :]
    scores = reward_model_scores(reward_model, pair.input_ids, pair.attention_mask)  # (2B,)
    return scores[: pair.num_pairs], scores[pair.num_pairs :]
