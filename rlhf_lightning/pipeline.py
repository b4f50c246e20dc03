"""The main job: the whole embedded pipeline in one command.

    rlhf-lightning pipeline --run-dir runs/quickstart [--quick] [--stages sft reward_model dpo ...]

Stages run the YAML configs in ``configs/`` through the same LightningCLI a user calls. The configs
write under ``outputs/``; the pipeline copies each one into ``<run-dir>/configs/`` with ``outputs/``
replaced by ``<run-dir>/`` — with the default ``--run-dir outputs`` it runs them verbatim, so what the
pipeline does is exactly what ``rlhf-lightning fit --config configs/<stage>.yaml`` does. A stage whose HF export already exists is reused, so an
interrupted pipeline resumes where it stopped (``--force STAGE`` reruns one).

Layout of ``<run-dir>``::

    world/                      embedded world (JSONL + tokenizer)
    sft/hf/final                SFT policy (HF directory)            <- every method starts here
    reward_model/hf/final       sentiment reward model (sequence classifier)
    dpo/ ppo/ modpo_*/ fine_grained/   one folder per method run, each with hf/final and logs
    results.csv, results.md, frontier.png
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

__all__ = ["Stage", "fit_stage", "stage_export_dir", "evaluate_run", "main", "CONFIG_DIR"]


def stage_export_dir(stage_dir: str | os.PathLike) -> Path:
    return Path(stage_dir) / "hf" / "final"


def fit_stage(
    config: str | os.PathLike,
    stage_dir: str | os.PathLike,
    overrides: list[str] | None = None,
    *,
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """Run ``rlhf-lightning fit --config <config> --run_dir <stage_dir> <overrides>`` unless its export exists.

    Returns the HF export directory (``<stage_dir>/hf/final``).
    """
    from rlhf_lightning.cli import cli_main

    export = stage_export_dir(stage_dir)
    if (export / "config.json").exists() and not force:
        return export
    config_path = Path(config)
    if not config_path.is_absolute() and not config_path.exists():
        config_path = CONFIG_DIR / config_path
    args = ["fit", "--config", str(config_path), f"--run_dir={stage_dir}", *(overrides or [])]
    if quiet:
        args += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    cli_main(args)
    if not (export / "config.json").exists():
        raise RuntimeError(f"Stage with config {config_path} finished without writing {export}")
    return export


@dataclass
class Stage:
    """One pipeline stage: a config plus the overrides that point it at this run's files."""

    name: str
    config: str
    overrides: Callable[["RunPaths", bool], list[str]]
    depends_on: tuple[str, ...] = ()
    evaluate: bool = True


@dataclass
class RunPaths:
    root: Path

    @property
    def world(self) -> Path:
        return self.root / "world"

    def stage(self, name: str) -> Path:
        return self.root / name

    def export(self, name: str) -> Path:
        return stage_export_dir(self.stage(name))


@dataclass
class StageResult:
    method: str
    metrics: dict[str, float] = field(default_factory=dict)
    wall_time_s: float = 0.0


def evaluate_run(policy_dir, reference_dir, prompts_file, *, num_prompts=100, max_new_tokens=48, seed=0, objectives=None):
    """Gold score per objective and Monte-Carlo KL(policy || reference) on held-out prompts."""
    from rlhf_lightning.evaluation import evaluate_policy
    from rlhf_lightning.models import load_causal_lm, load_tokenizer
    from rlhf_lightning.synthetic import GOLD_OBJECTIVES

    tokenizer = load_tokenizer(policy_dir, padding_side="left")
    policy = load_causal_lm(str(policy_dir))
    reference = load_causal_lm(str(reference_dir)) if reference_dir is not None else None
    with open(prompts_file) as handle:
        prompts = [json.loads(line)["prompt"] for line in handle if line.strip()][:num_prompts]
    result = evaluate_policy(
        policy,
        tokenizer,
        prompts,
        scorers=list(objectives or GOLD_OBJECTIVES),
        reference=reference,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=50,
    )
    return result



def materialize_config(config: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """Copy ``configs/<config>`` into ``<run_dir>/configs/`` with every ``outputs/`` path moved to ``run_dir``."""
    from omegaconf import OmegaConf

    source = Path(config) if Path(config).exists() else CONFIG_DIR / config
    run_dir = Path(run_dir)
    text = source.read_text()
    if run_dir.resolve() != Path("outputs").resolve():
        text = text.replace("outputs/", f"{run_dir.as_posix().rstrip('/')}/")
    OmegaConf.create(text)  # fail here, naming the file, rather than deep inside the CLI
    target = run_dir / "configs" / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target


@dataclass
class PipelineStage:
    """A fit stage: its config, the folder it writes (``<run>/<name>``) and shortened (--quick) overrides."""

    name: str
    config: str
    quick_overrides: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    method: str | None = None  # label in the results table; None for support stages (SFT, RM)


QUICK_POLICY = [
    "--model.init_args.model.hidden_size=64",
    "--model.init_args.model.intermediate_size=192",
    "--model.init_args.model.num_hidden_layers=2",
]

STAGES: list[PipelineStage] = [
    PipelineStage("sft", "sft.yaml", QUICK_POLICY + ["--trainer.max_steps=300", "--trainer.val_check_interval=150"]),
    PipelineStage("reward_model", "reward_model.yaml", ["--trainer.max_steps=100"]),
    PipelineStage("dpo", "dpo.yaml", ["--trainer.max_steps=60", "--trainer.val_check_interval=30"], method="DPO"),
    PipelineStage("ppo", "ppo.yaml", ["--trainer.max_steps=10"], method="PPO"),
    PipelineStage("fine_grained", "fine_grained.yaml", ["--trainer.max_steps=10"], method="Fine-Grained RLHF"),
]


def _stage_by_name(name: str) -> PipelineStage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"Unknown stage {name!r}; stages: {[s.name for s in STAGES]}")


def _fmt(value: float) -> str:
    return f"{value:+.3f}" if isinstance(value, float) else str(value)


def write_report(rows: list[dict], run_dir: Path, objectives: tuple[str, ...]) -> str:
    """results.csv, results.md and frontier.png (gold score vs KL to SFT, one point per method)."""
    columns = ["method", *[f"gold/{name}" for name in objectives], "kl_to_sft", "response_length", "train_time_s"]
    with open(run_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    header = "| " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "")
            cells.append(f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (run_dir / "results.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(objectives), figsize=(4.2 * len(objectives), 3.6), squeeze=False)
    for axis, objective in zip(axes[0], objectives):
        for row in rows:
            axis.scatter(row["kl_to_sft"], row[f"gold/{objective}"], s=40)
            axis.annotate(row["method"], (row["kl_to_sft"], row[f"gold/{objective}"]), fontsize=8,
                          xytext=(4, 4), textcoords="offset points")
        axis.set_xlabel("KL(policy || SFT) [nats / sequence]")
        axis.set_ylabel(f"gold {objective}")
        axis.grid(alpha=0.3)
    figure.suptitle("Reward vs drift on the embedded world")
    figure.tight_layout()
    figure.savefig(run_dir / "frontier.png", dpi=120)
    plt.close(figure)
    return table


def run_pipeline(args: argparse.Namespace) -> int:
    from rlhf_lightning.synthetic import GOLD_OBJECTIVES, write_world

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    selected = args.stages or [stage.name for stage in STAGES]
    timings: dict[str, float] = {}
    print(f"[pipeline] run directory: {run_dir.resolve()}", flush=True)

    started = time.perf_counter()
    world_sizes = dict(n_demonstrations=3000, n_pairs=1500, n_prompts=300, n_eval_prompts=100) if args.quick else {}
    write_world(run_dir / "world", seed=args.seed, **world_sizes)
    timings["world"] = time.perf_counter() - started
    print(f"[pipeline] world ready ({timings['world']:.1f} s)", flush=True)

    for name in selected:
        stage = _stage_by_name(name)
        config = materialize_config(stage.config, run_dir)
        overrides = [f"--seed_everything={args.seed}", *stage.overrides, *(stage.quick_overrides if args.quick else [])]
        export = stage_export_dir(run_dir / stage.name)
        reused = (export / "config.json").exists() and name not in args.force
        print(f"[pipeline] stage {name}: {'reusing ' + str(export) if reused else 'training with ' + str(config)}", flush=True)
        started = time.perf_counter()
        fit_stage(config, run_dir / stage.name, overrides, force=name in args.force)
        timings[name] = time.perf_counter() - started
        timing_file = run_dir / stage.name / "train_time_s.txt"
        if not reused:
            timing_file.write_text(f"{timings[name]:.1f}\n")
        elif timing_file.exists():
            timings[name] = float(timing_file.read_text())

    # ---- evaluate every policy against the SFT policy on held-out prompts -------------------------
    sft_dir = stage_export_dir(run_dir / "sft")
    rows = []
    policies = [("SFT", sft_dir, "sft")] + [
        (stage.method, stage_export_dir(run_dir / stage.name), stage.name)
        for stage in STAGES
        if stage.method is not None and (stage_export_dir(run_dir / stage.name) / "config.json").exists()
    ]
    for label, policy_dir, stage_name in policies:
        print(f"[pipeline] evaluating {label} on {args.eval_prompts} held-out prompts", flush=True)
        result = evaluate_run(policy_dir, sft_dir, run_dir / "world" / "prompts_eval.jsonl",
                              num_prompts=args.eval_prompts, seed=args.seed)
        row = {"method": label, "kl_to_sft": float(result.metrics["kl_to_reference"]),
               "response_length": float(result.metrics["response_length"]),
               "train_time_s": round(timings.get(stage_name, 0.0), 1)}
        for objective in GOLD_OBJECTIVES:
            row[f"gold/{objective}"] = float(result.metrics[f"gold/{objective}"])
        rows.append(row)
        with open(run_dir / stage_name / "samples.jsonl", "w") as handle:
            for sample in result.samples[:20]:
                handle.write(json.dumps(sample) + "\n")
    table = write_report(rows, run_dir, tuple(GOLD_OBJECTIVES))
    print("\n" + table + "\n", flush=True)
    print(f"[pipeline] wrote {run_dir / 'results.csv'}, {run_dir / 'results.md'}, {run_dir / 'frontier.png'}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-lightning pipeline", description="The embedded pipeline, end to end.")
    parser.add_argument("--run-dir", default="outputs", help="everything the pipeline writes goes here (default: outputs, "
                        "the paths the configs use)")
    parser.add_argument("--quick", action="store_true", help="shortened settings (CI / smoke): minutes, weaker numbers")
    parser.add_argument("--stages", nargs="*", default=None, help="run only these stages (earlier outputs are reused)")
    parser.add_argument("--force", nargs="*", default=[], help="rerun these stages even if their export exists")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-prompts", type=int, default=100, help="held-out prompts per evaluation")
    args = parser.parse_args(argv)
    return run_pipeline(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
