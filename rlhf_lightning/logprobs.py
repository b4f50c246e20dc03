"""Per-token and per-sequence log-probabilities of completions, with prompt and padding masked out.

Notation: B batch, T tokens, V vocabulary.

All functions here take logits and labels that are *already aligned*: ``logits[:, t]`` is the
distribution that predicts ``labels[:, t]``. For a causal LM over ``input_ids`` the caller shifts:
``logits[:, :-1]`` predicts ``input_ids[:, 1:]``. :func:`causal_lm_logprobs` does that shift for
you, and builds position ids from the attention mask so left- and right-padded batches give the
same numbers as unpadded single examples.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "token_logprobs",
    "sequence_logprobs",
    "entropy_from_logits",
    "position_ids_from_attention_mask",
    "CausalLMLogprobs",
    "causal_lm_logprobs",
]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probability of each label under its aligned logits.

    Args:
        logits: ``(B, T, V)`` unnormalised scores; ``logits[:, t]`` predicts ``labels[:, t]``.
        labels: ``(B, T)`` token ids. Entries where ``mask == 0`` may hold any value (e.g. -100).
        mask: optional ``(B, T)``; positions with 0 are returned as 0.

    Returns:
        ``(B, T)`` float32 tensor ``log softmax(logits)[b, t, labels[b, t]]``.
    """
    # log_softmax in float32: bf16 log-probs lose ~2 digits, which DPO's small differences cannot afford.
    logits = logits.float()
    safe_labels = labels.clamp(min=0) if mask is None else torch.where(mask.bool(), labels, 0).clamp(min=0)
    # gather(logits) - logsumexp(logits) avoids materialising the full (B, T, V) log_softmax twice.
    picked = torch.gather(logits, dim=-1, index=safe_labels.unsqueeze(-1)).squeeze(-1)
    logps = picked - torch.logsumexp(logits, dim=-1)
    if mask is not None:
        logps = logps * mask.to(logps.dtype)
    return logps


def sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, *, average: bool = False
) -> torch.Tensor:
    """Sum (or mean) of completion-token log-probs per sequence.

    Args:
        logits: ``(B, T, V)``, aligned with ``labels`` (the caller shifts).
        labels: ``(B, T)`` token ids.
        mask: ``(B, T)``, 1 on completion tokens only (prompt and padding are 0).
        average: divide by the number of completion tokens (IPO and length-normalised variants).

    Returns:
        ``(B,)`` float32: ``sum_t mask[b, t] * log p(labels[b, t])`` (divided by ``sum_t mask[b, t]``
        when ``average``; an empty completion gives 0).
    """
    per_token = token_logprobs(logits, labels, mask)
    total = per_token.sum(dim=-1)
    if average:
        total = total / mask.to(total.dtype).sum(dim=-1).clamp(min=1.0)
    return total


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of the categorical distribution at each position.

    Args:
        logits: ``(B, T, V)``.
        mask: optional ``(B, T)``; masked positions are returned as 0.

    Returns:
        ``(B, T)`` float32 ``-sum_v p_v log p_v``.
    """
    logits = logits.float()
    log_probs = F.log_softmax(logits, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    if mask is not None:
        entropy = entropy * mask.to(entropy.dtype)
    return entropy


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` position ids that start at 0 on each row's first real token.

    Without these, a left-padded row is shifted by its padding length under rotary/learned
    position embeddings and its log-probs differ from the same row unpadded.
    """
    position_ids = attention_mask.long().cumsum(dim=-1) - 1
    return position_ids.clamp(min=0)


class CausalLMLogprobs(NamedTuple):
    """Output of :func:`causal_lm_logprobs`.

    Fields (``T' = T - 1``, the shifted length):
        sequence: ``(B,)`` summed (or averaged) completion log-probs.
        tokens: ``(B, T')`` per-token log-probs, 0 outside the completion.
        mask: ``(B, T')`` completion mask aligned with ``tokens``.
        entropy: ``(B, T')`` per-token entropy, or ``None`` unless requested.
        logits: ``(B, T', V)`` shifted logits, or ``None`` unless requested.
    """

    sequence: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def causal_lm_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    average: bool = False,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_logits: bool = False,
) -> CausalLMLogprobs:
    """Run a causal LM on ``input_ids`` and score the completion tokens.

    Args:
        model: a Hugging Face causal LM (returns ``.logits`` of shape ``(B, T, V)``).
        input_ids: ``(B, T)`` prompt + completion, left or right padded.
        attention_mask: ``(B, T)``, 1 on real tokens.
        completion_mask: ``(B, T)``, 1 on completion tokens of ``input_ids`` (the tokens to score).
        average: length-normalise the sequence log-prob.
        temperature: logits are divided by it (must match the sampling temperature in PPO).
        return_entropy / return_logits: also return these (costs memory; off by default).
    """
    position_ids = position_ids_from_attention_mask(attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    logits = logits[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    labels = input_ids[:, 1:]
    mask = (completion_mask[:, 1:] * attention_mask[:, 1:]).to(logits.dtype if logits.is_floating_point() else torch.float32)
    tokens = token_logprobs(logits, labels, mask)
    sequence = tokens.sum(dim=-1)
    if average:
        sequence = sequence / mask.float().sum(dim=-1).clamp(min=1.0)
    entropy = entropy_from_logits(logits, mask) if return_entropy else None
    return CausalLMLogprobs(sequence, tokens, mask.float(), entropy, logits if return_logits else None)
