"""The main job: the whole embedded pipeline in one command.

    rlhf-lightning pipeline --run-dir runs/quickstart [--quick] [--stages sft reward_model dpo ...]

Stages run the YAML configs in ``configs/`` through the same LightningCLI a user calls. The configs
write under ``outputs/``; the pipeline copies each one into ``<run-dir>/configs/`` with ``outputs/``
replaced by ``<run-dir>/`` — with the default ``--run-dir outputs`` it runs them verbatim, so what the
pipeline does is exactly what ``rlhf-lightning fit --config configs/<stage>.yaml`` does. A stage whose
HF export already exists is reused, so an interrupted pipeline resumes where it stopped, and so is an
evaluation whose policy, reference and settings are unchanged (``--force STAGE`` reruns one stage; it
does not rerun the stages that depend on it).

Stages, in order (``STAGES``)::

    sft              configs/sft.yaml              SFT policy                 <- every method starts here
    reward_model     configs/reward_model.yaml     sentiment RM               (PPO's reward)
    dpo              configs/dpo.yaml              DPO on sentiment pairs
    modpo_margin_rm  configs/modpo_margin_rm.yaml  consistency RM             (MODPO's margin, stage 1)
    modpo            configs/modpo.yaml            MODPO, sentiment + consistency margin (stage 2)
    ppo              configs/ppo.yaml              PPO against the sentiment RM
    rloo             configs/rloo.yaml             RLOO (critic-free) against the sentiment RM
    fine_grained     configs/fine_grained.yaml     Fine-Grained RLHF, sentence-level sentiment + fluency

Every method is then sampled on the held-out prompts and scored by every gold objective; its row names
the objective(s) it optimises (``PipelineStage.targets``) and the change of their gold score over the
SFT policy, so "did each method improve what it optimises" is read off one column.

Layout of ``<run-dir>``::

    world/                            embedded world (JSONL + tokenizer)
    configs/                          the configs as run (paths moved to <run-dir>)
    <stage>/hf/final                  each stage's HF export; <stage>/logs its CSV metrics
    <stage>/train_time_s.txt          training wall time of the stage
    <stage>/eval.json, samples.jsonl  cached evaluation and 20 samples (methods and SFT)
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

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

__all__ = [
    "CONFIG_DIR",
    "PipelineStage",
    "QUICK_WORLD",
    "STAGES",
    "StageRun",
    "evaluate_methods",
    "evaluate_run",
    "fit_stage",
    "main",
    "materialize_config",
    "run_stage",
    "stage_export_dir",
    "write_report",
]


def stage_export_dir(stage_dir: str | os.PathLike) -> Path:
    return Path(stage_dir) / "hf" / "final"


def _has_export(stage_dir: str | os.PathLike) -> bool:
    """Whether the stage in ``stage_dir`` finished: its HF export holds a ``config.json``."""
    return (stage_export_dir(stage_dir) / "config.json").exists()


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
    if _has_export(stage_dir) and not force:
        return export
    config_path = Path(config)
    if not config_path.is_absolute() and not config_path.exists():
        config_path = CONFIG_DIR / config_path
    args = ["fit", "--config", str(config_path), f"--run_dir={stage_dir}", *(overrides or [])]
    if quiet:
        args += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    cli_main(args)
    if not _has_export(stage_dir):
        raise RuntimeError(f"Stage with config {config_path} finished without writing {export}")
    return export


def evaluate_run(policy_dir, reference_dir, prompts_file, *, num_prompts=100, max_new_tokens=48, seed=0, objectives=None,
                 num_samples=1):
    """Gold score per objective and Monte-Carlo KL(policy || reference) on held-out prompts
    (``num_samples`` completions for each of the first ``num_prompts`` prompts of ``prompts_file``)."""
    from rlhf_lightning.evaluation import evaluate_policy
    from rlhf_lightning.models import load_causal_lm, load_tokenizer
    from rlhf_lightning.synthetic import GOLD_OBJECTIVES

    from transformers.utils import logging as hf_logging

    tokenizer = load_tokenizer(policy_dir, padding_side="left")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # two "Loading weights" bars per evaluated policy drown the pipeline's log
    try:
        policy = load_causal_lm(str(policy_dir))
        reference = load_causal_lm(str(reference_dir)) if reference_dir is not None else None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    with open(prompts_file) as handle:
        prompts = [json.loads(line)["prompt"] for line in handle if line.strip()][:num_prompts]
    result = evaluate_policy(
        policy,
        tokenizer,
        prompts,
        scorers=list(objectives or GOLD_OBJECTIVES),
        reference=reference,
        num_samples=num_samples,
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


# ---- the stages ------------------------------------------------------------------------------------


@dataclass
class PipelineStage:
    """A fit stage: its config, the folder it writes (``<run>/<name>``) and shortened (--quick) overrides.

    Fields:
        name: stage folder under the run directory, and its name on the command line.
        config: YAML under ``configs/``.
        quick_overrides: CLI overrides added by ``--quick``.
        overrides: CLI overrides always added.
        method: label in the results table; None for support stages (reward models).
        targets: gold objective -> weight, what the method optimises (the objectives of its preference
            pairs, reward model or reward sources, weighted as the config weights them); the table's
            "target vs SFT" column is the weighted mean of their gold-score changes.
        depends_on: stages whose exports the config reads.
    """

    name: str
    config: str
    quick_overrides: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    method: str | None = None
    targets: dict[str, float] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()


# --quick: a world of 3000 demonstrations / 1500 pairs per objective, a smaller policy, and every stage
# shortened so that the whole pipeline runs in a few minutes on a 2-core CPU (weaker numbers).
QUICK_WORLD = dict(n_demonstrations=3000, n_pairs=1500, n_prompts=300, n_eval_prompts=100)
QUICK_POLICY = [
    "--model.init_args.model.hidden_size=64",
    "--model.init_args.model.intermediate_size=192",
    "--model.init_args.model.num_hidden_layers=2",
]


def _short(steps: int, warmup: int, val_every: int | None = None) -> list[str]:
    """Overrides that shorten a stage to ``steps`` optimizer steps (rollouts for PPO-style methods)."""
    return [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={val_every or steps}",
            f"--model.init_args.optim.warmup_steps={warmup}"]


# --tiny (hidden, the test suite's setting): --quick plus a smaller world, a 1-layer policy and a few steps
# per stage. It checks that the stages fit together (paths, exports, report) in about a minute; it learns
# nothing worth reporting.
TINY_WORLD = dict(n_demonstrations=400, n_val_demonstrations=64, n_pairs=200, n_val_pairs=64, n_prompts=64,
                  n_eval_prompts=32)
TINY_POLICY = [
    "--model.init_args.model.hidden_size=32",
    "--model.init_args.model.intermediate_size=64",
    "--model.init_args.model.num_hidden_layers=1",
]
TINY_STEPS = 4


def _tiny_overrides(stage: "PipelineStage") -> list[str]:
    return [*(TINY_POLICY if stage.name == "sft" else []), *_short(TINY_STEPS, 1), "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=1"]  # with 4 steps, a longer interval would log no training curve


# The online-RL stages (PPO, RLOO) share their inputs: the SFT policy, rewarded by the sentiment RM.
AGAINST_SENTIMENT_RM = dict(targets={"sentiment": 1.0}, depends_on=("sft", "reward_model"))

STAGES: list[PipelineStage] = [
    PipelineStage("sft", "sft.yaml", QUICK_POLICY + ["--trainer.max_steps=300", "--trainer.val_check_interval=150"]),
    # The reward models are small Llamas trained from scratch (no SFT needed): 300 steps cost ~1 CPU-minute.
    PipelineStage("reward_model", "reward_model.yaml", _short(300, 30)),
    PipelineStage("dpo", "dpo.yaml", _short(60, 6, 30), method="DPO", targets={"sentiment": 1.0}, depends_on=("sft",)),
    PipelineStage("modpo_margin_rm", "modpo_margin_rm.yaml", _short(300, 30)),
    # weights [0.5, 0.5] in configs/modpo.yaml: sentiment (the pairs) and consistency (the margin RM).
    PipelineStage("modpo", "modpo.yaml", _short(60, 6, 30), method="MODPO",
                  targets={"sentiment": 0.5, "consistency": 0.5}, depends_on=("sft", "modpo_margin_rm")),
    PipelineStage("ppo", "ppo.yaml", _short(10, 2), method="PPO", **AGAINST_SENTIMENT_RM),
    # The critic-free stage: RLOO reached PPO's gold sentiment at ~60% of its KL in the online-RL study
    # (docs/results/online_rl.md), so it is the family's representative here.
    PipelineStage("rloo", "rloo.yaml", _short(10, 2), method="RLOO", **AGAINST_SENTIMENT_RM),
    # Sentence-level gold sentiment (weight 1.0) and fluency (0.5), plus a repetition penalty.
    PipelineStage("fine_grained", "fine_grained.yaml", _short(10, 2), method="Fine-Grained RLHF",
                  targets={"sentiment": 1.0, "fluency": 0.5}, depends_on=("sft",)),
]


def _stage_by_name(name: str) -> PipelineStage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise KeyError(f"Unknown stage {name!r}; stages: {[s.name for s in STAGES]}")


@dataclass
class StageRun:
    """What :func:`run_stage` did: the export, the stage's training wall time, and whether it was reused."""

    export: Path
    train_time_s: float
    reused: bool


def run_stage(name: str, run_dir: str | os.PathLike, *, quick: bool = False, tiny: bool = False, seed: int = 0,
              force: bool = False, quiet: bool = False, extra_overrides: list[str] | None = None) -> StageRun:
    """Run one stage of ``STAGES`` into ``<run_dir>/<name>`` (or reuse its export) with the pipeline's overrides:
    the stage's own, then its ``quick_overrides`` with ``quick`` (or ``tiny``), then the tiny ones with
    ``tiny``, then ``extra_overrides`` (later ones win).

    The world must already be in ``<run_dir>/world``; the stages in ``depends_on`` must have run. The
    training wall time is kept in ``<run_dir>/<name>/train_time_s.txt`` so that a reused stage still
    reports it.
    """
    stage = _stage_by_name(name)
    run_dir = Path(run_dir)
    missing = [dep for dep in stage.depends_on if not _has_export(run_dir / dep)]
    if missing:
        raise FileNotFoundError(f"Stage {name!r} reads the exports of {missing}, which are not in {run_dir}: "
                                f"run them first (e.g. --stages {' '.join(missing)} {name}).")
    export = stage_export_dir(run_dir / name)
    timing_file = run_dir / name / "train_time_s.txt"
    if _has_export(run_dir / name) and not force:
        seconds = float(timing_file.read_text()) if timing_file.exists() else float("nan")
        return StageRun(export, seconds, reused=True)
    config = materialize_config(stage.config, run_dir)
    overrides = [f"--seed_everything={seed}", *stage.overrides, *(stage.quick_overrides if quick or tiny else []),
                 *(_tiny_overrides(stage) if tiny else []), *(extra_overrides or [])]
    started = time.perf_counter()
    fit_stage(config, run_dir / name, overrides, force=True, quiet=quiet)
    seconds = time.perf_counter() - started
    timing_file.write_text(f"{seconds:.1f}\n")
    return StageRun(export, seconds, reused=False)


# ---- evaluation ------------------------------------------------------------------------------------


def _file_identity(path: Path) -> list:
    """What tells two versions of a file apart cheaply: size and modification time."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _weights_file(export: Path) -> Path:
    candidates = sorted(export.glob("*.safetensors")) or sorted(export.glob("*.bin"))
    return candidates[0] if candidates else export / "config.json"


def evaluate_methods(run_dir: str | os.PathLike, *, num_prompts: int = 200, num_samples: int = 2,
                     max_new_tokens: int = 48, seed: int = 0, stages: list[str] | None = None, log=print) -> list[dict]:
    """Evaluate the SFT policy and every method stage whose export exists; one row per policy.

    A row holds ``method``, ``stage``, ``targets`` (objective -> weight), ``gold/<objective>`` and its
    standard error ``gold/<objective>_se`` for every gold objective, ``kl_to_sft``, ``response_length``,
    ``num_samples`` (completions scored) and ``train_time_s``. Every policy is sampled with the same seed
    on the same prompts. Each evaluation is cached in ``<stage>/eval.json`` under the identity of the
    policy and SFT weights, the prompts and the settings, so a rerun evaluates only what changed.
    """
    from rlhf_lightning.synthetic import GOLD_OBJECTIVES

    run_dir = Path(run_dir)
    sft_dir = stage_export_dir(run_dir / "sft")
    prompts_file = run_dir / "world" / "prompts_eval.jsonl"
    with open(prompts_file) as handle:  # a smaller world has fewer prompts than asked for
        num_prompts = min(num_prompts, sum(1 for line in handle if line.strip()))
    wanted = [s for s in STAGES if s.method is not None and (stages is None or s.name in stages)]
    policies = [("SFT", "sft", {})] + [
        (s.method, s.name, s.targets) for s in wanted if _has_export(run_dir / s.name)
    ]
    rows = []
    for label, stage_name, targets in policies:
        export = stage_export_dir(run_dir / stage_name)
        key = {"policy": _file_identity(_weights_file(export)), "reference": _file_identity(_weights_file(sft_dir)),
               "prompts": _file_identity(prompts_file), "num_prompts": num_prompts, "num_samples": num_samples,
               "max_new_tokens": max_new_tokens, "seed": seed, "objectives": list(GOLD_OBJECTIVES)}
        cache = run_dir / stage_name / "eval.json"
        # Several settings may be cached side by side (the notebook evaluates fewer prompts than the
        # pipeline); entries for other weights of the policy or of the SFT reference are stale and dropped.
        entries = json.loads(cache.read_text()).get("evaluations", []) if cache.exists() else []
        entries = [e for e in entries if e["key"]["policy"] == key["policy"] and e["key"]["reference"] == key["reference"]]
        hit = next((entry for entry in entries if entry["key"] == key), None)
        if hit is not None:
            log(f"[pipeline] {label}: reusing the evaluation in {cache}")
            metrics, count = hit["metrics"], hit["num_samples"]
        else:
            log(f"[pipeline] evaluating {label}: {num_samples} sample(s) on each of {num_prompts} held-out prompts")
            result = evaluate_run(export, sft_dir, prompts_file, num_prompts=num_prompts, num_samples=num_samples,
                                  max_new_tokens=max_new_tokens, seed=seed)
            metrics, count = {k: float(v) for k, v in result.metrics.items()}, len(result.samples)
            entries.append({"key": key, "metrics": metrics, "num_samples": count})
            cache.write_text(json.dumps({"evaluations": entries}, indent=1) + "\n")
            with open(run_dir / stage_name / "samples.jsonl", "w") as handle:
                for sample in result.samples[:20]:
                    handle.write(json.dumps(sample) + "\n")
        timing_file = run_dir / stage_name / "train_time_s.txt"
        row = {"method": label, "stage": stage_name, "targets": dict(targets),
               "kl_to_sft": metrics["kl_to_reference"], "response_length": metrics["response_length"],
               "num_samples": count,
               "train_time_s": float(timing_file.read_text()) if timing_file.exists() else float("nan")}
        for objective in GOLD_OBJECTIVES:
            row[f"gold/{objective}"] = metrics[f"gold/{objective}"]
            row[f"gold/{objective}_se"] = metrics[f"gold/{objective}_std"] / max(count, 1) ** 0.5
        rows.append(row)
    return rows


# ---- the report -------------------------------------------------------------------------------------


def _targets_text(targets: dict[str, float]) -> str:
    if not targets:
        return "-"
    if len(targets) == 1:
        return next(iter(targets))
    return " + ".join(f"{weight:g} {name}" for name, weight in targets.items())


def with_deltas(rows: list[dict], objectives: tuple[str, ...]) -> list[dict]:
    """Rows with ``delta/<objective>`` (gold score minus the SFT row's) and ``target_delta``: the
    ``targets``-weighted mean of the deltas of the objectives a method optimises (None without targets)."""
    baseline = next((row for row in rows if row["method"] == "SFT"), None)
    if baseline is None:
        raise ValueError("The results need an 'SFT' row: every method is compared with the SFT policy.")
    out = []
    for row in rows:
        row = dict(row)
        targets = row.get("targets") or {}
        for objective in objectives:
            row[f"delta/{objective}"] = row[f"gold/{objective}"] - baseline[f"gold/{objective}"]
        unknown = [name for name in targets if name not in objectives]
        if unknown:
            raise ValueError(f"{row['method']}: target objectives {unknown} are not among {objectives}")
        total = sum(targets.values())
        row["target_delta"] = (
            sum(weight * row[f"delta/{name}"] for name, weight in targets.items()) / total if targets else None
        )
        out.append(row)
    return out


def _cell(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.{digits}f}"
    return str(value)


def write_report(rows: list[dict], run_dir: str | os.PathLike, objectives: tuple[str, ...]) -> str:
    """results.csv, results.md and frontier.png (gold score vs KL to SFT, one point per method).

    ``rows``: one per policy with ``method``, ``gold/<objective>``, ``kl_to_sft`` and optionally
    ``targets`` (objective -> weight), ``response_length``, ``train_time_s``; one row must be the SFT
    policy (``method == "SFT"``). Returns the markdown table.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = with_deltas(rows, objectives)

    columns = ["method", "targets", *[f"gold/{name}" for name in objectives], *[f"delta/{name}" for name in objectives],
               "target_delta", "kl_to_sft", "response_length", "train_time_s",
               *[f"gold/{name}_se" for name in objectives], "num_samples"]
    with open(run_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "targets": ";".join(f"{k}:{v:g}" for k, v in (row.get("targets") or {}).items()),
                             "target_delta": "" if row["target_delta"] is None else row["target_delta"]})

    header = ["method", "target objective(s)", *[f"gold {name}" for name in objectives], "target gold vs SFT",
              "KL to SFT", "length", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        targets = row.get("targets") or {}
        change = "-" if row["target_delta"] is None else f"{row['target_delta']:+.3f}"
        if len(targets) > 1:
            change += " (" + ", ".join(f"{name} {row[f'delta/{name}']:+.3f}" for name in targets) + ")"
        cells = [row["method"], _targets_text(targets), *[_cell(row[f"gold/{name}"]) for name in objectives], change,
                 _cell(row["kl_to_sft"]), _cell(row.get("response_length"), 1), _cell(row.get("train_time_s"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    standard_errors = {name: [row[f"gold/{name}_se"] for row in rows if row.get(f"gold/{name}_se") is not None]
                       for name in objectives}
    if all(standard_errors.values()):
        counts = sorted({row["num_samples"] for row in rows if row.get("num_samples")})
        lines += ["", f"Gold scores: means over {'/'.join(map(str, counts))} sampled completions per policy; standard "
                  "error of a mean at most " + ", ".join(f"{name} {max(values):.3f}" for name, values in standard_errors.items())
                  + ". KL to SFT: nats per completion; train s: training wall time of the stage."]
    table = "\n".join(lines)
    (run_dir / "results.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(objectives), figsize=(4.2 * len(objectives), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, objective in zip(axes[0], objectives):
        for position, row in enumerate(rows):
            color = "gray" if row["method"] == "SFT" else colors[position % len(colors)]
            # Filled: the method optimises this objective; hollow: a side effect.
            is_target = objective in (row.get("targets") or {})
            axis.scatter(row["kl_to_sft"], row[f"gold/{objective}"], s=45, edgecolors=color,
                         facecolors=color if is_target or row["method"] == "SFT" else "none",
                         marker="s" if row["method"] == "SFT" else "o")
            axis.annotate(row["method"], (row["kl_to_sft"], row[f"gold/{objective}"]), fontsize=8,
                          xytext=(4, 4), textcoords="offset points")
        axis.set_xlabel("KL(policy || SFT) [nats / sequence]")
        axis.set_ylabel(f"gold {objective}")
        axis.grid(alpha=0.3)
    figure.suptitle("Gold score vs KL to the SFT policy (filled marker: an objective the method optimises)")
    figure.tight_layout()
    figure.savefig(run_dir / "frontier.png", dpi=120)
    plt.close(figure)
    return table


# ---- the command -------------------------------------------------------------------------------------


def run_pipeline(args: argparse.Namespace) -> int:
    from rlhf_lightning.synthetic import GOLD_OBJECTIVES, write_world

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    selected = args.stages or [stage.name for stage in STAGES]
    for name in [*selected, *args.force]:
        _stage_by_name(name)  # an unknown name fails before anything runs
    setting = " (--tiny)" if args.tiny else " (--quick)" if args.quick else ""
    print(f"[pipeline] run directory: {run_dir.resolve()}{setting}", flush=True)
    pipeline_started = time.perf_counter()

    started = time.perf_counter()
    write_world(run_dir / "world", seed=args.seed, **(TINY_WORLD if args.tiny else QUICK_WORLD if args.quick else {}))
    print(f"[pipeline] world ready ({time.perf_counter() - started:.1f} s)", flush=True)

    for position, name in enumerate(selected, start=1):
        stage = _stage_by_name(name)
        export = stage_export_dir(run_dir / name)
        reused = _has_export(run_dir / name) and name not in args.force
        what = f"reusing {export}" if reused else f"training with configs/{stage.config}"
        print(f"[pipeline] stage {position}/{len(selected)} {name}: {what}", flush=True)
        done = run_stage(name, run_dir, quick=args.quick, tiny=args.tiny, seed=args.seed, force=name in args.force)
        if not done.reused:
            print(f"[pipeline] stage {name} done in {done.train_time_s:.1f} s -> {done.export}", flush=True)

    started = time.perf_counter()
    # Every method with an export is in the table, also those not rerun now (their evaluation is cached).
    rows = evaluate_methods(run_dir, num_prompts=args.eval_prompts, num_samples=args.eval_samples, seed=args.seed,
                            log=lambda message: print(message, flush=True))
    print(f"[pipeline] evaluation done in {time.perf_counter() - started:.1f} s", flush=True)
    table = write_report(rows, run_dir, tuple(GOLD_OBJECTIVES))
    print("\n" + table + "\n", flush=True)
    print(f"[pipeline] wrote {run_dir / 'results.csv'}, {run_dir / 'results.md'}, {run_dir / 'frontier.png'} "
          f"(total {time.perf_counter() - pipeline_started:.0f} s)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-lightning pipeline", description="The embedded pipeline, end to end.")
    parser.add_argument("--run-dir", default="outputs", help="everything the pipeline writes goes here (default: outputs, "
                        "the paths the configs use)")
    parser.add_argument("--quick", action="store_true", help="shortened settings (CI / smoke): minutes, weaker numbers")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's setting, see TINY_WORLD
    parser.add_argument("--stages", nargs="*", default=None, help="run only these stages (earlier outputs are reused); "
                        f"all: {' '.join(stage.name for stage in STAGES)}")
    parser.add_argument("--force", nargs="*", default=[], help="rerun these stages even if their export exists")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-prompts", type=int, default=None,
                        help="held-out prompts per evaluation (default 200, the world's evaluation prompts)")
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="sampled completions per prompt (default 2: 400 per policy)")
    args = parser.parse_args(argv)
    args.eval_prompts = args.eval_prompts or (TINY_WORLD["n_eval_prompts"] if args.tiny else 200)
    args.eval_samples = args.eval_samples or (1 if args.tiny else 2)
    return run_pipeline(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
