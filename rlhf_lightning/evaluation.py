"""Evaluate a policy on held-out prompts: gold scores of its samples and its KL to a reference.

This measures what a method achieved (reward *and* drift), independently of its own training loss,
so that PPO, DPO, MODPO, ... can be compared on one reward-vs-KL plot.

KL estimator: for completions ``y ~ pi(. | x)``,
``KL(pi || pi_ref) = E_y [ sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) ]``,
estimated by the mean over samples of that sum over completion tokens (including EOS). Log-probs
are taken at temperature 1, so the estimate is the KL of the temperature-1 policy only when
sampling at ``temperature=1.0`` (with ``top_k``/``top_p`` off); at other temperatures it is the
expected log-ratio under the tempered sampler, a proxy. The single-sample estimate is unbiased but
can be negative; its mean over many samples is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from rlhf_lightning.generation import _model_device, decode_completions, eval_mode, generate, tokenize_prompts
from rlhf_lightning.rollout import _reference_lm, policy_forward

__all__ = ["EvalResult", "evaluate_policy"]

Scorer = Callable[[str, str], float]


@dataclass
class EvalResult:
    """Output of :func:`evaluate_policy`.

    Fields:
        metrics: means over all samples: ``"gold/<name>"`` (names given as a list) or
            ``"score/<key>"`` (scorers given as a dict), ``"kl_to_reference"`` (with a reference),
            ``"response_length"`` (completion tokens incl. EOS) and ``"finished_fraction"``; plus
            ``"<metric>_std"`` for each per-sample metric.
        samples: one dict per sample: ``prompt``, ``completion``, ``prompt_index``, ``sample_index``,
            ``length``, ``finished``, ``kl`` (with a reference) and each score under its metric name.
    """

    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)


BatchScorer = Callable[[list[str], list[str]], list[float]]


def _resolve_scorers(scorers: Mapping[str, Any] | Sequence[str] | None) -> dict[str, BatchScorer]:
    """Metric name -> batched ``(prompts, completions) -> list[float]``."""
    if scorers is None:
        return {}
    resolved: dict[str, BatchScorer] = {}
    if isinstance(scorers, Mapping):
        items = [(f"score/{key}", fn) for key, fn in scorers.items()]
    else:
        from rlhf_lightning.rewards.gold import GoldRewardSource

        items = [(f"gold/{name}", GoldRewardSource(name)) for name in scorers]
    for metric, fn in items:
        if isinstance(fn, str):
            from rlhf_lightning.rewards.base import resolve_callable

            fn = resolve_callable(fn)
        if hasattr(fn, "name") and callable(fn):
            # A RewardSource: batched, returns a tensor.
            resolved[metric] = lambda p, c, source=fn: [float(v) for v in torch.as_tensor(source(p, c)).tolist()]
        else:
            resolved[metric] = lambda p, c, scorer=fn: [float(scorer(pi, ci)) for pi, ci in zip(p, c)]
    return resolved


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return mean, math.sqrt(var)


@torch.no_grad()
def evaluate_policy(
    policy: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    scorers: Mapping[str, Any] | Sequence[str] | None = None,
    reference: nn.Module | None = None,
    num_samples: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    batch_size: int = 16,
    max_prompt_length: int | None = None,
    seed: int = 0,
) -> EvalResult:
    """Sample completions for held-out prompts, score them, and estimate the KL to a reference.

    Args:
        policy: HF causal LM (or ``CausalLMWithValueHead``) to evaluate; its training mode is restored.
        tokenizer: the policy's tokenizer (prompts are encoded with ``add_special_tokens=True`` and left padded).
        prompts: held-out prompt strings.
        scorers: a dict ``metric key -> scorer`` where a scorer is ``fn(prompt, completion) -> float``, a
            ``"module:attr"`` path to one, or a ``RewardSource``; or a list of gold objective names of
            ``rlhf_lightning.synthetic`` (e.g. ``["sentiment", "fluency"]``).
        reference: frozen reference LM for ``kl_to_reference``; None skips the KL.
        num_samples: completions per prompt.
        max_new_tokens / temperature / top_k / top_p / do_sample: sampling parameters (see
            :func:`~rlhf_lightning.generation.generate`).
        batch_size: prompts per generation batch.
        max_prompt_length: keep only the last tokens of longer prompts.
        seed: sampling seed; results are deterministic given it, and the global RNG is left untouched.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    resolved = _resolve_scorers(scorers)
    device = _model_device(policy)
    samples: list[dict[str, Any]] = []
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices), eval_mode(policy, reference):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            batch_prompts = list(prompts[start : start + batch_size])
            ids, mask = tokenize_prompts(tokenizer, batch_prompts, max_length=max_prompt_length, device=device)
            out = generate(
                policy,
                tokenizer,
                ids,
                mask,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                do_sample=do_sample,
                num_samples_per_prompt=num_samples,
            )
            completions = decode_completions(tokenizer, out.completion_ids, out.completion_mask[:, out.prompt_length :])
            sample_prompts = [batch_prompts[i] for i in out.prompt_index.tolist()]
            kl = None
            if reference is not None:
                lm = _reference_lm(policy)
                logp = policy_forward(lm, out.input_ids, out.attention_mask, out.completion_mask).logprobs
                ref_lm = _reference_lm(reference)
                ref_device = _model_device(ref_lm)
                ref_logp = policy_forward(
                    ref_lm, out.input_ids.to(ref_device), out.attention_mask.to(ref_device), out.completion_mask.to(ref_device)
                ).logprobs.to(logp.device)
                kl = (logp - ref_logp).sum(dim=-1).tolist()
            scores = {metric: fn(sample_prompts, completions) for metric, fn in resolved.items()}
            for row in range(len(completions)):
                prompt_index = start + int(out.prompt_index[row])
                sample = {
                    "prompt": sample_prompts[row],
                    "completion": completions[row],
                    "prompt_index": prompt_index,
                    "sample_index": row % num_samples,
                    "length": int(out.completion_lengths[row]),
                    "finished": bool(out.finished[row]),
                }
                if kl is not None:
                    sample["kl"] = float(kl[row])
                for metric, values in scores.items():
                    sample[metric] = float(values[row])
                samples.append(sample)

    metrics: dict[str, float] = {}
    per_sample = {metric: metric for metric in resolved}
    if reference is not None:
        per_sample["kl_to_reference"] = "kl"
    per_sample["response_length"] = "length"
    for metric, key in per_sample.items():
        mean, std = _mean_std([s[key] for s in samples])
        metrics[metric] = mean
        metrics[f"{metric}_std"] = std
    metrics["finished_fraction"] = _mean_std([float(s["finished"]) for s in samples])[0]
    return EvalResult(metrics=metrics, samples=samples)
