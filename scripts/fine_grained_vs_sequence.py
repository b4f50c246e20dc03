"""Fine-grained vs sequence-level rewards with the same sources and the same reward budget.

Runs ``configs/fine_grained.yaml`` and ``configs/fine_grained_sequence.yaml`` for ``--steps`` rollouts
each (same seed, same prompts), scores the policy on fixed held-out prompts every ``--eval-every``
steps with the gold scorers, writes ``curves.csv`` and ``curves.png`` to ``--out``, and prints the
steps each run needs to reach ``--threshold`` on the gold score.

The gold score is the budget-weighted sum of the sources' gold totals: ``sum_k w_k * gold_k.total``
(sentiment + 0.5 fluency with the shipped configs); sentiment/fluency/consistency are also recorded.

    python scripts/fine_grained_vs_sequence.py --steps 60 --eval-every 10 --threshold 0.6
    python scripts/fine_grained_vs_sequence.py --policy DIR --tokenizer DIR   # another policy
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import lightning as L
import torch

from rlhf_lightning.cli import cli_main
from rlhf_lightning.evaluation import evaluate_policy
from rlhf_lightning.rewards import GoldRewardSource, GoldSegmentScorer

RUNS = {"fine_grained": "configs/fine_grained.yaml", "sequence": "configs/fine_grained_sequence.yaml"}
OBJECTIVES = ("sentiment", "fluency", "consistency")


class GoldCurve(L.Callback):
    """Gold scores of the policy on fixed prompts at step 0 and every ``every`` rollouts."""

    def __init__(self, prompts: list[str], every: int, weights: dict[str, float], max_new_tokens: int, seed: int) -> None:
        self.prompts, self.every, self.weights = prompts, every, weights
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.rows: list[dict[str, float]] = []

    def evaluate(self, module, step: int) -> None:
        scorers = {f"gold/{name}": GoldRewardSource(name) for name in OBJECTIVES}
        was_training = module.training
        result = evaluate_policy(
            module.policy, module.tokenizer, self.prompts, scorers=scorers, reference=module.reference,
            max_new_tokens=self.max_new_tokens, temperature=1.0, do_sample=True, batch_size=len(self.prompts),
            seed=self.seed,  # the same samples' noise at every evaluation and in both runs
        )
        module.train(was_training)
        row = {"step": step, **{name: float(result.metrics[f"score/gold/{name}"]) for name in OBJECTIVES}}
        row["gold"] = sum(w * row[name] for name, w in self.weights.items())
        row["kl_to_reference"] = float(result.metrics.get("kl_to_reference", float("nan")))
        self.rows.append(row)
        print(f"  step {step:4d}  gold {row['gold']:+.3f}  " + "  ".join(f"{n} {row[n]:+.3f}" for n in OBJECTIVES), flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self.evaluate(pl_module, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self.evaluate(pl_module, trainer.global_step)


def budget_weights(module) -> dict[str, float]:
    """``{objective: weight}`` of the gold sources of a FineGrainedPPOModule's segment rewards."""
    weights: dict[str, float] = {}
    for spec in module.fine_grained.specs:
        if isinstance(spec.source, GoldSegmentScorer):
            weights[spec.source.objective] = weights.get(spec.source.objective, 0.0) + spec.weight
    return weights


def run(name: str, config: str, args, eval_prompts: list[str]) -> list[dict[str, float]]:
    overrides = [
        "--config", config,
        f"--seed_everything={args.seed}",
        f"--trainer.max_steps={args.steps}",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=0",
        "--trainer.callbacks=[]",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={os.path.join(args.out, name)}",
        f"--model.init_args.policy={args.policy}",
        f"--model.init_args.tokenizer={args.tokenizer}",
        f"--model.init_args.sampling.max_new_tokens={args.max_new_tokens}",
        f"--model.init_args.log_samples_every_n_steps=0",
        f"--data.init_args.train_file={args.prompts}",
        "--data.init_args.val_file=null",
        f"--data.init_args.batch_size={args.batch_size}",
    ]
    cli = cli_main(overrides, run=False)
    curve = GoldCurve(eval_prompts, args.eval_every, budget_weights(cli.model), args.max_new_tokens, args.seed)
    cli.trainer.callbacks.append(curve)
    start = time.time()
    print(f"[{name}] {config}: {args.steps} rollouts of {args.batch_size}", flush=True)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    print(f"[{name}] done in {time.time() - start:.0f}s", flush=True)
    return curve.rows


def steps_to(rows: list[dict[str, float]], threshold: float) -> int | None:
    return next((int(r["step"]) for r in rows if r["gold"] >= threshold), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="outputs/sft/hf/final")
    parser.add_argument("--tokenizer", default="outputs/world/tokenizer")
    parser.add_argument("--prompts", default="outputs/world/prompts_train.jsonl")
    parser.add_argument("--eval-prompts", default="outputs/world/prompts_eval.jsonl")
    parser.add_argument("--num-eval-prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threshold", type=float, default=None, help="gold score to reach (default: midway "
                        "between the initial score and the best score either run reached)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="outputs/fine_grained_vs_sequence")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    import json

    with open(args.eval_prompts) as f:
        eval_prompts = [json.loads(line)["prompt"] for line in f if line.strip()][: args.num_eval_prompts]
    curves = {name: run(name, config, args, eval_prompts) for name, config in RUNS.items()}

    csv_path = os.path.join(args.out, "curves.csv")
    with open(csv_path, "w", newline="") as f:
        columns = ["run", "step", "gold", *OBJECTIVES, "kl_to_reference"]
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for name, rows in curves.items():
            for row in rows:
                writer.writerow({"run": name, **row})

    threshold = args.threshold
    if threshold is None:
        start = curves["fine_grained"][0]["gold"]
        best = max(r["gold"] for rows in curves.values() for r in rows)
        threshold = start + 0.5 * (best - start)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in curves.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["gold"] for r in rows], marker="o", label=name)
        axes[1].plot(steps, [r["kl_to_reference"] for r in rows], marker="o", label=name)
    axes[0].axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
    axes[0].set(xlabel="rollouts", ylabel="gold score (budget-weighted)", title="Gold score on held-out prompts")
    axes[1].set(xlabel="rollouts", ylabel="KL to reference", title="Drift")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = os.path.join(args.out, "curves.png")
    fig.savefig(png_path, dpi=120)

    print(f"wrote {csv_path} and {png_path}")
    print(f"steps to gold >= {threshold:.3f} (evaluated every {args.eval_every}):")
    for name, rows in curves.items():
        reached = steps_to(rows, threshold)
        final = rows[-1]
        print(f"  {name:13s} {'not reached' if reached is None else reached:>12}   final gold {final['gold']:+.3f}"
              f"   final KL {final['kl_to_reference']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
