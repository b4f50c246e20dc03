"""Sampling completions from a policy: KV-cached ``generate`` plus the masks every RLHF method needs.

Notation: N samples (= B prompts x ``num_samples_per_prompt``), P prompt tokens (left padded),
L generated tokens (right padded), T = P + L.

Layout of a :class:`GenerationOutput` row::

    input_ids       [pad pad BOS p1 p2 | c1 c2 EOS pad pad]
    attention_mask  [ 0   0   1  1  1 |  1  1  1   0   0 ]
    completion_mask [ 0   0   0  0  0 |  1  1  1   0   0 ]   (includes the first EOS/stop token)
                     <------ P ------> <------- L ------->

Where this departs from a plain ``model.generate`` call, and why:

* Every sampling parameter is passed explicitly (``top_k=0`` included). transformers fills unset
  parameters from the checkpoint's ``generation_config.json`` and then from global defaults
  (``top_k=50`` among them), which would silently make the sampling distribution differ from the
  temperature-scaled policy whose log-probs PPO computes.
* Whatever ``generate`` writes after a row's first stop token is replaced by the pad id and masked
  out (:func:`truncate_at_stop`): masks never depend on ``pad_token_id != eos_token_id``.
* HF ``generate`` draws from the global torch RNG and takes no ``torch.Generator``; ``seed`` forks the
  RNG state so that a seeded call is reproducible and leaves the caller's RNG untouched.
* Group sampling (``num_samples_per_prompt = G``) repeats each prompt G times (``repeat_interleave``). With
  ``share_prompt_prefill`` the prompts are instead encoded once: one forward over the B prompts (all but
  their last token) fills a KV cache, which is repeated G times (``DynamicCache.batch_repeat_interleave``)
  and handed to ``generate``, which then only runs the last prompt token and the new tokens. The samples
  are the same as without it (same RNG draws; tested), the prompt prefill costs B rows instead of B x G.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple, Sequence

import torch
from torch import nn

__all__ = [
    "SamplingConfig",
    "GenerationOutput",
    "generate",
    "truncate_at_stop",
    "decode_completions",
    "tokenize_prompts",
    "unwrap_generative_model",
    "eval_mode",
]


@dataclass
class SamplingConfig:
    """Sampling parameters of a rollout (YAML-friendly; see :func:`generate` for their meaning).

    Args:
        max_new_tokens: maximum completion length; a completion that reaches it without a stop token
            is *unfinished* (``finished=False``).
        temperature: softmax temperature; the log-probs used by PPO must be computed at the same value.
        top_k: keep the k most likely tokens; 0 disables (the default: PPO's log-probs assume the full
            distribution).
        top_p: nucleus sampling mass; 1.0 disables.
        do_sample: False gives greedy decoding (temperature/top-k/top-p are then ignored).
        num_samples_per_prompt: completions drawn per prompt (contiguous in the output).
        stop_token_ids: extra ids that end a completion like EOS does (EOS always does).
        share_prompt_prefill: with ``num_samples_per_prompt > 1``, encode each prompt once and repeat its
            KV cache rather than the prompt (see the module docstring); off by default.
    """

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True
    num_samples_per_prompt: int = 1
    stop_token_ids: list[int] | None = field(default=None)
    share_prompt_prefill: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_samples_per_prompt < 1:
            raise ValueError(f"num_samples_per_prompt must be >= 1, got {self.num_samples_per_prompt}")


class GenerationOutput(NamedTuple):
    """Output of :func:`generate` (N samples, P prompt tokens, L completion tokens, T = P + L).

    Fields:
        input_ids: ``(N, T)`` left-padded prompt followed by the right-padded completion.
        attention_mask: ``(N, T)`` 1 on prompt tokens and on completion tokens up to the first stop token.
        completion_mask: ``(N, T)`` 1 on generated tokens up to and including the first EOS/stop token.
        prompt_length: ``P``, the (padded) prompt width; completions start at column ``P``.
        completion_ids: ``(N, L)`` generated tokens, pad id after the first stop token.
        completion_lengths: ``(N,)`` number of completion tokens (including the stop token).
        finished: ``(N,)`` bool, True when the completion ended with EOS/stop, False when cut by
            ``max_new_tokens``.
        prompt_index: ``(N,)`` row of the prompt batch each sample comes from; the samples of one
            prompt are contiguous (``repeat_interleave`` order).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_length: int
    completion_ids: torch.Tensor
    completion_lengths: torch.Tensor
    finished: torch.Tensor
    prompt_index: torch.Tensor


def truncate_at_stop(
    completion_ids: torch.Tensor, stop_token_ids: int | Iterable[int], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each completion after its first stop token.

    Args:
        completion_ids: ``(N, L)`` generated tokens.
        stop_token_ids: one id or several (EOS plus any extra stop ids).
        pad_token_id: written after the first stop token.

    Returns:
        ``(ids, mask, finished)``: ``ids (N, L)`` with pad after the first stop token, ``mask (N, L)``
        long, 1 up to and including the first stop token (all ones when there is none), and
        ``finished (N,)`` bool, True when a stop token occurs.

    Example: with stop id 3 and pad 0, ``[5, 3, 7, 3] -> ids [5, 3, 0, 0], mask [1, 1, 0, 0], finished True``.
    """
    stops = torch.as_tensor(
        [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids),
        dtype=completion_ids.dtype,
        device=completion_ids.device,
    )
    is_stop = torch.isin(completion_ids, stops)
    # Number of stop tokens strictly before t: zero up to and including the first stop.
    stops_before = is_stop.long().cumsum(dim=-1) - is_stop.long()
    mask = (stops_before == 0).long()
    ids = torch.where(mask.bool(), completion_ids, torch.full_like(completion_ids, pad_token_id))
    finished = is_stop.any(dim=-1)
    return ids, mask, finished


def decode_completions(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor | None = None) -> list[str]:
    """Completion texts (special tokens, hence EOS, skipped).

    Args:
        tokenizer: the policy's tokenizer.
        completion_ids: ``(N, L)`` (or the full ``(N, T)`` ids together with a completion mask).
        completion_mask: optional ``(N, L)`` / ``(N, T)``; only tokens where it is 1 are decoded.
    """
    rows = []
    for row in range(completion_ids.shape[0]):
        ids = completion_ids[row]
        if completion_mask is not None:
            ids = ids[completion_mask[row].bool()]
        rows.append(ids.tolist())
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def tokenize_prompts(
    tokenizer,
    prompts: Sequence[str],
    *,
    max_length: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt batch following the tokenization convention (``add_special_tokens=True``).

    Args:
        tokenizer: any HF tokenizer; its ``padding_side`` is not used or changed.
        prompts: B prompt strings.
        max_length: keep at most the *last* ``max_length`` tokens of a prompt (its end conditions the
            completion).
        device: where to put the tensors.

    Returns:
        ``(prompt_input_ids (B, P), prompt_attention_mask (B, P))``.
    """
    encoded = [tokenizer(prompt, add_special_tokens=True)["input_ids"] for prompt in prompts]
    if max_length is not None:
        encoded = [ids[-max_length:] for ids in encoded]
    width = max((len(ids) for ids in encoded), default=0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def unwrap_generative_model(model: nn.Module) -> nn.Module:
    """The module that owns ``generate``: the LM inside a :class:`~rlhf_lightning.models.CausalLMWithValueHead`."""
    inner = getattr(model, "pretrained_model", None)
    if not hasattr(model, "generate") and isinstance(inner, nn.Module):
        return inner
    return model


@contextlib.contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Put models in eval mode (no dropout) and restore each one's previous mode afterwards."""
    previous = [(m, m.training) for m in models if m is not None]
    try:
        for model, _ in previous:
            model.eval()
        yield
    finally:
        for model, was_training in previous:
            model.train(was_training)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _shared_prompt_cache(model: nn.Module, prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor, group: int):
    """KV cache of the B prompts without their last token, each row repeated ``group`` times (B*G rows)."""
    from rlhf_lightning.logprobs import position_ids_from_attention_mask

    ids, mask = prompt_input_ids[:, :-1], prompt_attention_mask[:, :-1]
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_attention_mask(mask), use_cache=True)
    cache = out.cache if _cache_kwarg(type(out)) == "cache" else out.past_key_values
    cache.batch_repeat_interleave(group)
    return cache


def _cache_kwarg(output_type) -> str:
    """The ``generate`` keyword of a prefilled cache: ``cache`` (transformers >= 5.x), else ``past_key_values``."""
    return "cache" if "cache" in getattr(output_type, "__dataclass_fields__", {}) else "past_key_values"


def generate(
    model: nn.Module,
    tokenizer,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    num_samples_per_prompt: int = 1,
    stop_token_ids: Sequence[int] | None = None,
    seed: int | None = None,
    share_prompt_prefill: bool = False,
) -> GenerationOutput:
    """Sample completions with the KV cache, under ``torch.no_grad()`` and in eval mode.

    Args:
        model: any HF causal LM, or a :class:`~rlhf_lightning.models.CausalLMWithValueHead` (its
            ``pretrained_model`` generates). Its training mode is restored afterwards.
        tokenizer: supplies ``eos_token_id`` and ``pad_token_id`` (falls back to EOS).
        prompt_input_ids: ``(B, P)`` LEFT-padded prompts.
        prompt_attention_mask: ``(B, P)``.
        max_new_tokens: maximum completion length L.
        temperature / top_k / top_p / do_sample: see :class:`SamplingConfig`; ``top_k=0`` and
            ``top_p=1.0`` disable those filters.
        num_samples_per_prompt: samples per prompt; prompts are ``repeat_interleave``-d, so the samples
            of prompt b are rows ``b * n ... b * n + n - 1``.
        stop_token_ids: extra ids that end a completion (EOS always does, and so does the end-of-turn
            token of the tokenizer's chat template, if it has one).
        seed: if given, sampling is reproducible and the global RNG state is left unchanged.
        share_prompt_prefill: encode each prompt once and repeat its KV cache G times (module docstring).

    Returns:
        A :class:`GenerationOutput`. Generation stops early once every row has stopped, so
        ``L <= max_new_tokens``.
    """
    config = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        do_sample=do_sample,
        num_samples_per_prompt=num_samples_per_prompt,
        stop_token_ids=list(stop_token_ids) if stop_token_ids is not None else None,
        share_prompt_prefill=share_prompt_prefill,
    )
    if prompt_input_ids.dim() != 2 or prompt_input_ids.shape != prompt_attention_mask.shape:
        raise ValueError(
            f"prompt_input_ids and prompt_attention_mask must both be (B, P); got "
            f"{tuple(prompt_input_ids.shape)} and {tuple(prompt_attention_mask.shape)}"
        )
    if prompt_attention_mask.shape[1] > 0 and bool((prompt_attention_mask[:, -1] == 0).any()):
        raise ValueError("Prompts must be LEFT padded for generation (a row has padding in its last column).")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("The tokenizer has no eos_token_id; generation needs one to know when a completion ends.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    stop_ids = [eos_id] + [i for i in (config.stop_token_ids or []) if i != eos_id]
    # A chat template's end-of-turn token (e.g. ChatML's <|im_end|>) ends a reply too (data/chat.py).
    from rlhf_lightning.data.chat import end_of_turn_token_ids

    stop_ids += [i for i in end_of_turn_token_ids(tokenizer) if i not in stop_ids]

    generator_model = unwrap_generative_model(model)
    device = _model_device(generator_model)
    prompt_input_ids = prompt_input_ids.to(device)
    prompt_attention_mask = prompt_attention_mask.to(device)
    batch_size, prompt_length = prompt_input_ids.shape
    group = config.num_samples_per_prompt
    # Every row needs a real token before the last one, or its prefill would attend to nothing.
    prefill_once = (
        config.share_prompt_prefill and group > 1 and prompt_length > 1
        and bool((prompt_attention_mask[:, :-1].sum(dim=1) > 0).all())
    )
    unique_ids, unique_mask = prompt_input_ids, prompt_attention_mask
    prompt_index = torch.arange(batch_size, device=device).repeat_interleave(group)
    prompt_input_ids = prompt_input_ids[prompt_index]
    prompt_attention_mask = prompt_attention_mask[prompt_index]

    kwargs = dict(
        max_new_tokens=config.max_new_tokens,
        min_length=0,
        do_sample=config.do_sample,
        num_beams=1,
        num_return_sequences=1,
        use_cache=True,
        pad_token_id=pad_id,
        eos_token_id=stop_ids,
        return_dict_in_generate=False,
        repetition_penalty=1.0,
    )
    if config.do_sample:
        # Explicit values override the checkpoint's generation_config and transformers' global top_k=50.
        kwargs.update(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
    with eval_mode(model, generator_model), torch.no_grad(), _seeded(seed, device):
        if prefill_once:
            from transformers.modeling_outputs import CausalLMOutputWithPast

            kwargs[_cache_kwarg(CausalLMOutputWithPast)] = _shared_prompt_cache(generator_model, unique_ids, unique_mask, group)
        sequences = generator_model.generate(
            input_ids=prompt_input_ids, attention_mask=prompt_attention_mask, **kwargs
        )
    completion_ids, completion_mask, finished = truncate_at_stop(sequences[:, prompt_length:], stop_ids, pad_id)
    input_ids = torch.cat([prompt_input_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_attention_mask.long(), completion_mask], dim=1)
    full_completion_mask = torch.cat([torch.zeros_like(prompt_attention_mask, dtype=torch.long), completion_mask], dim=1)
    return GenerationOutput(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=full_completion_mask,
        prompt_length=prompt_length,
        completion_ids=completion_ids,
        completion_lengths=completion_mask.sum(dim=-1),
        finished=finished,
        prompt_index=prompt_index,
    )
