"""Fine-grained vs sequence-level rewards: the same sources, the same reward budget, several seeds.

Runs ``configs/fine_grained.yaml`` (segment-level rewards) and ``configs/fine_grained_sequence.yaml``
(the same sources paid once per completion) for ``--steps`` rollouts per seed, scores the policy on
fixed held-out prompts every ``--eval-every`` rollouts with the gold scorers, and writes to ``--out``:

* ``curves.csv`` — one row per evaluation: variant, seed, step, gold, each objective, KL to the SFT policy;
* ``train.csv`` — one row per rollout: the training metrics (``reward/raw`` is the per-episode total of
  the segment rewards, the same budget in both variants);
* ``curves.png`` — gold score and KL vs rollouts (thin: seeds, thick: mean over seeds);
* ``summary.md`` — rollouts needed to reach gold thresholds, per seed, and final scores.

The gold score is the budget-weighted sum of the gold sources' sequence totals,
``sum_k w_k * gold_k.total`` (sentiment + 0.5 fluency with the shipped configs). Thresholds are set
after the runs, at fractions of the way from the SFT score (step 0) to the best mean-over-seeds score
either variant reached, so that "fewer steps" is measured at several levels rather than one hand-picked.

    python scripts/fine_grained_vs_sequence.py --seeds 0 1 --steps 80 --eval-every 5 --out /tmp/fg
    python scripts/fine_grained_vs_sequence.py --merge /tmp/fg_seed0 /tmp/fg_seed1 --out /tmp/fg   # seeds run apart
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gold_curves import (  # noqa: E402
    GoldCurve, add_study_arguments, fit_config, group_runs, mean_curve, plot_mean_and_seeds, run_study, steps_to_reach,
    study_overrides, write_study,
)

from rlhf_lightning.rewards import GoldSegmentScorer  # noqa: E402
from rlhf_lightning.synthetic import GOLD_OBJECTIVES  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
VARIANTS = {
    "fine_grained": os.path.join(CONFIG_DIR, "fine_grained.yaml"),
    "sequence": os.path.join(CONFIG_DIR, "fine_grained_sequence.yaml"),
}


def budget_weights(module) -> dict[str, float]:
    """``{objective: weight}`` of the gold sources among a FineGrainedPPOModule's segment rewards."""
    weights: dict[str, float] = {}
    for spec in module.fine_grained.specs:
        if isinstance(spec.source, GoldSegmentScorer):
            weights[spec.source.objective] = weights.get(spec.source.objective, 0.0) + spec.weight
    return weights


def summarize(curves: dict[str, list[list[dict]]], fractions: list[float], seeds: list[int]) -> str:
    """Markdown: thresholds, rollouts to reach each per variant and seed, and final / best mean scores."""
    start = [rows[0]["gold"] for runs in curves.values() for rows in runs]
    start_mean = sum(start) / len(start)
    best = max(max(mean_curve(runs, "gold")[1]) for runs in curves.values())
    lines = [
        f"SFT gold score (step 0): {start_mean:+.3f}; best mean-over-seeds gold: {best:+.3f}",
        "",
        "| threshold | gold | " + " | ".join(f"{v} seed {s}" for v in curves for s in seeds) + " |",
        "|---|---|" + "---|" * (len(curves) * len(seeds)),
    ]
    for fraction in fractions:
        threshold = start_mean + fraction * (best - start_mean)
        cells = []
        for runs in curves.values():
            for rows in runs:
                reached = steps_to_reach(rows, threshold)
                cells.append("not reached" if reached is None else str(reached))
        lines.append(f"| {fraction:.0%} of the way | {threshold:+.3f} | " + " | ".join(cells) + " |")
    lines += ["", "| variant | final gold | final KL | " + " | ".join(f"final {o}" for o in GOLD_OBJECTIVES) + " | train s |",
              "|---|---|---|" + "---|" * len(GOLD_OBJECTIVES) + "---|"]
    for variant, runs in curves.items():
        n = len(runs)
        final = {key: sum(rows[-1][key] for rows in runs) / n for key in ("gold", "kl_to_reference", "train_time_s", *GOLD_OBJECTIVES)}
        lines.append(
            f"| {variant} (mean of {n}) | {final['gold']:+.3f} | {final['kl_to_reference']:.2f} | "
            + " | ".join(f"{final[o]:+.3f}" for o in GOLD_OBJECTIVES) + f" | {final['train_time_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[list[dict]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.5))
    plot_mean_and_seeds(axes[0], curves, "gold")
    plot_mean_and_seeds(axes[1], curves, "sentiment")
    plot_mean_and_seeds(axes[2], curves, "kl_to_reference")
    plot_mean_and_seeds(axes[3], curves, "response_length")
    axes[0].set(xlabel="rollouts", ylabel="gold (budget-weighted)", title="Gold score of the reward's sources")
    axes[1].set(xlabel="rollouts", ylabel="gold sentiment", title="Sentiment")
    axes[2].set(xlabel="rollouts", ylabel="KL(policy || SFT) [nats / seq]", title="Drift")
    axes[3].set(xlabel="rollouts", ylabel="tokens (incl. EOS)", title="Completion length")
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(parser, variants=VARIANTS, steps=80, eval_every=5, out="outputs/fine_grained_vs_sequence")
    parser.add_argument("--fine-grained-config", default=VARIANTS["fine_grained"])
    parser.add_argument("--sequence-config", default=VARIANTS["sequence"],
                        help="the same sources as --fine-grained-config, at sequence granularity")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9],
                        help="thresholds, as fractions of the way from the SFT score to the best mean score")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    def fit_one(variant: str, seed: int, curve: GoldCurve) -> None:
        def set_weights(module) -> None:  # the gold column weighs the objectives as the rewards do
            curve.weights = budget_weights(module)

        config = args.fine_grained_config if variant == "fine_grained" else args.sequence_config
        fit_config(config, study_overrides(args, variant, seed), curve, on_module=set_weights)

    eval_rows, train_rows = run_study(args, fit_one)
    variants = [v for v in args.variants if any(r["variant"] == v for r in eval_rows)]
    curves, seeds = group_runs(eval_rows, variants)

    write_study(args.out, eval_rows, train_rows, first=["variant", "seed", "step", "gold"],
                summary=summarize(curves, args.fractions, seeds), plot=lambda path: plot(curves, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
