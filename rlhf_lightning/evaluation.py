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

Best-of-n (:func:`best_of_n`) draws ``N`` completions per prompt once and reports, for every ``n <= N``
and every selection source, the expected score of the completion a best-of-n sampler would return,
next to the analytic KL of best-of-n to the sampling policy, ``log n - (n - 1) / n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from rlhf_lightning.generation import _model_device, decode_completions, eval_mode, generate, tokenize_prompts
from rlhf_lightning.rollout import _reference_lm, policy_forward

__all__ = [
    "EvalResult",
    "evaluate_policy",
    "best_of_n_kl",
    "best_of_n_weights",
    "best_of_n_expectation",
    "BestOfNResult",
    "best_of_n",
    "best_of_n_rows",
]

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


# ---- best-of-n -----------------------------------------------------------------------------------


def best_of_n_kl(n: int) -> float:
    """Analytic KL(best-of-n || base policy) in nats: ``log n - (n - 1) / n``.

    Stiennon et al. 2020 (appendix G.3) and Gao et al. 2022 (section 2.2). It is exact when the n samples
    are almost surely distinct and an upper bound otherwise (Beirami et al. 2024): a low-entropy policy
    that repeats completions drifts less than this from best-of-n.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_weights(num_samples: int, n: int) -> torch.Tensor:
    """``(N,)`` probability that the ``i``-th smallest of ``N`` scores is the maximum of a uniformly drawn
    ``n``-subset (without replacement): ``C(i - 1, n - 1) / C(N, n)`` for ``i = 1..N`` (0 for ``i < n``).

    Weighting each sample's value by these (samples sorted by their selection score) gives the expected
    value of best-of-n computed from all ``N >= n`` draws at once: the unbiased estimator of Nakano et al.
    2021 (WebGPT, appendix) that Gao et al. 2022 use, with less variance than subsampling.
    """
    if not 1 <= n <= num_samples:
        raise ValueError(f"need 1 <= n <= num_samples, got n={n}, num_samples={num_samples}")
    i = torch.arange(1, num_samples + 1, dtype=torch.float64)
    # log C(i - 1, n - 1) - log C(N, n) with lgamma; rows i < n get probability 0.
    log_comb = lambda a, b: torch.lgamma(a + 1) - torch.lgamma(b + 1) - torch.lgamma(a - b + 1)  # noqa: E731
    valid = i >= n
    weights = torch.zeros(num_samples, dtype=torch.float64)
    a = i[valid] - 1
    weights[valid] = torch.exp(log_comb(a, torch.full_like(a, n - 1)) - log_comb(torch.tensor(float(num_samples)), torch.tensor(float(n))))
    return weights / weights.sum()  # exact up to rounding; renormalise against lgamma's


def best_of_n_expectation(selection_scores: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """``(P,)`` expected ``values`` of the completion that best-of-n picks by ``selection_scores``, per prompt.

    Args:
        selection_scores: ``(P, N)`` scores the sampler ranks by (e.g. a proxy reward model), N draws per prompt.
        values: ``(P, N)`` what to report of the picked completion (e.g. the gold score, or the proxy itself).
        n: the best-of-n budget, ``1 <= n <= N``.

    Ties in ``selection_scores`` go to the later draw (a stable ascending sort), as in :meth:`BestOfNResult.best`.
    """
    if selection_scores.shape != values.shape or selection_scores.dim() != 2:
        raise ValueError(f"selection_scores and values must both be (P, N); got {tuple(selection_scores.shape)} "
                         f"and {tuple(values.shape)}")
    order = torch.sort(selection_scores.double(), dim=1, stable=True).indices  # ascending
    sorted_values = torch.gather(values.double(), 1, order)
    return sorted_values @ best_of_n_weights(selection_scores.shape[1], n)


@dataclass
class BestOfNResult:
    """Output of :func:`best_of_n`.

    Fields:
        rows: one dict per (selector, n): ``selector``, ``n``, ``kl_bon`` (analytic KL, nats),
            ``sqrt_kl``, and for every metric ``m`` of the samples its expected value at the picked
            completion (mean over prompts) ``m`` and the standard error over prompts ``m_se``.
        samples: the ``P * N`` scored samples of :func:`evaluate_policy` (every metric per sample).
        scores: ``{selector: (P, N) tensor}``, each selector's scores as a grid (prompt, draw).
    """

    rows: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    scores: dict[str, torch.Tensor]

    def best(self, selector: str, n: int | None = None) -> list[dict[str, Any]]:
        """The sample each prompt's best-of-n picks by ``selector`` among its first ``n`` draws (default all);
        ties go to the later draw."""
        grid = self.scores[selector]
        n = grid.shape[1] if n is None else n
        # the last of the stably sorted draws: ties go to the later draw, as in best_of_n_expectation
        picked = torch.sort(grid[:, :n], dim=1, stable=True).indices[:, -1]
        return [self.samples[p * grid.shape[1] + int(j)] for p, j in enumerate(picked)]


def best_of_n(
    policy: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    selectors: Mapping[str, Any],
    scorers: Mapping[str, Any] | Sequence[str] | None = None,
    ns: Sequence[int] | None = None,
    num_samples: int | None = None,
    **sampling: Any,
) -> BestOfNResult:
    """Best-of-n sampling, evaluated: draw ``N`` completions per prompt once and, for every selection source
    and every ``n`` in ``ns``, report the expected score of the completion best-of-n picks.

    Args:
        policy / tokenizer / prompts: as :func:`evaluate_policy`.
        selectors: ``{name: scorer}`` ranking the draws (a ``RewardSource`` such as a proxy reward model or an
            ensemble, a ``(prompt, completion) -> float`` function, or a ``"module:attr"`` path). Their
            scores are metrics ``score/<name>`` (and reported at the picked completion too, e.g. to show the
            proxy rising with n); a dict ``scorers`` must use other names.
        scorers: what to report of the picked completion: gold objective names (``["sentiment"]`` ->
            ``gold/sentiment``) or a dict (-> ``score/<key>``), as in :func:`evaluate_policy`.
        ns: the budgets to report (default: the powers of two up to ``N``, and ``N``); each ``1 <= n <= N``.
        num_samples: ``N``, draws per prompt (default ``max(ns)``).
        **sampling: ``max_new_tokens``, ``temperature``, ``batch_size``, ``seed``, ... of :func:`evaluate_policy`.
            No ``reference``: the KL of best-of-n is the analytic :func:`best_of_n_kl`.

    Every ``n`` is estimated from the same ``N`` draws with :func:`best_of_n_expectation` (exact expectation
    over ``n``-subsets), so the curves over ``n`` are smooth and a larger ``n`` costs no extra sampling.
    """
    if not selectors:
        raise ValueError("best_of_n needs at least one selector (the reward source best-of-n ranks by)")
    if "reference" in sampling:
        raise ValueError("best_of_n reports the analytic KL of best-of-n; it takes no reference")
    if num_samples is None:
        if not ns:
            raise ValueError("give ns or num_samples")
        num_samples = max(ns)
    ns = sorted(set(ns)) if ns else sorted({2**k for k in range(int(math.log2(num_samples)) + 1)} | {num_samples})
    if ns[0] < 1 or ns[-1] > num_samples:
        raise ValueError(f"every n must be in [1, num_samples={num_samples}], got {ns}")
    if isinstance(scorers, Mapping):
        clash = set(scorers) & set(selectors)
        if clash:
            raise ValueError(f"names {sorted(clash)} are both selectors and scorers; use distinct names")
        report = dict(scorers)
    else:
        report = {}
    all_scorers: dict[str, Any] = {**dict(selectors), **report}
    result = evaluate_policy(policy, tokenizer, prompts, scorers=all_scorers, num_samples=num_samples, **sampling)
    metrics = [f"score/{name}" for name in all_scorers]
    if scorers is not None and not isinstance(scorers, Mapping):  # gold objective names, scored on the same draws
        from rlhf_lightning.rewards.gold import GoldRewardSource

        texts = ([s["prompt"] for s in result.samples], [s["completion"] for s in result.samples])
        for name in scorers:
            values = GoldRewardSource(name)(*texts).tolist()
            for sample, value in zip(result.samples, values):
                sample[f"gold/{name}"] = float(value)
            metrics.append(f"gold/{name}")
    metrics += ["length"]
    num_prompts = len(prompts)
    grids = {m: torch.tensor([s[m] for s in result.samples], dtype=torch.float64).view(num_prompts, num_samples) for m in metrics}
    selection = {name: grids[f"score/{name}"] for name in selectors}
    return BestOfNResult(rows=best_of_n_rows(selection, grids, ns), samples=result.samples, scores=selection)


def best_of_n_rows(selection: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor], ns: Sequence[int]
                   ) -> list[dict[str, Any]]:
    """The rows of :class:`BestOfNResult` from score grids: for every selector (``{name: (P, N)}`` scores to
    rank by) and every ``n``, the analytic KL and the mean over prompts (and its standard error) of every
    ``values`` grid (``{metric: (P, N)}``) at the picked completion. Lets a study rank the same draws by
    scores it combines afterwards (e.g. ensembles of reward models scored once) without sampling again."""
    rows: list[dict[str, Any]] = []
    for name, grid in selection.items():
        for n in ns:
            kl = best_of_n_kl(n)
            row: dict[str, Any] = {"selector": name, "n": n, "kl_bon": kl, "sqrt_kl": math.sqrt(kl)}
            for metric, value_grid in values.items():
                per_prompt = best_of_n_expectation(grid, value_grid, n)  # (P,)
                num_prompts = per_prompt.numel()
                row[metric] = float(per_prompt.mean())
                row[f"{metric}_se"] = float(per_prompt.std(unbiased=True) / math.sqrt(num_prompts)) if num_prompts > 1 else math.nan
            rows.append(row)
    return rows
