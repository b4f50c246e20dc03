"""The main job: the whole embedded pipeline in one command.

    rlhf-lightning pipeline --run-dir runs/quickstart [--quick] [--stages sft reward_model dpo ...]

Stages run the YAML configs in ``configs/`` through the same LightningCLI a user calls, with paths
rewritten into the run directory, so what the pipeline does is exactly what ``rlhf-lightning fit
--config configs/<stage>.yaml`` does. A stage whose HF export already exists is reused, so an
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


def main(argv: list[str] | None = None) -> int:  # filled in below once stages are registered
    from rlhf_lightning._pipeline_main import run_pipeline

    parser = argparse.ArgumentParser(prog="rlhf-lightning pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/quickstart", help="everything the pipeline writes goes here")
    parser.add_argument("--quick", action="store_true", help="shortened settings (CI / smoke): minutes, weaker numbers")
    parser.add_argument("--stages", nargs="*", default=None, help="run only these stages (and reuse the rest)")
    parser.add_argument("--force", nargs="*", default=[], help="rerun these stages even if their export exists")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-prompts", type=int, default=100, help="held-out prompts per evaluation")
    args = parser.parse_args(argv)
    return run_pipeline(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
