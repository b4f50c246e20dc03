"""Online RL from one SFT policy and one reward: PPO vs GRPO, Dr. GRPO, RLOO and REINFORCE++.

Every variant starts from the same SFT policy, optimises the same reward (``--reward-model``, a learned RM,
by default; ``--reward gold`` uses the gold sentiment scorer, ``--reward verifiable`` the rule
``states_rating``), with the same prompts, 32 episodes per rollout of at most ``--max-new-tokens`` tokens
and the same number of rollouts: the same generation budget. Each variant is its shipped config
(configs/ppo.yaml, grpo.yaml, rloo.yaml, reinforce_pp.yaml; Dr. GRPO is grpo.yaml with
``advantage: dr_grpo``), so the comparison is of the methods as a user would run them.

Each (variant, seed) runs in its own process (``os.wait4`` gives that process's peak resident memory), and
``--out`` gets:

* ``curves.csv`` — one row per evaluation on held-out prompts: variant, seed, step, gold sentiment (the
  target), every gold objective, KL(policy || SFT) in nats per completion, training wall seconds so far;
* ``train.csv`` — one row per rollout: the training metrics (reward, KL, KL coefficient, lengths, ...);
* ``memory.csv`` — per run: peak RSS of its process, trainable parameters, optimizer-state bytes;
* ``curves.png`` — gold vs rollouts, KL vs rollouts, gold vs training wall time, gold vs KL;
* ``summary.md`` — final gold and KL per variant (mean +- s.e. over seeds), wall time, memory.

    python scripts/online_rl_study.py --prepare /tmp/online_rl --out /tmp/online_rl/study   # builds SFT + RM
    python scripts/online_rl_study.py --policy outputs/sft/hf/final --reward-model outputs/reward_model/hf/final
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import lightning as L

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gold_curves import (  # noqa: E402
    GoldCurve, add_study_arguments, fit_config, group_runs, plot_mean_and_seeds, read_prompts, read_runs, study_overrides,
    write_csv, write_study,
)

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "ppo": ("ppo.yaml", []),
    "grpo": ("grpo.yaml", []),
    "dr_grpo": ("grpo.yaml", ["--model.init_args.advantage=dr_grpo"]),
    "rloo": ("rloo.yaml", []),
    "reinforce_pp": ("reinforce_pp.yaml", []),
    # The loss variants of configs/grpo.yaml's header (not in the default list).
    "dapo": ("grpo.yaml", ["--model.init_args.clip_range_high=0.28", "--model.init_args.loss_aggregation=token_mean",
                           "--model.init_args.dynamic_sampling=true", "--model.init_args.kl_coef=0.0"]),
    "gspo": ("grpo.yaml", ["--model.init_args.ratio_level=sequence", "--model.init_args.clip_range_low=3.0e-4",
                           "--model.init_args.clip_range_high=4.0e-4"]),
    # Memory probe only (not in the default list): PPO with a separate critic, the usual large-model setup.
    "ppo_separate_critic": ("ppo.yaml", []),
}
DEFAULT_VARIANTS = ["ppo", "grpo", "dr_grpo", "rloo", "reinforce_pp"]


def prepare(root: str) -> tuple[str, str, str]:
    """A small world, SFT policy and sentiment RM under ``root`` (the test suite's quick settings); reused
    when already there. Returns ``(world_dir, sft_dir, rm_dir)``."""
    from rlhf_lightning.pipeline import fit_stage
    from rlhf_lightning.synthetic import write_world

    world = os.path.join(root, "world")
    if not os.path.exists(os.path.join(world, "prompts_eval.jsonl")):
        write_world(world, seed=0, n_demonstrations=3000, n_val_demonstrations=200, n_pairs=2000, n_val_pairs=300,
                    n_prompts=300, n_eval_prompts=100, label_noise=0.1)
    small = ["--model.init_args.model.hidden_size=64", "--model.init_args.model.intermediate_size=192",
             "--model.init_args.model.num_hidden_layers=2", "--model.init_args.model.num_attention_heads=4",
             "--model.init_args.model.num_key_value_heads=4"]
    sft = os.path.join(root, "sft", "hf", "final")
    if not os.path.exists(os.path.join(sft, "config.json")):
        sft = str(fit_stage("sft.yaml", os.path.join(root, "sft"), [
            f"--model.init_args.tokenizer={world}/tokenizer", *small,
            f"--data.init_args.train_file={world}/sft_train.jsonl", f"--data.init_args.val_file={world}/sft_val.jsonl",
            "--trainer.max_steps=400", "--trainer.val_check_interval=200", "--trainer.limit_val_batches=4",
            "--model.init_args.optim.lr=5e-3"], quiet=True))
    rm = os.path.join(root, "rm", "hf", "final")
    if not os.path.exists(os.path.join(rm, "config.json")):
        rm = str(fit_stage("reward_model.yaml", os.path.join(root, "rm"), [
            f"--model.init_args.model={sft}", f"--model.init_args.tokenizer={world}/tokenizer",
            "--model.init_args.optim.lr=5e-4", f"--data.init_args.train_file={world}/pairs_sentiment_train.jsonl",
            f"--data.init_args.val_file={world}/pairs_sentiment_val.jsonl", "--trainer.max_steps=150"], quiet=True))
    return world, sft, rm


def reward_overrides(args, variant: str) -> list[str]:
    if args.reward == "rm":
        return [f"--model.init_args.reward.init_args.model={args.reward_model}"]
    source = {"gold": "rlhf_lightning.rewards.GoldRewardSource", "verifiable": "rlhf_lightning.rewards.VerifiableRewardSource"}
    init = {"gold": {"objective": "sentiment"}, "verifiable": {"task": "states_rating"}}
    return [f"--model.init_args.reward={json.dumps({'class_path': source[args.reward], 'init_args': init[args.reward]})}",
            "--model.init_args.reward_transform=null"]


def _proc_status_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process in MiB, from /proc (Linux)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class MemoryProbe(L.Callback):
    """Resident memory when training starts (models, optimizer built) and the process peak when it ends:
    their difference is what the rollouts and updates themselves add."""

    def __init__(self) -> None:
        self.start_mb = self.peak_mb = float("nan")

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_mb = _proc_status_mb("VmRSS")

    def on_train_end(self, trainer, pl_module) -> None:
        self.peak_mb = _proc_status_mb("VmHWM")


def run_one(args, variant: str, seed: int, out: str) -> None:
    """Train one (variant, seed) in this process; write its curves.csv, train.csv and memory.json to ``out``."""
    config, extra = VARIANTS[variant]
    if variant == "ppo_separate_critic":  # a critic initialised from the SFT policy (trunk + fresh value head)
        extra = [*extra, f"--model.init_args.critic={args.policy}"]
    curve = GoldCurve(read_prompts(args.eval_prompts, args.num_eval_prompts), args.eval_every,
                      max_new_tokens=args.max_new_tokens or 48)
    args.out = out  # study_overrides puts the run's folder under --out
    overrides = [*study_overrides(args, variant, seed), *reward_overrides(args, variant), *extra]
    probe = MemoryProbe()
    module = fit_config(os.path.join(CONFIGS, config), overrides, curve, edit_callbacks=lambda cbs: [*cbs, probe])
    optimizer = module.trainer.optimizers[0]
    state_bytes = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                      if hasattr(v, "numel"))
    memory = {
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "optimizer_state_mb": round(state_bytes / 2**20, 3),
        "rss_at_train_start_mb": round(probe.start_mb, 1),
        "training_peak_over_start_mb": round(probe.peak_mb - probe.start_mb, 1),
    }
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "curves.csv"), [{"variant": variant, "seed": seed, **r} for r in curve.rows])
    write_csv(os.path.join(out, "train.csv"), [{"variant": variant, "seed": seed, **r} for r in curve.train_rows])
    with open(os.path.join(out, "memory.json"), "w") as handle:
        json.dump(memory, handle)


def spawn(args, variant: str, seed: int) -> dict:
    """Run one (variant, seed) in a child process; its peak RSS comes from ``os.wait4``."""
    out = os.path.join(args.out, "runs", f"{variant}_seed{seed}")
    command = [sys.executable, os.path.abspath(__file__), "--single", variant, str(seed), "--out", out,
               *args.passthrough]
    started = time.perf_counter()
    print(f"[{variant} seed {seed}] {args.steps} rollouts", flush=True)
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"run {variant} seed {seed} failed (status {status}); see its output above")
    seconds = time.perf_counter() - started
    print(f"[{variant} seed {seed}] done in {seconds:.0f} s", flush=True)
    with open(os.path.join(out, "memory.json")) as handle:
        memory = json.load(handle)
    return {"variant": variant, "seed": seed, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), **memory,
            "process_s": round(seconds, 1)}


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    se = (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5 if n > 1 else float("nan")
    return mean, se


def summarize(curves: dict[str, list[list[dict]]], memory_rows: list[dict], seeds: list[int]) -> str:
    lines = [
        "| variant | final gold sentiment | final KL | best gold | train wall s | s / rollout | peak RSS MB | peak over train start MB | trainable params | optimizer state MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, runs in curves.items():
        if not runs:
            continue
        gold = mean_se([rows[-1]["gold"] for rows in runs])
        kl = mean_se([rows[-1]["kl_to_reference"] for rows in runs])
        best = mean_se([max(r["gold"] for r in rows) for rows in runs])
        wall = mean_se([rows[-1]["train_time_s"] for rows in runs])
        steps = runs[0][-1]["step"]
        mem = [m for m in memory_rows if m["variant"] == variant]
        rss = mean_se([m["peak_rss_mb"] for m in mem]) if mem else (float("nan"), float("nan"))
        growth = mean_se([m["training_peak_over_start_mb"] for m in mem]) if mem else (float("nan"), float("nan"))
        params = mem[0]["trainable_params"] if mem else ""
        state = mem[0]["optimizer_state_mb"] if mem else ""
        lines.append(
            f"| {variant} | {gold[0]:+.3f} +- {gold[1]:.3f} | {kl[0]:.2f} +- {kl[1]:.2f} | {best[0]:+.3f} | "
            f"{wall[0]:.0f} | {wall[0] / max(steps, 1):.2f} | {rss[0]:.0f} | {growth[0]:.0f} | {params} | {state} |"
        )
    sft = next(iter(r for runs in curves.values() for rows in runs for r in rows if r["step"] == 0), None)
    if sft is not None:
        lines += ["", f"SFT policy (step 0): gold sentiment {sft['gold']:+.3f}. Mean +- standard error over seeds {seeds}."]
    extra = [m for m in memory_rows if m["variant"] not in curves]
    for m in extra:
        lines.append(f"Memory probe {m['variant']} (seed {m['seed']}): peak RSS {m['peak_rss_mb']:.0f} MB "
                     f"({m['training_peak_over_start_mb']:.0f} MB over train start), {m['trainable_params']} trainable "
                     f"params, optimizer state {m['optimizer_state_mb']} MB.")
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[list[dict]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    plot_mean_and_seeds(axes[0], curves, "gold")
    plot_mean_and_seeds(axes[1], curves, "kl_to_reference")
    plot_mean_and_seeds(axes[2], curves, "gold", x="train_time_s")
    for i, runs in enumerate(curves.values()):
        for rows in runs:
            axes[3].plot([r["kl_to_reference"] for r in rows], [r["gold"] for r in rows], color=f"C{i}",
                         marker="o", markersize=2.5, linewidth=0.8, alpha=0.7)
        axes[3].plot([], [], color=f"C{i}", marker="o", label=list(curves)[i])
    axes[0].set(xlabel="rollouts (32 episodes each)", ylabel="gold sentiment", title="Gold (held-out prompts)")
    axes[1].set(xlabel="rollouts", ylabel="KL(policy || SFT) [nats / seq]", title="Drift")
    axes[2].set(xlabel="training wall time [s]", ylabel="gold sentiment", title="Gold vs wall time")
    axes[3].set(xlabel="KL(policy || SFT) [nats / seq]", ylabel="gold sentiment", title="Gold vs drift")
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(parser, variants=list(VARIANTS), steps=30, eval_every=10, out="outputs/online_rl")
    parser.set_defaults(variants=DEFAULT_VARIANTS, num_eval_prompts=100)
    parser.add_argument("--reward-model", default="outputs/reward_model/hf/final")
    parser.add_argument("--reward", choices=["rm", "gold", "verifiable"], default="rm")
    parser.add_argument("--prepare", default=None, metavar="DIR",
                        help="build (or reuse) a small world, SFT policy and RM in DIR and use them")
    parser.add_argument("--single", nargs=2, default=None, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:
        world, args.policy, args.reward_model = prepare(args.prepare)
        args.tokenizer = os.path.join(world, "tokenizer")
        args.prompts = os.path.join(world, "prompts_train.jsonl")
        args.eval_prompts = os.path.join(world, "prompts_eval.jsonl")
    # What a child process needs to rebuild the same run (everything but --variants / --seeds / --out / --merge).
    args.passthrough = [
        f"--policy={args.policy}", f"--tokenizer={args.tokenizer}", f"--prompts={args.prompts}",
        f"--eval-prompts={args.eval_prompts}", f"--num-eval-prompts={args.num_eval_prompts}", f"--steps={args.steps}",
        f"--eval-every={args.eval_every}", f"--reward-model={args.reward_model}", f"--reward={args.reward}",
        *([f"--batch-size={args.batch_size}"] if args.batch_size else []),
        *([f"--max-new-tokens={args.max_new_tokens}"] if args.max_new_tokens else []),
        *(["--override", *args.override] if args.override else []),
    ]
    if args.single:
        run_one(args, args.single[0], int(args.single[1]), args.out)
        return 0

    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        folders = args.merge
        memory_rows = read_runs(folders, "memory.csv")
    else:
        memory_rows = [spawn(args, variant, seed) for seed in args.seeds for variant in args.variants]
        folders = [os.path.join(args.out, "runs", f"{m['variant']}_seed{m['seed']}") for m in memory_rows]
    eval_rows = read_runs(folders, "curves.csv") if not args.merge else read_runs(folders, "curves.csv")
    train_rows = read_runs(folders, "train.csv")
    write_csv(os.path.join(args.out, "memory.csv"), memory_rows, first=["variant", "seed"])
    variants = [v for v in args.variants if any(r["variant"] == v for r in eval_rows)]
    curves, seeds = group_runs(eval_rows, variants)
    write_study(args.out, eval_rows, train_rows, first=["variant", "seed", "step", "gold", "kl_to_reference"],
                summary=summarize(curves, memory_rows, seeds), plot=lambda path: plot(curves, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
