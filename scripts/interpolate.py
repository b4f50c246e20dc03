"""Reward vs drift of weight interpolations between the initial (SFT) and a trained policy, and of runs.

    # alpha sweep theta = (1 - alpha) * theta_SFT + alpha * theta_trained, plus per-layer alphas and SLERP:
    python scripts/interpolate.py --init outputs/sft/hf/final --trained outputs/dpo/hf/final --out runs/interp \\
        --alphas 0 0.25 0.5 0.75 1 --layer-alphas '{"0-1": 0.2, "default": 1.0}' \\
        --slerp-with outputs/dpo_consistency/hf/final --slerp-t 0.25 0.5 0.75
    # the reward-vs-drift report of a set of runs (no sweep), e.g. PPO vs PPO + Elastic Reset:
    python scripts/interpolate.py --init outputs/sft/hf/final --out runs/report \\
        --runs DPO=outputs/dpo/hf/final PPO=outputs/ppo/hf/final

Every policy (interpolation, per-layer merge, SLERP merge, given run) is sampled on the same held-out prompts
with the same sampling seed (common random numbers: differences between rows come from the weights, not
from sampling noise), scored by the embedded world's gold scorers, and its Monte-Carlo KL to the reference
(``--reference``, by default ``--init``) is estimated with
:func:`rlhf_lightning.evaluation.evaluate_policy`. Writes ``<out>/interpolate.csv`` (one row per policy) and
``<out>/interpolate.png`` (one panel per objective: gold score against KL to the reference — the figure of
Gao et al. 2023 and of the Elastic Reset paper).

What the rows mean:

* ``interpolation`` (``--alphas``): WiSE-FT / model averaging of Lin et al. 2024; ``alpha`` 0 is the initial
  policy, 1 the trained one, > 1 extrapolates (ExPO).
* ``per_layer`` (``--layer-alphas``): heterogeneous model averaging, one JSON spec per row — a list with one
  alpha per decoder layer or ``{"i-j": alpha, ..., "default": alpha}``
  (:func:`rlhf_lightning.weights.resolve_alpha`).
* ``slerp`` (``--slerp-with``, ``--slerp-t``): SLERP of the task vectors ``trained - init`` and
  ``other - init``; ``t`` 0 is the trained policy, 1 the other one.
* ``run`` (``--runs LABEL=DIR``): a policy as trained; ``init`` is added when no sweep is asked for.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rlhf_lightning.evaluation import evaluate_policy
from rlhf_lightning.models import freeze, load_causal_lm, load_tokenizer
from rlhf_lightning.synthetic import GOLD_OBJECTIVES
from rlhf_lightning.weights import interpolate_state_dicts, resolve_alpha, slerp_task_vectors, validate_alpha_spec

__all__ = ["parse_args", "run", "write_results", "main"]

KINDS = ("init", "interpolation", "per_layer", "slerp", "run")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", required=True, help="initial (SFT) policy: HF directory or Hub name")
    parser.add_argument("--trained", default=None, help="trained policy to interpolate towards (same architecture)")
    parser.add_argument("--out", required=True, help="folder for interpolate.csv and interpolate.png")
    parser.add_argument("--alphas", type=float, nargs="*", default=None,
                        help="weights of the trained policy (default with --trained: 0 0.25 0.5 0.75 1)")
    parser.add_argument("--layer-alphas", nargs="*", default=[], metavar="JSON",
                        help='per-layer alpha specs, one row each: "[0.2, 0.4, 0.6, 0.8]" or \'{"0-1": 0.2, "default": 1}\'')
    parser.add_argument("--slerp-with", default=None, help="a second trained policy to merge with --trained by SLERP")
    parser.add_argument("--slerp-t", type=float, nargs="*", default=[0.25, 0.5, 0.75],
                        help="SLERP coefficients (0 = --trained, 1 = --slerp-with)")
    parser.add_argument("--runs", nargs="*", default=[], metavar="LABEL=DIR", help="trained policies to add as points")
    parser.add_argument("--reference", default=None, help="policy the KL is measured to (default: --init)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: the one saved with --init)")
    parser.add_argument("--prompts", default="outputs/world/prompts_eval.jsonl",
                        help="held-out prompts (JSONL, 'prompt' field)")
    parser.add_argument("--num-prompts", type=int, default=100, help="prompts evaluated (the first N)")
    parser.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="sampled tokens per completion")
    parser.add_argument("--objectives", nargs="+", default=list(GOLD_OBJECTIVES),
                        help=f"gold objectives, of {GOLD_OBJECTIVES}")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every policy")
    args = parser.parse_args(argv)

    if args.alphas is None:
        args.alphas = [0.0, 0.25, 0.5, 0.75, 1.0] if args.trained else []
    if (args.alphas or args.layer_alphas or args.slerp_with) and not args.trained:
        parser.error("--alphas, --layer-alphas and --slerp-with need --trained")
    if not args.trained and not args.runs:
        parser.error("nothing to evaluate: give --trained (a sweep) and/or --runs")
    bad = [a for a in args.alphas + args.slerp_t if not math.isfinite(a)]
    if bad:
        parser.error(f"alphas and SLERP t must be finite, got {bad}")
    specs = []
    for text in args.layer_alphas:
        try:
            spec = json.loads(text)
            validate_alpha_spec(spec)
        except (json.JSONDecodeError, ValueError) as err:
            parser.error(f"--layer-alphas {text!r}: {err}")
        specs.append(spec)
    args.layer_alphas = specs
    runs = []
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            parser.error(f"--runs takes LABEL=DIR, got {item!r}")
        runs.append((label, path))
    args.runs = runs
    unknown = sorted(set(args.objectives) - set(GOLD_OBJECTIVES))
    if unknown:
        parser.error(f"unknown objectives {unknown}; the embedded world has {list(GOLD_OBJECTIVES)}")
    if args.num_prompts < 1 or args.num_samples < 1 or args.max_new_tokens < 1:
        parser.error("--num-prompts, --num-samples and --max-new-tokens must be >= 1")
    if not Path(args.prompts).is_file():
        parser.error(f"--prompts {args.prompts} is not a file")
    return args


def read_prompts(path: str, limit: int) -> list[str]:
    with open(path) as handle:
        prompts = [json.loads(line)["prompt"] for line in handle if line.strip()][:limit]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Evaluate every requested policy; returns one row per policy (also written by :func:`write_results`)."""
    tokenizer = load_tokenizer(args.tokenizer or args.init, padding_side="left")
    prompts = read_prompts(args.prompts, args.num_prompts)
    init = freeze(load_causal_lm(args.init, tokenizer=tokenizer))
    reference = init if args.reference is None else freeze(load_causal_lm(args.reference, tokenizer=tokenizer))
    init_state = _cpu_state(init)
    for spec in args.layer_alphas:  # fail before minutes of evaluation, not in the middle
        resolve_alpha(spec, init_state.keys())
    # Merged weights are loaded into one working copy; init stays untouched (it may be the reference).
    work = copy.deepcopy(init)

    rows: list[dict[str, Any]] = []

    def evaluate(model: torch.nn.Module, kind: str, label: str, coefficient: float | str = "") -> None:
        started = time.perf_counter()
        result = evaluate_policy(
            model, tokenizer, prompts, scorers=list(args.objectives), reference=reference, num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=50,
        )
        row: dict[str, Any] = {"kind": kind, "label": label, "coefficient": coefficient, "n_samples": len(result.samples)}
        row.update({key: float(value) for key, value in result.metrics.items()})
        rows.append(row)
        scores = ", ".join(f"{name}={row[f'gold/{name}']:.3f}" for name in args.objectives)
        print(f"[interpolate] {kind:13s} {label:28s} KL={row['kl_to_reference']:.3f} {scores} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    def evaluate_state(state: dict[str, torch.Tensor], kind: str, label: str, coefficient: float | str = "") -> None:
        work.load_state_dict(state)
        evaluate(work, kind, label, coefficient)

    if args.trained:
        trained_state = _cpu_state(load_causal_lm(args.trained, tokenizer=tokenizer))
        for alpha in args.alphas:
            merged = interpolate_state_dicts(init_state, trained_state, alpha)
            evaluate_state(merged, "interpolation", f"alpha={alpha:g}", alpha)
        for spec in args.layer_alphas:
            evaluate_state(interpolate_state_dicts(init_state, trained_state, spec), "per_layer", json.dumps(spec))
        if args.slerp_with:
            other_state = _cpu_state(load_causal_lm(args.slerp_with, tokenizer=tokenizer))
            for t in args.slerp_t:
                evaluate_state(slerp_task_vectors(init_state, trained_state, other_state, t), "slerp", f"slerp t={t:g}", t)
            del other_state
        del trained_state
    else:
        evaluate(init, "init", "init")
    for label, path in args.runs:
        evaluate(freeze(load_causal_lm(path, tokenizer=tokenizer)), "run", label)
    return rows


def write_results(rows: list[dict[str, Any]], out: Path, objectives: list[str]) -> None:
    """``interpolate.csv`` (one row per policy) and ``interpolate.png`` (gold score vs KL, one panel per objective)."""
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(out / "interpolate.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(objectives), figsize=(4.5 * len(objectives), 4), squeeze=False)
    styles = {"interpolation": ("-o", "C0"), "slerp": ("-s", "C2")}
    markers = {"init": ("D", "gray"), "per_layer": ("^", "C1"), "run": ("*", "C3")}
    for axis, objective in zip(axes[0], objectives):
        y = f"gold/{objective}"
        for kind, (style, color) in styles.items():
            curve = sorted((row for row in rows if row["kind"] == kind), key=lambda row: row["coefficient"])
            if curve:
                axis.plot([row["kl_to_reference"] for row in curve], [row[y] for row in curve], style, color=color,
                          label=kind, zorder=2)
                for row in curve:
                    axis.annotate(f"{row['coefficient']:g}", (row["kl_to_reference"], row[y]), fontsize=7,
                                  xytext=(3, 3), textcoords="offset points")
        for kind, (marker, color) in markers.items():
            points = [row for row in rows if row["kind"] == kind]
            for i, row in enumerate(points):
                axis.scatter(row["kl_to_reference"], row[y], marker=marker, s=60, color=color, zorder=3,
                             label=kind if i == 0 else None)
                axis.annotate(row["label"], (row["kl_to_reference"], row[y]), fontsize=7, xytext=(3, -9),
                              textcoords="offset points")
        axis.set_xlabel("KL to reference (nats / completion)")
        axis.set_ylabel(f"gold {objective}")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.suptitle("gold score vs drift (labels: alpha / SLERP t)")
    figure.tight_layout()
    figure.savefig(out / "interpolate.png", dpi=120)
    plt.close(figure)
    print(f"[interpolate] wrote {out / 'interpolate.csv'} and {out / 'interpolate.png'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    write_results(rows, Path(args.out), list(args.objectives))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
