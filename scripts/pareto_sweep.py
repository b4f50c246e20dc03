"""Trace the sentiment-vs-consistency Pareto front of MODPO on the embedded world.

    python scripts/pareto_sweep.py --run-dir outputs                      # full configs (needs sft/hf/final or trains it)
    python scripts/pareto_sweep.py --run-dir runs/front --quick           # minutes on a laptop CPU
    python scripts/pareto_sweep.py --run-dir runs/front --sft-dir D --world-dir W --steps 150 --lr 5e-4

Stages, each through :func:`rlhf_lightning.pipeline.fit_stage` with the YAML configs (``outputs/`` moved
to ``--run-dir`` as the pipeline does), each reused when its HF export already exists:

1. ``configs/modpo_margin_rm.yaml``: a reward model for consistency (the margin objective);
2. ``configs/modpo.yaml`` once per weighting ``[w, 1 - w]`` (sentiment, consistency), into
   ``<run-dir>/modpo_sentiment<w>``; reference log-probs and margins are scored once and shared
   through the config's cache folder.

Then every policy (and the SFT policy) is sampled on held-out prompts and scored by every gold objective
(:func:`rlhf_lightning.pipeline.evaluate_run`). Writes ``<run-dir>/pareto.csv`` and ``<run-dir>/pareto.png``
(gold sentiment vs gold consistency). The world and the SFT policy come from ``--world-dir`` /
``--sft-dir``, by default ``<run-dir>/world`` and ``<run-dir>/sft/hf/final`` (written / trained when missing).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from rlhf_lightning.pipeline import STAGES, evaluate_run, fit_stage, materialize_config, stage_export_dir

OBJECTIVE = "sentiment"  # trained from pairs (weights[0])
MARGIN = "consistency"  # the margin objective (weights[1])
QUICK = {"rm_steps": 150, "steps": 150, "lr": 5e-4, "eval_prompts": 64, "max_new_tokens": 32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="outputs", help="where stages and results are written (default: outputs)")
    parser.add_argument("--world-dir", default=None, help="embedded world folder (default: <run-dir>/world)")
    parser.add_argument("--sft-dir", default=None, help="SFT policy HF folder (default: <run-dir>/sft/hf/final)")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.9, 0.5, 0.1],
                        help=f"w_{OBJECTIVE} values; w_{MARGIN} = 1 - w (each in (0, 1])")
    parser.add_argument("--steps", type=int, default=None, help="MODPO steps per weighting (default: the config's)")
    parser.add_argument("--rm-steps", type=int, default=None, help="margin reward model steps (default: the config's)")
    parser.add_argument("--lr", type=float, default=None, help="MODPO peak learning rate (default: the config's)")
    parser.add_argument("--batch-size", type=int, default=None, help="MODPO pairs per step (default: the config's)")
    parser.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts per evaluation (default 100)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="sampled tokens per completion (default 48)")
    parser.add_argument("--margin-rm-init", default=None, metavar="DIR",
                        help="initialise the margin reward model from this causal LM (e.g. the SFT policy) "
                             "instead of the config's small model trained from scratch")
    parser.add_argument("--margin-rm-lr", type=float, default=None, help="margin reward model learning rate")
    parser.add_argument("--seed", type=int, default=0, help="training and sampling seed")
    parser.add_argument("--quick", action="store_true", help=f"short settings for smoke runs / CPU: {QUICK}")
    parser.add_argument("--force", action="store_true", help="retrain the MODPO stages even when their exports exist")
    args = parser.parse_args(argv)
    for key, value in QUICK.items():
        if getattr(args, key) is None and args.quick:
            setattr(args, key, value)
    args.eval_prompts = args.eval_prompts or 100
    args.max_new_tokens = args.max_new_tokens or 48
    if len(args.weights) < 2 or not all(0 < w <= 1 for w in args.weights):
        parser.error(f"--weights needs >= 2 values in (0, 1], got {args.weights}")
    return args


def stage_name(weight: float) -> str:
    return f"modpo_{OBJECTIVE}{weight:.2f}"


def prepare_base(args: argparse.Namespace, run_dir: Path) -> tuple[Path, Path]:
    """The world and the SFT policy: given, found under ``run_dir``, or made there."""
    world = Path(args.world_dir) if args.world_dir else run_dir / "world"
    if not (world / "pairs_sentiment_train.jsonl").exists():
        from rlhf_lightning.synthetic import write_world

        sizes = dict(n_demonstrations=3000, n_pairs=2000, n_prompts=300, n_eval_prompts=100) if args.quick else {}
        write_world(world, seed=args.seed, **sizes)
    sft = Path(args.sft_dir) if args.sft_dir else stage_export_dir(run_dir / "sft")
    if not (sft / "config.json").exists():
        if args.sft_dir:
            raise FileNotFoundError(f"--sft-dir {sft} holds no HF model (config.json)")
        stage = next(s for s in STAGES if s.name == "sft")
        print(f"[pareto] training the SFT policy into {sft}", flush=True)
        fit_stage(materialize_config(stage.config, run_dir), run_dir / "sft",
                  [f"--seed_everything={args.seed}", *(stage.quick_overrides if args.quick else []),
                   f"--model.init_args.tokenizer={world}/tokenizer",
                   f"--data.init_args.train_file={world}/sft_train.jsonl", f"--data.init_args.val_file={world}/sft_val.jsonl"],
                  quiet=True)
    return world, sft


def timed_fit_stage(config, stage_dir: Path, overrides: list[str], *, force: bool = False) -> tuple[Path, float]:
    """``fit_stage`` that keeps the training wall time in ``<stage_dir>/train_time_s.txt`` (and this process's CPU
    seconds, all threads, in ``train_cpu_s.txt``), read back when the stage is reused (NaN if an older run left no
    record)."""
    timing = Path(stage_dir) / "train_time_s.txt"
    trained = force or not (stage_export_dir(stage_dir) / "config.json").exists()
    started, started_cpu = time.perf_counter(), time.process_time()
    export = fit_stage(config, stage_dir, overrides, force=force, quiet=True)
    if trained:
        timing.write_text(f"{time.perf_counter() - started:.1f}\n")
        (Path(stage_dir) / "train_cpu_s.txt").write_text(f"{time.process_time() - started_cpu:.1f}\n")
    return export, float(timing.read_text()) if timing.exists() else float("nan")


def data_overrides(world: Path, objective: str) -> list[str]:
    return [f"--data.init_args.train_file={world}/pairs_{objective}_train.jsonl",
            f"--data.init_args.val_file={world}/pairs_{objective}_val.jsonl"]


def run_sweep(args: argparse.Namespace) -> list[dict]:
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    world, sft = prepare_base(args, run_dir)

    # ---- stage 1: the margin reward model (consistency) ----------------------------------------------
    started = time.perf_counter()
    # The margin RM is a small model trained from scratch (configs/modpo_margin_rm.yaml): it needs only the tokenizer.
    rm_overrides = [f"--seed_everything={args.seed}", f"--model.init_args.tokenizer={world}/tokenizer",
                    *data_overrides(world, MARGIN)]
    if args.rm_steps:
        rm_overrides += [f"--trainer.max_steps={args.rm_steps}", f"--trainer.val_check_interval={args.rm_steps}"]
    if args.margin_rm_init:
        rm_overrides.append(f"--model.init_args.model={args.margin_rm_init}")
    if args.margin_rm_lr:
        rm_overrides.append(f"--model.init_args.optim.lr={args.margin_rm_lr}")
    timed_fit_stage(materialize_config("modpo_margin_rm.yaml", run_dir), run_dir / "modpo_margin_rm", rm_overrides)
    print(f"[pareto] margin RM ready ({time.perf_counter() - started:.0f} s)", flush=True)

    # ---- stage 2: one MODPO run per weighting ----------------------------------------------------------
    config = materialize_config("modpo.yaml", run_dir)  # margin source -> <run-dir>/modpo_margin_rm/hf/final
    policies = [("SFT", None, sft, 0.0)]
    for weight in args.weights:
        overrides = [f"--seed_everything={args.seed}", f"--model.init_args.model={sft}", *data_overrides(world, OBJECTIVE),
                     f"--model.init_args.weights=[{weight}, {round(1.0 - weight, 6)}]"]
        if args.steps:
            overrides += [f"--trainer.max_steps={args.steps}", f"--trainer.val_check_interval={args.steps}",
                          f"--model.init_args.optim.warmup_steps={max(1, args.steps // 10)}"]
        if args.lr:
            overrides.append(f"--model.init_args.optim.lr={args.lr}")
        if args.batch_size:
            overrides.append(f"--data.init_args.batch_size={args.batch_size}")
        started = time.perf_counter()
        export, train_s = timed_fit_stage(config, run_dir / stage_name(weight), overrides, force=args.force)
        print(f"[pareto] w_{OBJECTIVE}={weight:.2f}: {export} ({time.perf_counter() - started:.0f} s)", flush=True)
        policies.append((f"MODPO w={weight:.2f}", weight, export, train_s))

    # ---- evaluate: gold score of every objective on held-out prompts ------------------------------------
    rows = []
    for label, weight, policy_dir, train_s in policies:
        result = evaluate_run(policy_dir, sft, world / "prompts_eval.jsonl", num_prompts=args.eval_prompts,
                              max_new_tokens=args.max_new_tokens, seed=args.seed)
        row = {"policy": label, f"w_{OBJECTIVE}": "" if weight is None else weight,
               f"w_{MARGIN}": "" if weight is None else round(1.0 - weight, 6)}
        row.update({key: float(value) for key, value in result.metrics.items()
                    if key.startswith("gold/") or key in ("kl_to_reference", "response_length")})
        row["train_s"] = train_s  # training wall seconds of this policy (MODPO stage 2; NaN if not recorded)
        rows.append(row)
        print(f"[pareto] {label}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    write_results(rows, run_dir)
    return rows


def write_results(rows: list[dict], run_dir: Path) -> None:
    """``pareto.csv`` (one row per policy) and ``pareto.png`` (the front in gold sentiment x consistency)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(run_dir / "pareto.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = f"gold/{OBJECTIVE}", f"gold/{MARGIN}"
    figure, axis = plt.subplots(figsize=(5, 4))
    front = sorted((row for row in rows if row[f"w_{OBJECTIVE}"] != ""), key=lambda row: row[f"w_{OBJECTIVE}"])
    axis.plot([row[x] for row in front], [row[y] for row in front], "-o", label="MODPO", zorder=2)
    for row in rows:
        if row[f"w_{OBJECTIVE}"] == "":
            axis.scatter(row[x], row[y], marker="s", color="gray", label=row["policy"], zorder=3)
        axis.annotate(row["policy"].replace("MODPO ", ""), (row[x], row[y]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    axis.set_xlabel(f"gold {OBJECTIVE}")
    axis.set_ylabel(f"gold {MARGIN}")
    axis.set_title(f"MODPO front: w_{OBJECTIVE} = w, w_{MARGIN} = 1 - w")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(run_dir / "pareto.png", dpi=120)
    plt.close(figure)
    print(f"[pareto] wrote {run_dir / 'pareto.csv'} and {run_dir / 'pareto.png'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    run_sweep(parse_args(argv))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
