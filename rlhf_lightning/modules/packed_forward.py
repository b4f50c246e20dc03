"""Forwards over packed batches (:mod:`rlhf_lightning.data.packing`): per-sequence log-probs and rewards.

The model sees ``(R, L)`` packed rows with ``position_ids`` restarting per sequence and a 4D attention mask
that keeps every sequence (and every branch of a shared-prompt tree) to itself. The mask is given in
the form the model's attention implementation reads (transformers uses a 4D mask as-is):

* ``sdpa``: boolean ``(R, 1, L, L)``, True = attend;
* ``eager``: additive float mask, 0 where allowed and the dtype's minimum elsewhere;
* ``flash_attention_*``: no mask; transformers finds the sequences from ``position_ids`` (a drop that is
  not +1) and runs variable-length attention. A shared-prompt tree cannot be expressed that way, so
  tree units fall back to plain padding-free sequences there.

Any other implementation (flex, remote code of unknown behaviour) is not packed: callers fall back to
the padded batch with a one-time warning (:func:`packing_mode`).

Positions are read from ``position_ids`` by rotary (Llama, Mistral, Qwen, ...) and learned absolute
(GPT-2) embeddings alike, so a packed sequence gets the positions it has alone.

Notation: S sequences, R rows, L row length, N scored tokens, V vocabulary.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import nn

from rlhf_lightning.data.packing import PackedBatch

__all__ = [
    "PackedLogprobs",
    "ScoredLogits",
    "packing_mode",
    "packed_attention_mask",
    "packed_logprobs",
    "packed_reward_scores",
    "packed_scored_logits",
    "packed_values",
    "reward_packing_supported",
]

log = logging.getLogger(__name__)

_MASK_IMPLEMENTATIONS = ("sdpa", "eager")
_warned: set[str] = set()


def _attn_implementation(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def packing_mode(model: nn.Module, *, warn: bool = True) -> str | None:
    """How ``model`` takes packed rows: ``"mask"`` (a 4D mask; sdpa / eager), ``"position_ids"``
    (flash-attention: sequences found from positions; no tree) or ``None`` (not supported: use padding)."""
    impl = _attn_implementation(model)
    if impl in _MASK_IMPLEMENTATIONS:
        return "mask"
    if impl is not None and impl.startswith("flash_attention"):
        return "position_ids"
    if warn and str(impl) not in _warned:
        _warned.add(str(impl))
        log.warning("attention implementation %r does not take packed rows: falling back to padded batches", impl)
    return None


def packed_attention_mask(model: nn.Module, packed: PackedBatch, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """The attention mask to pass with ``packed`` to ``model`` (see the module docstring)."""
    mode = packing_mode(model, warn=False)
    if mode == "position_ids":
        if bool((packed.branch_ids > 0).any()):
            raise ValueError("flash-attention takes packed sequences from position_ids only: pack without shared_prompt")
        return None
    if mode is None:
        raise ValueError(f"attention implementation {_attn_implementation(model)!r} does not take packed rows")
    allowed = packed.attention_allowed()  # (R, 1, L, L)
    if _attn_implementation(model) == "sdpa":
        return allowed
    dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


class PackedLogprobs(NamedTuple):
    """Per-sequence log-probs of a packed forward.

    Fields:
        sequence: ``(S,)`` float32 summed (or length-averaged) log-probs of each sequence's scored tokens.
        tokens: ``(S,)`` float32 number of scored tokens per sequence.
        token_logps: ``(N,)`` float32 log-prob of every scored token (``packed.label_sequence`` says whose).
        logits_sum: ``(S,)`` sum over scored tokens of the vocabulary-mean logit that predicts them
            (detached), or ``None`` unless requested.
    """

    sequence: torch.Tensor
    tokens: torch.Tensor
    token_logps: torch.Tensor
    logits_sum: torch.Tensor | None = None


def packed_logprobs(
    model: nn.Module,
    packed: PackedBatch,
    *,
    average: bool = False,
    temperature: float = 1.0,
    return_logits_sum: bool = False,
) -> PackedLogprobs:
    """Run a causal LM over packed rows and score each sequence's labelled tokens.

    Args:
        model: a Hugging Face causal LM (``.logits`` of shape ``(R, L, V)``).
        packed: from :func:`~rlhf_lightning.data.packing.pack_sequences` / ``pack_pairs``.
        average: divide each sequence's sum by its number of scored tokens.
        temperature: logits are divided by it.
        return_logits_sum: also return the per-sequence sums of mean logits (a metric).

    Only the N predictor positions go through the output layer and the log-softmax: ``(N, V)`` logits
    instead of ``(R, L, V)`` (prompt positions and row padding predict nothing that is scored). A
    forward pre-hook on the model's output embeddings hands it the gathered ``(1, N, H)`` hidden states;
    whatever the model does to logits after that layer (soft-capping, scaling) still applies. A model
    without output embeddings gets the full logits, gathered afterwards.
    """
    picked = packed_scored_logits(model, packed).logits
    if temperature != 1.0:
        picked = picked / temperature
    token_logps = picked.gather(-1, packed.label_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(picked, dim=-1)  # (N,)
    s = packed.num_sequences
    sequence = torch.zeros(s, dtype=torch.float32, device=token_logps.device).index_add(0, packed.label_sequence, token_logps)
    tokens = torch.zeros(s, dtype=torch.float32, device=token_logps.device).index_add_(
        0, packed.label_sequence, torch.ones_like(token_logps)
    )
    if average:
        sequence = sequence / tokens.clamp(min=1.0)
    logits_sum = None
    if return_logits_sum:
        with torch.no_grad():
            logits_sum = torch.zeros(s, dtype=torch.float32, device=picked.device).index_add_(
                0, packed.label_sequence, picked.detach().mean(dim=-1)
            )
    return PackedLogprobs(sequence, tokens, token_logps, logits_sum)


class ScoredLogits(NamedTuple):
    """What a packed forward computes at the N predictor positions.

    Fields:
        logits: ``(N, V)`` float32 logits that predict the scored tokens (``packed.label_ids``).
        hidden: ``(N, H)`` the output layer's input at those positions (the final hidden states, as a
            value head reads them), or ``None`` unless requested.
    """

    logits: torch.Tensor
    hidden: torch.Tensor | None = None


def packed_scored_logits(model: nn.Module, packed: PackedBatch, *, return_hidden: bool = False) -> ScoredLogits:
    """One forward of a causal LM over packed rows; the output layer runs only at the N predictor positions.

    A forward pre-hook on the model's output embeddings hands it the gathered ``(1, N, H)`` hidden states;
    whatever the model does to logits after that layer (soft-capping, scaling) still applies. A model
    without output embeddings gets the full logits, gathered afterwards (then ``return_hidden`` raises).
    """
    mask = packed_attention_mask(model, packed)
    with _output_layer_on(model, packed.predictor_positions, packed.input_ids.shape) as hook:
        logits = model(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids, use_cache=False).logits
    if hook.installed:
        picked = logits.reshape(-1, logits.shape[-1]).float()  # (N, V)
    else:
        picked = logits.reshape(-1, logits.shape[-1])[packed.predictor_positions].float()  # (N, V)
    if picked.shape[0] != packed.predictor_positions.shape[0]:
        raise RuntimeError(f"expected logits for {packed.predictor_positions.shape[0]} positions, got {picked.shape[0]}")
    hidden = None
    if return_hidden:
        if hook.hidden is None:
            raise ValueError("the model has no output embeddings: its final hidden states cannot be read")
        hidden = hook.hidden.squeeze(0)  # (N, H)
    return ScoredLogits(picked, hidden)


def packed_values(value_model: nn.Module, packed: PackedBatch) -> torch.Tensor:
    """``(N,)`` float32 values of a :class:`~rlhf_lightning.models.CausalLMWithValueHead` critic at the
    predictor positions of ``packed`` (``V(s_t)`` is read at the hidden state that predicts token t+1), from
    one backbone forward over the packed rows (as ``CausalLMWithValueHead.values`` does for a padded batch)."""
    from rlhf_lightning.models import transformer_trunk

    lm = value_model.pretrained_model
    mask = packed_attention_mask(lm, packed)
    hidden = transformer_trunk(lm)(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids, use_cache=False)[0]
    if tuple(hidden.shape[:2]) != tuple(packed.input_ids.shape):
        raise RuntimeError(
            f"critic backbone returned {tuple(hidden.shape)}, expected hidden states {tuple(packed.input_ids.shape)} + (H,)"
        )
    picked = hidden.reshape(-1, hidden.shape[-1])[packed.predictor_positions]  # (N, H)
    return value_model.v_head(picked.to(value_model.v_head.weight.dtype)).squeeze(-1).float()


class _output_layer_on:
    """Context manager: while active, the model's output embeddings see only the hidden states at
    ``positions`` (flat indices into the ``(R, L)`` rows), as ``(1, N, H)``. ``as`` gives the context itself:
    ``installed`` is False when the model has no output embeddings (logits come back whole); ``hidden`` is
    the gathered ``(1, N, H)`` input the layer received."""

    def __init__(self, model: nn.Module, positions: torch.Tensor, rows_shape: torch.Size):
        getter = getattr(model, "get_output_embeddings", None)
        self.layer = getter() if callable(getter) else None
        self.positions, self.rows_shape, self.handle = positions, tuple(rows_shape), None
        self.hidden: torch.Tensor | None = None

    @property
    def installed(self) -> bool:
        return self.handle is not None

    def _gather(self, module: nn.Module, args: tuple):
        hidden = args[0]
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != self.rows_shape:
            raise RuntimeError(f"output layer input of shape {tuple(hidden.shape)}, expected {self.rows_shape} + (H,)")
        self.hidden = hidden.reshape(-1, hidden.shape[-1])[self.positions].unsqueeze(0)
        return (self.hidden, *args[1:])

    def __enter__(self) -> "_output_layer_on":
        if isinstance(self.layer, nn.Module):
            self.handle = self.layer.register_forward_pre_hook(self._gather)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()


def packed_reward_scores(reward_model: nn.Module, packed: PackedBatch) -> torch.Tensor:
    """``(S,)`` float32 scalar rewards read at each sequence's last token, from one backbone forward over
    the packed rows and the score head on those S positions (as
    :func:`~rlhf_lightning.models.reward_model_scores` does for a padded batch)."""
    from rlhf_lightning.models import _score_head, unwrap_peft

    if not reward_packing_supported(reward_model):
        raise ValueError("packed reward scoring needs a model with a transformers backbone (`base_model`) and a score head")
    inner = unwrap_peft(reward_model)  # a PeftModel's `base_model` is its tuner: the trunk is inside
    head, backbone = _score_head(inner), inner.base_model
    mask = packed_attention_mask(reward_model, packed)
    hidden = backbone(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids, use_cache=False)[0]
    if tuple(hidden.shape[:2]) != tuple(packed.input_ids.shape):
        raise RuntimeError(f"reward backbone returned {tuple(hidden.shape)}, expected hidden states {tuple(packed.input_ids.shape)} + (H,)")
    pooled = hidden.reshape(-1, hidden.shape[-1])[packed.last_positions]  # (S, H)
    return head(pooled).squeeze(-1).float()


def reward_packing_supported(reward_model: nn.Module) -> bool:
    """True when :func:`packed_reward_scores` can score ``reward_model``."""
    from rlhf_lightning.models import _score_head, unwrap_peft

    from transformers import PreTrainedModel

    inner = unwrap_peft(reward_model)  # looks through a PeftModel to the HF model with adapters injected
    backbone = getattr(inner, "base_model", None)
    # Another wrapper's `base_model` may run the whole classifier, not the backbone: padded path.
    return _score_head(inner) is not None and isinstance(backbone, PreTrainedModel) and backbone is not inner
