"""Gold-score-vs-step curves of RL runs driven through the CLI; shared by the comparison scripts
(``fine_grained_vs_sequence.py``, ``elastic_reset_vs_ppo.py``).

:class:`GoldCurve` is a callback that samples the policy on fixed held-out prompts at step 0 and every
``every`` rollouts and scores the samples with the embedded world's gold scorers; it also keeps the
per-rollout training metrics. :func:`fit_config` runs one config through the same LightningCLI as
``rlhf-lightning fit`` with the callback attached. Evaluation uses its own fixed sampling seed, so every
evaluation of every run draws the same sampling noise: step-0 rows of runs from one policy are identical,
and differences between runs come from training only.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from typing import Any, Callable, Sequence

import lightning as L

from rlhf_lightning.evaluation import evaluate_policy
from rlhf_lightning.rewards import GoldRewardSource
from rlhf_lightning.synthetic import GOLD_OBJECTIVES

__all__ = [
    "GoldCurve",
    "read_prompts",
    "fit_config",
    "write_csv",
    "read_runs",
    "group_runs",
    "steps_to_reach",
    "mean_curve",
    "plot_mean_and_seeds",
    "add_study_arguments",
    "study_overrides",
    "run_study",
    "write_study",
]

# Per-rollout metrics kept from the training step (whatever of these the module logs).
TRAIN_PREFIXES = ("reward/", "kl", "entropy", "response_length", "finished_fraction", "elastic_reset/", "value/")


class GoldCurve(L.Callback):
    def __init__(
        self,
        prompts: Sequence[str],
        every: int,
        *,
        weights: dict[str, float] | None = None,
        max_new_tokens: int = 48,
        eval_seed: int = 1234,
        batch_size: int = 64,
        scorers: dict[str, Any] | None = None,
    ) -> None:
        """Evaluate the policy with the gold scorers during fit.

        Args:
            prompts: held-out prompts (one sample each, temperature 1, no top-k / top-p).
            every: evaluate after every this many rollouts (and at step 0 and at the end of fit).
            weights: ``{objective: weight}``; each row gets ``gold = sum_k w_k * gold/<k>``
                (default: sentiment only).
            max_new_tokens: sampling length of the evaluation.
            eval_seed: sampling seed of every evaluation (the same noise at each step and in each run).
            batch_size: prompts per generation batch.
            scorers: extra ``{column: scorer}`` scored on the same samples (e.g. the proxy reward model a
                run optimises), as :func:`~rlhf_lightning.evaluation.evaluate_policy`'s dict scorers.
        """
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if not prompts:
            raise ValueError("GoldCurve needs at least one evaluation prompt")
        self.prompts = list(prompts)
        self.every = every
        self.weights = dict(weights or {"sentiment": 1.0})
        unknown = set(self.weights) - set(GOLD_OBJECTIVES)
        if unknown:
            raise ValueError(f"Unknown gold objectives {sorted(unknown)}; choose from {GOLD_OBJECTIVES}")
        self.max_new_tokens = max_new_tokens
        self.eval_seed = eval_seed
        self.batch_size = batch_size
        self.scorers = dict(scorers or {})
        clash = set(self.scorers) & {*GOLD_OBJECTIVES, "gold", "step", "kl_to_reference", "response_length", "train_time_s", "train_cpu_s"}
        if clash:
            raise ValueError(f"extra scorer names {sorted(clash)} clash with GoldCurve's own columns")
        self.rows: list[dict[str, float]] = []  # one per evaluation
        self.train_rows: list[dict[str, float]] = []  # one per rollout
        self._train_time = 0.0  # wall seconds of training, evaluations excluded
        self._train_cpu = 0.0  # CPU seconds of this process (all threads) in training, evaluations excluded
        self._mark = self._mark_cpu = 0.0

    def evaluate(self, module: L.LightningModule, step: int) -> dict[str, float]:
        """Gold scores and KL to ``module.reference`` of the current policy; appends and returns the row."""
        scorers = {name: GoldRewardSource(name) for name in GOLD_OBJECTIVES}
        result = evaluate_policy(
            module.policy, module.tokenizer, self.prompts, scorers={**scorers, **self.scorers}, reference=module.reference,
            max_new_tokens=self.max_new_tokens, temperature=1.0, do_sample=True, batch_size=self.batch_size,
            seed=self.eval_seed,
        )
        row = {"step": step, **{name: float(result.metrics[f"score/{name}"]) for name in GOLD_OBJECTIVES}}
        row.update({name: float(result.metrics[f"score/{name}"]) for name in self.scorers})
        row["gold"] = sum(w * row[name] for name, w in self.weights.items())
        row["kl_to_reference"] = float(result.metrics.get("kl_to_reference", math.nan))
        row["response_length"] = float(result.metrics["response_length"])
        row["train_time_s"] = round(self._train_time, 1)
        row["train_cpu_s"] = round(self._train_cpu, 1)
        self.rows.append(row)
        print(
            f"  step {step:4d}  gold {row['gold']:+.3f}  KL {row['kl_to_reference']:6.2f}  "
            + "  ".join(f"{n} {row[n]:+.3f}" for n in GOLD_OBJECTIVES),
            flush=True,
        )
        return row

    def on_train_start(self, trainer, pl_module) -> None:
        self.evaluate(pl_module, 0)
        self._mark, self._mark_cpu = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Callbacks run in list order: this one is appended last, so it sees the policy after every
        # configured callback (e.g. right after an Elastic Reset).
        self._train_time += time.perf_counter() - self._mark
        self._train_cpu += time.process_time() - self._mark_cpu
        step = trainer.global_step
        metrics = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith(TRAIN_PREFIXES) and not name.startswith("val/")
        }
        self.train_rows.append({"step": step, **metrics})
        if step % self.every == 0:
            self.evaluate(pl_module, step)
        self._mark, self._mark_cpu = time.perf_counter(), time.process_time()

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.rows or self.rows[-1]["step"] != trainer.global_step:
            self.evaluate(pl_module, trainer.global_step)


def read_prompts(path: str, limit: int | None = None) -> list[str]:
    """The ``prompt`` field of the first ``limit`` records of a JSONL file."""
    with open(path) as handle:
        prompts = [json.loads(line)["prompt"] for line in handle if line.strip()]
    return prompts[:limit] if limit is not None else prompts


def fit_config(
    config: str,
    overrides: Sequence[str],
    curve: GoldCurve,
    *,
    edit_callbacks: Callable[[list[L.Callback]], list[L.Callback]] | None = None,
    on_module: Callable[[L.LightningModule], None] | None = None,
) -> L.LightningModule:
    """``rlhf-lightning fit --config <config> <overrides>`` with ``curve`` attached; returns the trained module.

    Checkpointing and HF export callbacks of the config are dropped (these runs only write curves);
    ``edit_callbacks`` may then remove, replace or add callbacks (``curve`` always goes last);
    ``on_module`` sees the instantiated module before fit (e.g. to read its reward weights).
    """
    from lightning.pytorch.callbacks import Checkpoint

    from rlhf_lightning.callbacks import HFExport
    from rlhf_lightning.cli import cli_main

    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when a script's own argv is present
    try:
        cli = cli_main(["--config", config, *overrides], run=False)
    finally:
        sys.argv = argv
    callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, (Checkpoint, HFExport))]
    if edit_callbacks is not None:
        callbacks = list(edit_callbacks(callbacks))
    cli.trainer.callbacks[:] = [*callbacks, curve]
    if on_module is not None:
        on_module(cli.model)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model


def write_csv(path: str, rows: Sequence[dict[str, Any]], first: Sequence[str] = ()) -> None:
    """Rows (dicts) to CSV; columns are ``first`` then every other key in order of appearance."""
    columns = list(first)
    for row in rows:
        columns += [key for key in row if key not in columns]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in row.items()})


def _number(value: str) -> Any:
    if value == "":
        return math.nan
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


def read_runs(directories: Sequence[str], name: str) -> list[dict[str, Any]]:
    """The rows of ``<dir>/<name>`` (a CSV written by :func:`write_csv`) of every directory, numbers parsed.

    Lets runs made by separate invocations (e.g. one seed per CPU core) be summarised together.
    """
    rows: list[dict[str, Any]] = []
    for directory in directories:
        with open(os.path.join(directory, name)) as handle:
            rows += [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    return rows


def group_runs(rows: Sequence[dict[str, Any]], variants: Sequence[str]) -> tuple[dict[str, list[list[dict]]], list[int]]:
    """``{variant: [rows of seed s, ...]}`` (seeds in ascending order) and the sorted seeds."""
    seeds = sorted({int(r["seed"]) for r in rows})
    curves = {v: [] for v in variants}
    for variant in variants:
        for seed in seeds:
            run = sorted((r for r in rows if r["variant"] == variant and int(r["seed"]) == seed), key=lambda r: r["step"])
            if run:
                curves[variant].append(run)
    return curves, seeds


def steps_to_reach(rows: Sequence[dict[str, float]], threshold: float, key: str = "gold") -> int | None:
    """First evaluated step whose ``key`` is at least ``threshold`` (None if never)."""
    return next((int(r["step"]) for r in rows if r[key] >= threshold), None)


def mean_curve(runs: Sequence[Sequence[dict[str, float]]], key: str) -> tuple[list[int], list[float]]:
    """Steps evaluated by every run and the mean of ``key`` over runs at each of them."""
    if not runs:
        return [], []
    common = sorted(set.intersection(*(set(int(r["step"]) for r in rows) for rows in runs)))
    by_step = [{int(r["step"]): r[key] for r in rows} for rows in runs]
    return common, [sum(values[s] for values in by_step) / len(by_step) for s in common]


def plot_mean_and_seeds(axis, runs_by_label: dict[str, Sequence[Sequence[dict[str, float]]]], key: str, x: str = "step") -> None:
    """One colour per label: thin lines per seed, a thick line for the mean over seeds."""
    for i, (label, runs) in enumerate(runs_by_label.items()):
        colour = f"C{i}"
        for rows in runs:
            axis.plot([r[x] for r in rows], [r[key] for r in rows], color=colour, alpha=0.3, linewidth=0.8)
        if x == "step":
            steps, means = mean_curve(runs, key)
            axis.plot(steps, means, color=colour, linewidth=2, marker="o", markersize=3, label=f"{label} (mean of {len(runs)})")
        else:
            axis.plot([], [], color=colour, label=label)


# ---- the comparison scripts' shared command line and run loop -------------------------------------


def add_study_arguments(parser, *, variants: Sequence[str], steps: int, eval_every: int, out: str) -> None:
    """The options every comparison script takes: starting policy and data, variants and seeds, run
    length, overrides, ``--merge`` (summarise earlier runs) and ``--out``."""
    parser.add_argument("--policy", default="outputs/sft/hf/final", help="starting policy (a directory or an inline config JSON)")
    parser.add_argument("--tokenizer", default="outputs/world/tokenizer")
    parser.add_argument("--prompts", default="outputs/world/prompts_train.jsonl")
    parser.add_argument("--eval-prompts", default="outputs/world/prompts_eval.jsonl")
    parser.add_argument("--num-eval-prompts", type=int, default=128)
    parser.add_argument("--variants", nargs="+", default=list(variants), choices=list(variants))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=steps, help="rollouts per run (equal for every variant)")
    parser.add_argument("--eval-every", type=int, default=eval_every)
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per rollout (default: the config's)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's")
    parser.add_argument("--override", nargs="*", default=[],
                        help="extra CLI overrides for every run, e.g. --model.init_args.kl_coef=0.1")
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                        help="train nothing: summarise the curves.csv / train.csv of earlier --out folders together")
    parser.add_argument("--out", default=out)


def study_overrides(args, variant: str, seed: int) -> list[str]:
    """CLI overrides of one run: seed, length, the starting policy and prompts, no validation, logging or
    checkpoint folder outside ``<out>/runs/<variant>_seed<seed>``, then ``--override``."""
    return [
        f"--seed_everything={seed}",
        f"--model.init_args.seed={seed}",
        f"--trainer.max_steps={args.steps}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={os.path.join(args.out, 'runs', f'{variant}_seed{seed}')}",
        f"--model.init_args.policy={args.policy}",
        f"--model.init_args.tokenizer={args.tokenizer}",
        "--model.init_args.log_samples_every_n_steps=0",
        f"--data.init_args.train_file={args.prompts}",
        "--data.init_args.val_file=null",
        *([f"--data.init_args.batch_size={args.batch_size}"] if args.batch_size is not None else []),
        *([f"--model.init_args.sampling.max_new_tokens={args.max_new_tokens}"] if args.max_new_tokens is not None else []),
        *args.override,
    ]


def run_study(args, fit_one: Callable[[str, int, GoldCurve], None], *, weights: dict[str, float] | None = None,
              scorers: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every (seed, variant) run, or with ``--merge`` the rows of earlier runs: ``(eval_rows, train_rows)``,
    each row tagged with ``variant`` and ``seed``. ``fit_one(variant, seed, curve)`` trains one run with
    ``curve`` (a :class:`GoldCurve` on the evaluation prompts, gold ``weights`` and extra ``scorers`` if given)
    attached."""
    if args.merge:
        return read_runs(args.merge, "curves.csv"), read_runs(args.merge, "train.csv")
    eval_prompts = read_prompts(args.eval_prompts, args.num_eval_prompts)
    eval_rows: list[dict[str, Any]] = []
    train_rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for variant in args.variants:
            curve = GoldCurve(eval_prompts, args.eval_every, weights=weights, max_new_tokens=args.max_new_tokens or 48,
                              scorers=scorers)
            started = time.perf_counter()
            print(f"[{variant} seed {seed}] {args.steps} rollouts", flush=True)
            fit_one(variant, seed, curve)
            print(f"[{variant} seed {seed}] done in {time.perf_counter() - started:.0f} s", flush=True)
            eval_rows += [{"variant": variant, "seed": seed, **row} for row in curve.rows]
            train_rows += [{"variant": variant, "seed": seed, **row} for row in curve.train_rows]
    return eval_rows, train_rows


def write_study(out: str, eval_rows, train_rows, *, first: Sequence[str], summary: str,
                plot: Callable[[str], None]) -> None:
    """``<out>/curves.csv`` (evaluation rows, ``first`` columns first), ``train.csv``, ``curves.png`` (drawn by
    ``plot(path)``) and ``summary.md``; prints the summary."""
    write_csv(os.path.join(out, "curves.csv"), eval_rows, first=first)
    write_csv(os.path.join(out, "train.csv"), train_rows, first=["variant", "seed", "step"])
    plot(os.path.join(out, "curves.png"))
    with open(os.path.join(out, "summary.md"), "w") as handle:
        handle.write(summary)
    print(summary)
    print(f"wrote curves.csv, train.csv, curves.png, summary.md to {out}")
