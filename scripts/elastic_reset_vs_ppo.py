"""PPO + Elastic Reset vs PPO alone at equal steps: gold score and KL to the SFT policy.

Runs ``--config`` (default ``configs/ppo_elastic_reset.yaml``) twice per seed: as written ("elastic_reset")
and with its ``ElasticReset`` callback removed ("ppo"); everything else — reward (the gold sentiment
scorer in the shipped config), KL controller, prompts, sampling seeds — is identical. The policy is scored
on fixed held-out prompts every ``--eval-every`` rollouts (after any reset of that step), and ``--out`` gets:

* ``curves.csv`` — one row per evaluation: variant, seed, step, gold (= ``--objective``), every objective,
  KL(policy || SFT) in nats per completion;
* ``train.csv`` — one row per rollout: the training metrics (reward, KL, KL coefficient, resets);
* ``curves.png`` — gold vs rollouts, KL vs rollouts, and gold vs KL (the Elastic Reset paper's figure);
* ``summary.md`` — final gold and KL per variant and seed, with the means, and "reward at equal drift":
  how far Elastic Reset's (KL, gold) evaluations lie above a straight line fitted to PPO's.

    python scripts/elastic_reset_vs_ppo.py --seeds 0 1 --steps 120 --eval-every 10 --out /tmp/er
    python scripts/elastic_reset_vs_ppo.py --reset-every 30 --decay 0.96     # another schedule
    python scripts/elastic_reset_vs_ppo.py --merge /tmp/er_seed0 /tmp/er_seed1 --out /tmp/er   # seeds run apart
    python scripts/elastic_reset_vs_ppo.py --reward-model runs/overopt/proxies/n250_s_seed0/hf/final \
        --override=--model.init_args.reward_transform.init_args.normalize=scale   # against a learned proxy

With ``--reward-model`` both arms optimise that reward model (a proxy) instead of the config's reward, and
every evaluation also scores the samples with it (column ``proxy``), so over-optimisation shows as the
proxy rising while gold falls.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gold_curves import (  # noqa: E402
    GoldCurve, add_study_arguments, fit_config, group_runs, plot_mean_and_seeds, run_study, study_overrides, write_study,
)

from rlhf_lightning.callbacks import ElasticReset  # noqa: E402
from rlhf_lightning.synthetic import GOLD_OBJECTIVES  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "ppo_elastic_reset.yaml")
VARIANTS = ("ppo", "elastic_reset")


def edit_callbacks(args, variant: str):
    """The config's callbacks for ``variant``: without ElasticReset ("ppo"), or with its schedule overridden."""

    def edit(callbacks: list) -> list:
        resets = [c for c in callbacks if isinstance(c, ElasticReset)]
        if len(resets) != 1:
            raise ValueError(f"{args.config} must configure exactly one ElasticReset callback, found {len(resets)}")
        (configured,) = resets
        if variant == "ppo":
            return [c for c in callbacks if c is not configured]
        if args.decay is None and args.reset_every is None:
            return callbacks
        replacement = ElasticReset(
            decay=args.decay if args.decay is not None else configured.decay,
            reset_every_n_steps=args.reset_every if args.reset_every is not None else configured.reset_every_n_steps,
            reset_ema_to_init=configured.reset_ema_to_init,
            reset_optimizer=configured.reset_optimizer,
        )
        return [replacement if c is configured else c for c in callbacks]

    return edit


def summarize(curves: dict[str, list[list[dict]]], seeds: list[int], objective: str) -> str:
    """Markdown: final gold / KL per variant and seed, their means, and the best gold at KL below the PPO mean."""
    lines = [
        f"| variant | seed | final gold {objective} | final KL | " + " | ".join(f"final {o}" for o in GOLD_OBJECTIVES)
        + " | mean gold over evals | mean KL over evals | train s |",
        "|---|---|---|---|" + "---|" * len(GOLD_OBJECTIVES) + "---|---|---|",
    ]
    for variant, runs in curves.items():
        for seed, rows in zip(seeds, runs):
            final = rows[-1]
            later = rows[1:] or rows  # evaluations after step 0
            lines.append(
                f"| {variant} | {seed} | {final['gold']:+.3f} | {final['kl_to_reference']:.2f} | "
                + " | ".join(f"{final[o]:+.3f}" for o in GOLD_OBJECTIVES)
                + f" | {sum(r['gold'] for r in later) / len(later):+.3f}"
                + f" | {sum(r['kl_to_reference'] for r in later) / len(later):.2f} | {final['train_time_s']:.0f} |"
            )
        n = len(runs)
        mean = lambda key: sum(rows[-1][key] for rows in runs) / n  # noqa: E731
        lines.append(
            f"| **{variant}** | mean of {n} | **{mean('gold'):+.3f}** | **{mean('kl_to_reference'):.2f}** | "
            + " | ".join(f"{mean(o):+.3f}" for o in GOLD_OBJECTIVES) + " | | | |"
        )
    if {"ppo", "elastic_reset"} <= set(curves):
        residual = frontier_residual(curves["ppo"], curves["elastic_reset"])
        if residual is not None:
            mean, sem, slope, n = residual
            lines += ["", f"Reward at equal drift: a line fitted to PPO's evaluations (gold = a + {slope:.3f} KL) "
                      f"leaves Elastic Reset's {n} evaluations {mean:+.3f} +- {sem:.3f} (mean +- s.e.) above it."]
    return "\n".join(lines) + "\n"


def frontier_residual(reference: list[list[dict]], other: list[list[dict]]) -> tuple[float, float, float, int] | None:
    """How far ``other``'s (KL, gold) evaluations lie above a least-squares line through ``reference``'s.

    Step-0 rows (the SFT policy, shared) are left out. Returns ``(mean residual, its standard error, slope of
    the line, number of points)``, or None with fewer than 3 points on either side.
    """
    ref = [(r["kl_to_reference"], r["gold"]) for rows in reference for r in rows if r["step"] > 0]
    pts = [(r["kl_to_reference"], r["gold"]) for rows in other for r in rows if r["step"] > 0]
    if len(ref) < 3 or len(pts) < 3:
        return None
    mean_x = sum(x for x, _ in ref) / len(ref)
    mean_y = sum(y for _, y in ref) / len(ref)
    var_x = sum((x - mean_x) ** 2 for x, _ in ref)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in ref) / var_x if var_x > 0 else 0.0
    residuals = [y - (mean_y + slope * (x - mean_x)) for x, y in pts]
    mean = sum(residuals) / len(residuals)
    sem = (sum((r - mean) ** 2 for r in residuals) / (len(residuals) - 1) / len(residuals)) ** 0.5
    return mean, sem, slope, len(residuals)


def plot(curves: dict[str, list[list[dict]]], path: str, objective: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_proxy = any("proxy" in rows[0] for runs in curves.values() for rows in runs)
    fig, axes = plt.subplots(1, 4 if with_proxy else 3, figsize=(16 if with_proxy else 12, 3.6))
    if with_proxy:  # the score the runs optimise (a learned proxy), next to gold
        plot_mean_and_seeds(axes[3], curves, "proxy")
        axes[3].set(xlabel="rollouts", ylabel="proxy reward model score", title="Proxy (what PPO optimises)")
        axes[3].legend(fontsize=8)
    plot_mean_and_seeds(axes[0], curves, "gold")
    plot_mean_and_seeds(axes[1], curves, "kl_to_reference")
    for i, runs in enumerate(curves.values()):
        for rows in runs:
            axes[2].plot([r["kl_to_reference"] for r in rows], [r["gold"] for r in rows], color=f"C{i}",
                         marker="o", markersize=2.5, linewidth=0.8, alpha=0.7)
        axes[2].plot([], [], color=f"C{i}", marker="o", label=list(curves)[i])
    axes[0].set(xlabel="rollouts", ylabel=f"gold {objective}", title="Gold reward (held-out prompts)")
    axes[1].set(xlabel="rollouts", ylabel="KL(policy || SFT) [nats / seq]", title="Drift")
    axes[2].set(xlabel="KL(policy || SFT) [nats / seq]", ylabel=f"gold {objective}", title="Reward vs drift")
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="a PPO config with one ElasticReset callback")
    add_study_arguments(parser, variants=VARIANTS, steps=120, eval_every=10, out="outputs/elastic_reset_vs_ppo")
    parser.add_argument("--objective", default="sentiment", choices=list(GOLD_OBJECTIVES), help="the 'gold' column")
    parser.add_argument("--decay", type=float, default=None, help="override the config's EMA decay")
    parser.add_argument("--reset-every", type=int, default=None, help="override the config's reset interval (rollouts)")
    parser.add_argument("--reward-model", default=None,
                        help="optimise this reward model export (e.g. a proxy) instead of the config's reward; "
                             "evaluations log its score as 'proxy'")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    proxy = None
    if args.reward_model and not args.merge:
        from rlhf_lightning.rewards import RewardModelSource

        proxy = RewardModelSource(args.reward_model, batch_size=256, name="proxy")

    def fit_one(variant: str, seed: int, curve: GoldCurve) -> None:
        fit_config(args.config, study_overrides(args, variant, seed), curve, edit_callbacks=edit_callbacks(args, variant),
                   on_module=(lambda module: setattr(module, "reward_fn", proxy)) if proxy is not None else None)

    eval_rows, train_rows = run_study(args, fit_one, weights={args.objective: 1.0},
                                      scorers={"proxy": proxy} if proxy is not None else None)
    variants = [v for v in args.variants if any(r["variant"] == v for r in eval_rows)]
    curves, seeds = group_runs(eval_rows, variants)

    write_study(args.out, eval_rows, train_rows, first=["variant", "seed", "step", "gold", "kl_to_reference"],
                summary=summarize(curves, seeds, args.objective), plot=lambda path: plot(curves, path, args.objective))
    return 0


if __name__ == "__main__":
    sys.exit(main())
