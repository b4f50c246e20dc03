"""MODPO's front against MORLHF's (PPO on a weighted sum of the objectives' reward models), with the compute of each.

    python scripts/morlhf_vs_modpo.py --run-dir runs/front --quick --weights 0.9 0.5 0.1
    python scripts/morlhf_vs_modpo.py --run-dir runs/front --world-dir W --sft-dir S --weights 0.9 0.7 0.5 0.3 0.1

1. The MODPO sweep of ``scripts/pareto_sweep.py`` (same arguments; its stages are reused when their exports
   exist): the consistency margin reward model and one MODPO policy per weighting ``[w, 1 - w]``.
2. A sentiment reward model (``configs/reward_model.yaml``, ``--rm-steps``) on the same world's sentiment pairs.
3. MORLHF (Zhou et al. 2023's baseline): for each ``w``, PPO (``configs/ppo.yaml``, its adaptive KL controller)
   on ``w * r_sentiment + (1 - w) * r_consistency`` (:class:`~rlhf_lightning.rewards.EnsembleRewardSource`
   with weights over the two reward models; the consistency one is MODPO's margin model), ``--ppo-steps``
   rollouts, exported to ``<run-dir>/morlhf_sentiment<w>`` (with ``_lr<lr>`` / ``_steps<n>`` appended when
   ``--ppo-lr`` / ``--ppo-steps`` are given, as are the results files' names).

Every policy is evaluated as the sweep evaluates (same prompts, same sampling seed). Writes
``<run-dir>/morlhf_vs_modpo.csv`` (one row per policy: gold scores, KL to SFT, training wall seconds,
examples seen) and ``morlhf_vs_modpo.png`` (both fronts in gold sentiment x gold consistency).
Compute is training wall time on this machine (``train_s``; the reward models' time in ``reward_models_s``:
MODPO needs the margin model, MORLHF both), the same as CPU seconds of the training process, all threads
(``train_cpu_s`` / ``reward_models_cpu_s``: unlike wall time, not inflated by other processes' load; MORLHF's
exclude its periodic gold evaluations, as its wall time does) and the examples each method consumed (``examples``: MODPO's
preference pairs, MORLHF's sampled episodes).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pareto_sweep  # noqa: E402
from gold_curves import GoldCurve, fit_config, read_prompts, write_csv  # noqa: E402

from rlhf_lightning.pipeline import evaluate_run, materialize_config, stage_export_dir  # noqa: E402
from rlhf_lightning.rewards import EnsembleRewardSource, RewardModelSource  # noqa: E402

OBJECTIVE, MARGIN = pareto_sweep.OBJECTIVE, pareto_sweep.MARGIN


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ppo-steps", type=int, default=None, help="MORLHF rollouts per weighting (default 60, --quick 40)")
    parser.add_argument("--ppo-lr", type=float, default=None, help="MORLHF learning rate (default: configs/ppo.yaml's)")
    own, rest = parser.parse_known_args(argv)
    args = pareto_sweep.parse_args(rest)
    for key, value in vars(own).items():
        setattr(args, key, value)
    args.ppo_steps_given = args.ppo_steps is not None
    args.ppo_steps = args.ppo_steps or (40 if args.quick else 60)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    world, sft = pareto_sweep.prepare_base(args, run_dir)
    modpo_rows = pareto_sweep.run_sweep(args)  # its stages are reused when their exports exist

    def seconds(stage: Path, name: str = "train_time_s.txt") -> float:
        path = stage / name
        return float(path.read_text()) if path.exists() else float("nan")

    margin_stage = run_dir / "modpo_margin_rm"
    modpo_pairs = (args.steps or 160) * (args.batch_size or 32)  # configs/modpo.yaml: 160 steps of 32 pairs
    for row in modpo_rows:
        if row[f"w_{OBJECTIVE}"] != "":
            stage = run_dir / pareto_sweep.stage_name(float(row[f"w_{OBJECTIVE}"]))
            row.update(method="MODPO", examples=modpo_pairs, reward_models_s=seconds(margin_stage),
                       train_cpu_s=seconds(stage, "train_cpu_s.txt"),
                       reward_models_cpu_s=seconds(margin_stage, "train_cpu_s.txt"))
        else:
            row.update(method="SFT", examples=0, reward_models_s=0.0, train_cpu_s=0.0, reward_models_cpu_s=0.0)

    # ---- the sentiment reward model ----------------------------------------------------------------------
    rm_overrides = [f"--seed_everything={args.seed}", f"--model.init_args.tokenizer={world}/tokenizer",
                    *pareto_sweep.data_overrides(world, OBJECTIVE)]
    if args.rm_steps:
        rm_overrides += [f"--trainer.max_steps={args.rm_steps}", f"--trainer.val_check_interval={args.rm_steps}"]
    sentiment_rm, sentiment_rm_s = pareto_sweep.timed_fit_stage(materialize_config("reward_model.yaml", run_dir),
                                                   run_dir / "reward_model_sentiment", rm_overrides)
    margin_rm = stage_export_dir(margin_stage)
    members = [RewardModelSource(str(sentiment_rm), batch_size=64, name=OBJECTIVE),
               RewardModelSource(str(margin_rm), batch_size=64, name=MARGIN)]

    # ---- MORLHF: PPO on w * r_sentiment + (1 - w) * r_consistency ---------------------------------------------
    config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "ppo.yaml")
    eval_prompts = read_prompts(str(world / "prompts_eval.jsonl"), args.eval_prompts)
    rows = list(modpo_rows)
    # runs at another learning rate or length get their own folders and results files
    suffix = (f"_lr{args.ppo_lr:g}" if args.ppo_lr else "") + (f"_steps{args.ppo_steps}" if args.ppo_steps_given else "")
    for weight in args.weights:
        stage = run_dir / f"morlhf_{OBJECTIVE}{weight:.2f}{suffix}"
        export = stage / "hf" / "final"
        if not (export / "config.json").exists():
            reward = EnsembleRewardSource(members, weights=[weight, 1.0 - weight], name="morlhf")
            curve = GoldCurve(eval_prompts, max(1, args.ppo_steps // 4), weights={OBJECTIVE: weight, MARGIN: 1.0 - weight},
                              max_new_tokens=args.max_new_tokens)
            overrides = [
                f"--seed_everything={args.seed}", f"--model.init_args.seed={args.seed}", f"--trainer.max_steps={args.ppo_steps}",
                "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
                f"--trainer.default_root_dir={stage}", f"--model.init_args.policy={sft}",
                f"--model.init_args.tokenizer={world}/tokenizer", "--model.init_args.log_samples_every_n_steps=0",
                f"--model.init_args.reward.init_args.model={sentiment_rm}",  # replaced by the weighted sum below
                f"--data.init_args.train_file={world}/prompts_train.jsonl", "--data.init_args.val_file=null",
                f"--model.init_args.sampling.max_new_tokens={args.max_new_tokens}",
                *([f"--model.init_args.optim.lr={args.ppo_lr}"] if args.ppo_lr else []),
            ]
            print(f"[morlhf] w_{OBJECTIVE}={weight:.2f}: PPO, {args.ppo_steps} rollouts", flush=True)
            module = fit_config(config, overrides, curve, on_module=lambda m: setattr(m, "reward_fn", reward))
            export.mkdir(parents=True, exist_ok=True)
            module.policy.save_pretrained(export)
            module.tokenizer.save_pretrained(export)
            (stage / "train_time_s.txt").write_text(f"{curve.rows[-1]['train_time_s']}\n")
            (stage / "train_cpu_s.txt").write_text(f"{curve.rows[-1]['train_cpu_s']}\n")
            write_csv(str(stage / "curves.csv"), curve.rows)
        result = evaluate_run(export, sft, world / "prompts_eval.jsonl", num_prompts=args.eval_prompts,
                              max_new_tokens=args.max_new_tokens, seed=args.seed)
        row = {"policy": f"MORLHF w={weight:.2f}", f"w_{OBJECTIVE}": weight, f"w_{MARGIN}": round(1.0 - weight, 6)}
        row.update({key: float(value) for key, value in result.metrics.items()
                    if key.startswith("gold/") or key in ("kl_to_reference", "response_length")})
        batch = 16 * 2  # configs/ppo.yaml: 16 prompts x 2 samples per rollout
        row.update(method="MORLHF", train_s=seconds(stage), examples=args.ppo_steps * batch,
                   reward_models_s=sentiment_rm_s + seconds(margin_stage), train_cpu_s=seconds(stage, "train_cpu_s.txt"),
                   reward_models_cpu_s=seconds(run_dir / "reward_model_sentiment", "train_cpu_s.txt")
                   + seconds(margin_stage, "train_cpu_s.txt"))
        rows.append(row)
        print(f"[morlhf] {row['policy']}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    write_results(rows, run_dir, suffix)
    return 0


def write_results(rows: list[dict], run_dir: Path, suffix: str = "") -> None:
    """``morlhf_vs_modpo.csv`` and ``morlhf_vs_modpo.png`` (both fronts, SFT, training seconds beside each point)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(run_dir / f"morlhf_vs_modpo{suffix}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = f"gold/{OBJECTIVE}", f"gold/{MARGIN}"
    figure, axis = plt.subplots(figsize=(5.5, 4.5))
    for method, style in (("MODPO", "-o"), ("MORLHF", "-s")):
        front = sorted((r for r in rows if r["method"] == method), key=lambda r: r[f"w_{OBJECTIVE}"])
        if not front:
            continue
        axis.plot([r[x] for r in front], [r[y] for r in front], style, label=f"{method} (train s: "
                  + ", ".join(f"{r['train_s']:.0f}" for r in front) + "; CPU s: "
                  + ", ".join(f"{r.get('train_cpu_s', float('nan')):.0f}" for r in front) + ")")
        for r in front:
            axis.annotate(f"{r[f'w_{OBJECTIVE}']:.1f}", (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for r in rows:
        if r["method"] == "SFT":
            axis.scatter(r[x], r[y], marker="s", color="gray", label="SFT", zorder=3)
    axis.set_xlabel(f"gold {OBJECTIVE}")
    axis.set_ylabel(f"gold {MARGIN}")
    axis.set_title(f"MODPO vs MORLHF (labels: w_{OBJECTIVE})", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(run_dir / f"morlhf_vs_modpo{suffix}.png", dpi=110)
    plt.close(figure)
    print(f"[morlhf] wrote {run_dir}/morlhf_vs_modpo{suffix}.csv and .png", flush=True)


if __name__ == "__main__":
    sys.exit(main())
