"""Does initialising PPO's critic from the reward model help? Gold score vs rollouts on the embedded world.

Runs ``--config`` (default ``configs/ppo.yaml``: PPO against the learned sentiment reward model) per seed
in up to four variants that differ only in the value function:

* ``value_head`` — the config as written: a zero-initialised value head on the policy's trunk;
* ``critic_policy`` — a separate critic, a copy of the SFT policy's trunk with a zero value head;
* ``critic_rm`` — a separate critic initialised from the reward model's trunk AND score head
  (``PPOModule(critic=<RM folder>)``, as OpenRLHF and "Secrets of RLHF I" do);
* ``critic_rm_warmup`` — the same, with ``critic_warmup_steps`` rollouts that train the critic only.

Everything else (reward, KL controller, prompts, sampling seeds) is identical. The policy is scored on
fixed held-out prompts every ``--eval-every`` rollouts; ``--out`` gets ``curves.csv`` (gold sentiment
and KL to the SFT policy per evaluation), ``train.csv`` (per-rollout training metrics, incl. the value
function's explained variance), ``curves.png`` and ``summary.md``.

    python scripts/ppo_critic_init.py --policy runs/quickstart/sft/hf/final \\
        --reward-model runs/quickstart/reward_model/hf/final --tokenizer runs/quickstart/world/tokenizer \\
        --prompts runs/quickstart/world/prompts_train.jsonl --eval-prompts runs/quickstart/world/prompts_eval.jsonl \\
        --seeds 0 1 --steps 30 --eval-every 5 --out docs/results/ppo_critic_init
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gold_curves import (  # noqa: E402
    GoldCurve, add_study_arguments, fit_config, group_runs, plot_mean_and_seeds, run_study, study_overrides, write_study,
)

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "ppo.yaml")
VARIANTS = ("value_head", "critic_policy", "critic_rm", "critic_rm_warmup")


def variant_overrides(args, variant: str) -> list[str]:
    out = [f"--model.init_args.reward.init_args.model={args.reward_model}"]
    if variant == "critic_policy":
        out.append(f"--model.init_args.critic={args.policy}")
    elif variant.startswith("critic_rm"):
        out.append(f"--model.init_args.critic={args.reward_model}")
    if variant == "critic_rm_warmup":
        out.append(f"--model.init_args.critic_warmup_steps={args.warmup}")
    return out


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def summarize(curves: dict[str, list[list[dict]]], train: dict[str, list[list[dict]]], seeds: list[int], args) -> str:
    lines = [
        f"PPO on the embedded world against the learned sentiment RM, {args.steps} rollouts, seeds {seeds}; "
        f"gold = gold sentiment of one sample per held-out prompt ({args.num_eval_prompts} prompts), "
        "KL = KL(policy || SFT) in nats per completion. Mean ± standard error over seeds.",
        "",
        "| variant | final gold | final KL | best gold | mean gold over evaluations | mean explained variance, first 5 rollouts |",
        "|---|---|---|---|---|---|",
    ]
    for variant, runs in curves.items():
        finals = [run[-1]["gold"] for run in runs]
        kls = [run[-1]["kl_to_reference"] for run in runs]
        best = [max(row["gold"] for row in run) for run in runs]
        area = [sum(row["gold"] for row in run) / len(run) for run in runs]
        ev = [sum(r.get("value/explained_variance", float("nan")) for r in t[:5]) / max(1, len(t[:5])) for t in train.get(variant, [])]
        cells = [_mean_se(x) for x in (finals, kls, best, area)] + ([_mean_se(ev)] if ev else [(float("nan"), float("nan"))])
        lines.append(f"| {variant} | " + " | ".join(f"{m:+.3f} ± {s:.3f}" for m, s in cells) + " |")
    lines.append("")
    lines.append("Per seed, final gold: " + "; ".join(
        f"{variant}: " + ", ".join(f"{run[-1]['gold']:+.3f}" for run in runs) for variant, runs in curves.items()))
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[list[dict]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    plot_mean_and_seeds(axes[0], curves, "gold")
    axes[0].set(xlabel="rollouts", ylabel="gold sentiment", title="gold vs rollouts")
    plot_mean_and_seeds(axes[1], curves, "kl_to_reference")
    axes[1].set(xlabel="rollouts", ylabel="KL to SFT (nats)", title="KL vs rollouts")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    add_study_arguments(parser, variants=VARIANTS, steps=30, eval_every=5, out="outputs/ppo_critic_init")
    parser.add_argument("--reward-model", default="outputs/reward_model/hf/final")
    parser.add_argument("--warmup", type=int, default=3, help="critic_warmup_steps of the warm-up variant")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    def fit_one(variant: str, seed: int, curve: GoldCurve) -> None:
        fit_config(args.config, study_overrides(args, variant, seed) + variant_overrides(args, variant), curve)

    eval_rows, train_rows = run_study(args, fit_one)
    variants = [v for v in args.variants if any(r["variant"] == v for r in eval_rows)]
    curves, seeds = group_runs(eval_rows, variants)
    train, _ = group_runs(train_rows, variants)
    write_study(args.out, eval_rows, train_rows, first=["variant", "seed", "step", "gold", "kl_to_reference"],
                summary=summarize(curves, train, seeds, args), plot=lambda path: plot(curves, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
