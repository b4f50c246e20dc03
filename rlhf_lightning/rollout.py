"""Rollouts for on-policy methods (PPO, Fine-Grained RLHF): sample, score, and record old log-probs/values.

Notation: N samples, T = P + L tokens (left-padded prompt, right-padded completion), T' = T - 1.

Alignment (the "shifted grid", shared by every per-token tensor of a :class:`Rollout`)
-------------------------------------------------------------------------------------
Column ``t`` of a ``(N, T')`` tensor belongs to the *action* ``a_t = input_ids[:, t + 1]`` taken in the
*state* ``s_t = input_ids[:, :t + 1]``:

* ``logprobs[:, t]     = log pi_old(input_ids[:, t+1] | input_ids[:, :t+1])`` (logits at position t);
* ``ref_logprobs[:, t] = log pi_ref(input_ids[:, t+1] | input_ids[:, :t+1])``;
* ``values[:, t]       = V(s_t)``, the value head read at position t, i.e. at the hidden state that
  *predicts* token t+1. It estimates the return from action ``a_t`` onwards, which is what GAE needs:
  ``delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)`` with ``r_t`` the reward of ``a_t``;
* ``mask[:, t] = completion_mask[:, t+1] * attention_mask[:, t+1]``: 1 on the completion's actions
  (the first generated token through the first EOS/stop token), 0 on prompt and padding.

So the first action of a row sits at column ``P - 1`` (the last prompt position predicts the first
completion token) and its last action at :meth:`Rollout.last_action_index`, where the sequence-level
score goes when building dense rewards. Never use ``values[:, 1:]`` or the unshifted masks with these
tensors: an off-by-one here trains the critic on the wrong state and silently hurts PPO.

Departures from common implementations, and why:

* Old log-probs are recomputed with a full forward pass (not taken from ``generate``'s scores), in
  eval mode and with the sampling temperature, so that the first PPO epoch's ratio is exactly 1 up to
  kernel noise. The ``top_k``/``top_p`` filters are *not* reflected in the log-probs (as in TRL); keep
  them disabled for PPO.
* Scores come from any :class:`~rlhf_lightning.rewards.RewardSource` on decoded text, so the reward
  model may use a different tokenizer from the policy; optional transforms (normalisation, clipping,
  missing-EOS penalty) are applied here because they need ``finished``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from rlhf_lightning.generation import (
    SamplingConfig,
    decode_completions,
    eval_mode,
    generate,
)
from rlhf_lightning.logprobs import entropy_from_logits, position_ids_from_attention_mask, token_logprobs

__all__ = [
    "Rollout",
    "PolicyForward",
    "policy_forward",
    "collect_rollout",
    "RolloutCollector",
    "concat_rollouts",
    "greedy_scores",
]


@dataclass
class Rollout:
    """One batch of experience (N samples, T tokens, T' = T - 1; see the module docstring for alignment).

    Fields:
        input_ids: ``(N, T)`` prompt (left padded) + completion (right padded).
        attention_mask: ``(N, T)`` 1 on real tokens.
        completion_mask: ``(N, T)`` 1 on completion tokens incl. the first EOS/stop token.
        mask: ``(N, T')`` completion mask on the shifted grid (use it with every ``(N, T')`` field).
        logprobs: ``(N, T')`` old-policy log-probs at the sampling temperature, 0 outside ``mask``.
        ref_logprobs: ``(N, T')`` frozen-reference log-probs (same temperature), or None without a reference.
        values: ``(N, T')`` old values ``V(s_t)``, 0 outside ``mask``, or None without a critic.
        scores: ``(N,)`` float32 sequence rewards after the reward transform.
        raw_scores: ``(N,)`` float32 sequence rewards as the reward source returned them.
        finished: ``(N,)`` bool, True if the completion ended with EOS/stop (not truncated).
        completion_lengths: ``(N,)`` completion tokens incl. the stop token.
        prompt_index: ``(N,)`` row of the prompt batch each sample came from: the group id of group
            sampling (``num_samples_per_prompt = G`` puts the G samples of a prompt in consecutive rows).
        index: ``(N,)`` dataset index of the prompt (from the batch's ``index``), or None.
        prompt_length: ``P``; completions start at column ``P`` of ``input_ids``.
        prompt_text: N prompt strings (repeated per sample).
        completion_text: N decoded completions (special tokens skipped).
        group_size: G, samples per prompt (rows ``g*G .. g*G+G-1`` are prompt g's group).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None
    values: torch.Tensor | None
    scores: torch.Tensor
    raw_scores: torch.Tensor
    finished: torch.Tensor
    completion_lengths: torch.Tensor
    prompt_index: torch.Tensor
    index: torch.Tensor | None
    prompt_length: int
    prompt_text: list[str]
    completion_text: list[str]
    group_size: int = 1

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def last_action_index(self) -> torch.Tensor:
        """``(N,)`` column of the last completion action on the shifted grid (where the score is paid)."""
        columns = torch.arange(self.mask.shape[1], device=self.mask.device)
        return (columns * self.mask.long()).argmax(dim=-1)

    def select(self, indices: torch.Tensor | Sequence[int]) -> "Rollout":
        """A sub-rollout of the given rows (for PPO minibatches); tensors are indexed, lists gathered."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        updates: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                updates[f.name] = value[indices.to(value.device)]
            elif isinstance(value, list):
                updates[f.name] = [value[i] for i in indices.tolist()]
        return replace(self, **updates)

    def to(self, device: torch.device | str) -> "Rollout":
        """A copy with every tensor on ``device``."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{name: value.to(device) for name, value in tensors.items() if isinstance(value, torch.Tensor)})


@dataclass
class PolicyForward:
    """Output of :func:`policy_forward` (T' = T - 1, the shifted grid).

    Fields:
        logprobs: ``(N, T')`` log-probs of the taken tokens, 0 outside ``mask``.
        mask: ``(N, T')`` float completion mask on the shifted grid.
        values: ``(N, T')`` ``V(s_t)`` (0 outside ``mask``) or None.
        entropy: ``(N, T')`` or None unless requested.
    """

    logprobs: torch.Tensor
    mask: torch.Tensor
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def _is_value_head_model(model: nn.Module) -> bool:
    return hasattr(model, "v_head") and hasattr(model, "pretrained_model")


def policy_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    value_model: nn.Module | None = None,
    return_entropy: bool = False,
    padding_free: bool = False,
    max_row_tokens: int | None = None,
) -> PolicyForward:
    """Per-token log-probs (and values) of a policy on full sequences, on the shifted grid.

    The same function computes old log-probs during the rollout (under ``no_grad``) and the new
    log-probs/values in the PPO update (with grad), so both use one alignment and one numeric path.

    Args:
        model: a HF causal LM, or a :class:`~rlhf_lightning.models.CausalLMWithValueHead` — then one
            trunk pass gives logits and values (shared-trunk PPO).
        input_ids: ``(N, T)``.
        attention_mask: ``(N, T)``.
        completion_mask: ``(N, T)``, 1 on the tokens to score.
        temperature: logits are divided by it (must equal the sampling temperature).
        value_model: a separate critic with ``.values(input_ids, attention_mask, position_ids) -> (N, T)``
            (e.g. a ``CausalLMWithValueHead``); overrides the policy's own head when given.
        return_entropy: also return per-token entropy of the (tempered) policy.
        padding_free: run the forward(s) over the episodes packed into rows without padding
            (:func:`~rlhf_lightning.data.packing.pack_episodes`; the output layer, log-softmax, entropy and
            value head only at the M scored positions) and scatter the results back to the ``(N, T')``
            grid: the same numbers as the padded forward. Models whose attention takes no packed rows
            (and separate critics that are not a ``CausalLMWithValueHead``) use the padded forward, with a
            one-time warning for the attention case.
        max_row_tokens: token budget of a packed row (None: the longest episode).
    """
    if padding_free and _packable(model, value_model):
        return _packed_policy_forward(
            model, input_ids, attention_mask, completion_mask, temperature=temperature, value_model=value_model,
            return_entropy=return_entropy, max_row_tokens=max_row_tokens,
        )
    position_ids = position_ids_from_attention_mask(attention_mask)
    values = None
    if _is_value_head_model(model):
        logits, values = model(input_ids, attention_mask, position_ids)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    if value_model is not None:
        values = value_model.values(input_ids, attention_mask, position_ids)
    logits = logits[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    mask = (completion_mask[:, 1:] * attention_mask[:, 1:]).float()
    logprobs = token_logprobs(logits, input_ids[:, 1:], mask)
    if values is not None:
        # V(s_t) is read at position t, the hidden state that predicts token t+1 (see module docstring).
        values = values[:, :-1].float() * mask
    entropy = entropy_from_logits(logits, mask) if return_entropy else None
    return PolicyForward(logprobs=logprobs, mask=mask, values=values, entropy=entropy)


def _packable(model: nn.Module, value_model: nn.Module | None) -> bool:
    from rlhf_lightning.modules.packed_forward import packing_mode  # lazy: modules/ imports this module

    if packing_mode(_reference_lm(model)) is None:
        return False
    return value_model is None or (_is_value_head_model(value_model) and packing_mode(value_model.pretrained_model) is not None)


def _packed_policy_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float,
    value_model: nn.Module | None,
    return_entropy: bool,
    max_row_tokens: int | None,
) -> PolicyForward:
    """:func:`policy_forward` over packed episodes (see its ``padding_free``). M = scored tokens."""
    from rlhf_lightning.data.packing import pack_episodes
    from rlhf_lightning.modules.packed_forward import packed_scored_logits, packed_values

    packed = pack_episodes(input_ids, attention_mask, completion_mask, max_tokens=max_row_tokens)
    mask = (completion_mask[:, 1:] * attention_mask[:, 1:]).float()
    scored = mask.bool()  # M True entries, in the order of the packed labels (row-major)
    if packed.label_ids.numel() != int(scored.sum()):
        raise RuntimeError(f"packed {packed.label_ids.numel()} scored tokens, the completion mask has {int(scored.sum())}")
    value_head = _is_value_head_model(model) and value_model is None
    out = packed_scored_logits(_reference_lm(model), packed, return_hidden=value_head)
    logits = out.logits  # (M, V) float32
    if temperature != 1.0:
        logits = logits / temperature
    token_logps = logits.gather(-1, packed.label_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (M,)

    def to_grid(per_token: torch.Tensor) -> torch.Tensor:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(scored, per_token.float())

    values = None
    if value_head:
        values = to_grid(model.v_head(out.hidden.to(model.v_head.weight.dtype)).squeeze(-1))
    elif value_model is not None:
        values = to_grid(packed_values(value_model, packed))
    entropy = to_grid(entropy_from_logits(logits)) if return_entropy else None
    return PolicyForward(logprobs=to_grid(token_logps), mask=mask, values=values, entropy=entropy)


def _reference_lm(model: nn.Module) -> nn.Module:
    return model.pretrained_model if _is_value_head_model(model) else model


def _chunks(n: int, size: int | None):
    size = n if not size else size
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _as_sampling(sampling: SamplingConfig | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> SamplingConfig:
    if sampling is None:
        sampling = SamplingConfig()
    elif isinstance(sampling, Mapping):
        sampling = SamplingConfig(**sampling)
    return replace(sampling, **overrides) if overrides else sampling


@torch.no_grad()
def collect_rollout(
    policy: nn.Module,
    reference: nn.Module | None,
    tokenizer,
    prompt_batch: Mapping[str, Any],
    *,
    reward_fn: Callable[..., torch.Tensor],
    sampling: SamplingConfig | Mapping[str, Any] | None = None,
    value_model: nn.Module | None = None,
    reward_transform: Callable[..., torch.Tensor] | None = None,
    forward_batch_size: int | None = None,
    seed: int | None = None,
    padding_free: bool = False,
    max_row_tokens: int | None = None,
    **sampling_overrides: Any,
) -> Rollout:
    """Generate completions for a prompt batch, score them, and record old log-probs, ref log-probs and values.

    Args:
        policy: HF causal LM or ``CausalLMWithValueHead`` (shared trunk: its head gives the values).
        reference: frozen reference LM (or None: ``ref_logprobs`` is None).
        tokenizer: the policy's tokenizer (EOS/pad ids, decoding).
        prompt_batch: a prompt batch (see docs/CONTRACTS_INTERNAL.md): ``prompt_input_ids (B, P)``
            LEFT padded, ``prompt_attention_mask (B, P)``, optional ``index (B,)`` and
            ``prompt_text: list[str]`` (decoded from the ids when absent).
        reward_fn: a ``RewardSource``: ``(prompts, completions, *, input_ids, attention_mask) -> (N,)``.
        sampling: :class:`~rlhf_lightning.generation.SamplingConfig` (or a dict of its fields);
            ``sampling_overrides`` (e.g. ``max_new_tokens=16``) replace single fields.
        value_model: separate critic with a ``.values`` method; None uses the policy's value head if any.
        reward_transform: optional ``(scores, *, finished) -> scores`` (e.g. ``RewardTransform``).
        forward_batch_size: rows per no-grad forward pass (None: all at once).
        seed: makes sampling reproducible without touching the global RNG.
        padding_free / max_row_tokens: the old-log-prob, value and reference forwards run over packed
            episodes (see :func:`policy_forward`).

    Returns:
        A :class:`Rollout` on the policy's device.
    """
    config = _as_sampling(sampling, sampling_overrides)
    gen = generate(
        policy,
        tokenizer,
        prompt_batch["prompt_input_ids"],
        prompt_batch["prompt_attention_mask"],
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        do_sample=config.do_sample,
        num_samples_per_prompt=config.num_samples_per_prompt,
        stop_token_ids=config.stop_token_ids,
        seed=seed,
        share_prompt_prefill=config.share_prompt_prefill,
    )
    # Greedy decoding has no temperature; log-probs are then those of the untempered policy.
    temperature = config.temperature if config.do_sample else 1.0

    logprobs, ref_logprobs, values, masks = [], [], [], []
    with eval_mode(policy, reference, value_model):
        for rows in _chunks(len(gen.input_ids), forward_batch_size):
            ids, attn, comp = gen.input_ids[rows], gen.attention_mask[rows], gen.completion_mask[rows]
            out = policy_forward(
                policy, ids, attn, comp, temperature=temperature, value_model=value_model, padding_free=padding_free,
                max_row_tokens=max_row_tokens,
            )
            logprobs.append(out.logprobs)
            masks.append(out.mask)
            if out.values is not None:
                values.append(out.values)
            if reference is not None:
                ref_device = next(reference.parameters()).device
                ref = policy_forward(
                    _reference_lm(reference),
                    ids.to(ref_device),
                    attn.to(ref_device),
                    comp.to(ref_device),
                    temperature=temperature,
                    padding_free=padding_free,
                    max_row_tokens=max_row_tokens,
                )
                ref_logprobs.append(ref.logprobs.to(ids.device))

    prompt_texts = prompt_batch.get("prompt_text")
    if prompt_texts is None:
        prompt_texts = tokenizer.batch_decode(
            [row[m.bool()].tolist() for row, m in zip(prompt_batch["prompt_input_ids"], prompt_batch["prompt_attention_mask"])],
            skip_special_tokens=True,
        )
    prompt_text = [prompt_texts[i] for i in gen.prompt_index.tolist()]
    completion_text = decode_completions(tokenizer, gen.completion_ids, gen.completion_mask[:, gen.prompt_length :])

    device = gen.input_ids.device
    raw_scores = torch.as_tensor(
        reward_fn(prompt_text, completion_text, input_ids=gen.input_ids, attention_mask=gen.attention_mask)
    ).to(device=device, dtype=torch.float32)
    if raw_scores.shape != (len(gen.input_ids),):
        raise ValueError(
            f"reward_fn must return one score per sample, shape ({len(gen.input_ids)},); got {tuple(raw_scores.shape)}"
        )
    scores = reward_transform(raw_scores, finished=gen.finished) if reward_transform is not None else raw_scores.clone()

    index = prompt_batch.get("index")
    if isinstance(index, torch.Tensor):
        index = index.to(device)[gen.prompt_index]
    return Rollout(
        input_ids=gen.input_ids,
        attention_mask=gen.attention_mask,
        completion_mask=gen.completion_mask,
        mask=torch.cat(masks),
        logprobs=torch.cat(logprobs),
        ref_logprobs=torch.cat(ref_logprobs) if reference is not None else None,
        values=torch.cat(values) if values else None,
        scores=scores.to(torch.float32),
        raw_scores=raw_scores,
        finished=gen.finished,
        completion_lengths=gen.completion_lengths,
        prompt_index=gen.prompt_index,
        index=index if isinstance(index, torch.Tensor) else None,
        prompt_length=gen.prompt_length,
        prompt_text=prompt_text,
        completion_text=completion_text,
        group_size=config.num_samples_per_prompt,
    )


def concat_rollouts(rollouts: Sequence[Rollout], pad_token_id: int) -> Rollout:
    """Stack rollouts row-wise (e.g. DAPO's refilled groups), re-padding them to one layout.

    Each part is left padded to the widest prompt and right padded to the longest completion, so the
    result keeps the layout of a single rollout (prompt in ``[:P]``, completion from column ``P``);
    ``prompt_index`` is offset per part so group ids stay distinct. All parts must share ``group_size``
    and have (or lack) the same optional fields.
    """
    if not rollouts:
        raise ValueError("concat_rollouts needs at least one rollout")
    if len({r.group_size for r in rollouts}) != 1:
        raise ValueError("concat_rollouts: every rollout must have the same group_size")
    prompt_length = max(r.prompt_length for r in rollouts)
    completion_length = max(r.input_ids.shape[1] - r.prompt_length for r in rollouts)
    fills = {"input_ids": pad_token_id}
    parts: dict[str, list] = {}
    offset = 0
    for r in rollouts:
        left, right = prompt_length - r.prompt_length, completion_length - (r.input_ids.shape[1] - r.prompt_length)
        for f in fields(r):
            value = getattr(r, f.name)
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                value = torch.nn.functional.pad(value, (left, right), value=fills.get(f.name, 0))
            elif f.name == "prompt_index":
                value = value + offset
            parts.setdefault(f.name, []).append(value)
        offset += int(r.prompt_index.max()) + 1 if len(r) else 0
    merged: dict[str, Any] = {}
    for name, values in parts.items():
        if isinstance(values[0], torch.Tensor):
            merged[name] = torch.cat(values)
        elif isinstance(values[0], list):
            merged[name] = [item for value in values for item in value]
        elif values[0] is None:
            if any(v is not None for v in values):
                raise ValueError(f"concat_rollouts: field {name!r} is None in some rollouts only")
            merged[name] = None
        else:
            merged[name] = values[0]
    merged["prompt_length"] = prompt_length
    return Rollout(**merged)


@torch.no_grad()
def greedy_scores(
    policy: nn.Module,
    tokenizer,
    prompt_batch: Mapping[str, Any],
    *,
    reward_fn: Callable[..., torch.Tensor],
    sampling: SamplingConfig,
    reward_transform: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(B,)`` scores of each prompt's greedy completion: ReMax's baseline (Li et al. 2024, Algorithm 1).

    One greedy completion per prompt with the rollout's length limit and stop tokens; a reward transform
    is applied without updating its running statistics (the baseline must not count as data).
    """
    gen = generate(
        policy,
        tokenizer,
        prompt_batch["prompt_input_ids"],
        prompt_batch["prompt_attention_mask"],
        max_new_tokens=sampling.max_new_tokens,
        do_sample=False,
        stop_token_ids=sampling.stop_token_ids,
    )
    prompts = prompt_batch.get("prompt_text")
    if prompts is None:
        prompts = tokenizer.batch_decode(
            [row[m.bool()].tolist() for row, m in zip(prompt_batch["prompt_input_ids"], prompt_batch["prompt_attention_mask"])],
            skip_special_tokens=True,
        )
    completions = decode_completions(tokenizer, gen.completion_ids, gen.completion_mask[:, gen.prompt_length :])
    scores = torch.as_tensor(
        reward_fn(list(prompts), completions, input_ids=gen.input_ids, attention_mask=gen.attention_mask)
    ).to(device=gen.input_ids.device, dtype=torch.float32)
    if reward_transform is not None:
        scores = reward_transform(scores, finished=gen.finished, update=False)
    return scores


class RolloutCollector:
    """:func:`collect_rollout` with its fixed parts bound (for a LightningModule to hold by composition).

    Args:
        reward_fn: the reward source.
        sampling: sampling parameters (:class:`~rlhf_lightning.generation.SamplingConfig` or dict).
        reward_transform: optional post-processing of scores (needs ``finished``).
        forward_batch_size: rows per no-grad forward pass.
    """

    def __init__(
        self,
        reward_fn: Callable[..., torch.Tensor],
        sampling: SamplingConfig | Mapping[str, Any] | None = None,
        *,
        reward_transform: Callable[..., torch.Tensor] | None = None,
        forward_batch_size: int | None = None,
    ) -> None:
        self.reward_fn = reward_fn
        self.sampling = _as_sampling(sampling, {})
        self.reward_transform = reward_transform
        self.forward_batch_size = forward_batch_size

    def __call__(
        self,
        policy: nn.Module,
        reference: nn.Module | None,
        tokenizer,
        prompt_batch: Mapping[str, Any],
        *,
        value_model: nn.Module | None = None,
        seed: int | None = None,
    ) -> Rollout:
        return collect_rollout(
            policy,
            reference,
            tokenizer,
            prompt_batch,
            reward_fn=self.reward_fn,
            sampling=self.sampling,
            value_model=value_model,
            reward_transform=self.reward_transform,
            forward_batch_size=self.forward_batch_size,
            seed=seed,
        )
