"""`rlhf-lightning pipeline`: the stage table, the results report, the evaluation cache, and (slow) one
whole run in the --tiny setting followed by a second run that must reuse every stage."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from rlhf_lightning import pipeline
from rlhf_lightning.evaluation import EvalResult

OBJECTIVES = ("sentiment", "consistency", "fluency")
METHODS = [stage.method for stage in pipeline.STAGES if stage.method is not None]


def _row(method, sentiment, consistency, fluency, targets=None, kl=0.0):
    return {"method": method, "targets": targets or {}, "gold/sentiment": sentiment, "gold/consistency": consistency,
            "gold/fluency": fluency, "kl_to_sft": kl, "response_length": 20.0, "train_time_s": 1.0}


# ---- the report ---------------------------------------------------------------------------------------


def test_deltas_are_target_weighted_changes_over_sft():
    rows = pipeline.with_deltas([
        _row("SFT", 0.1, -0.2, 0.9),
        _row("DPO", 0.4, -0.3, 0.9, {"sentiment": 1.0}),
        # MODPO: 0.5 * (+0.2) + 0.5 * (-0.1) = 0.05
        _row("MODPO", 0.3, -0.3, 0.8, {"sentiment": 0.5, "consistency": 0.5}),
        # FG: (1.0 * (+0.3) + 0.5 * (-0.3)) / 1.5 = 0.1
        _row("FG", 0.4, -0.2, 0.6, {"sentiment": 1.0, "fluency": 0.5}),
    ], OBJECTIVES)
    sft, dpo, modpo, fine_grained = rows
    assert sft["target_delta"] is None and sft["delta/sentiment"] == 0.0
    assert dpo["target_delta"] == pytest.approx(0.3)
    assert dpo["delta/consistency"] == pytest.approx(-0.1)
    assert modpo["target_delta"] == pytest.approx(0.05)
    assert fine_grained["target_delta"] == pytest.approx(0.1)


def test_report_needs_an_sft_row_and_known_targets(tmp_path):
    with pytest.raises(ValueError, match="SFT"):
        pipeline.write_report([_row("DPO", 0.1, 0.1, 0.1, {"sentiment": 1.0})], tmp_path, OBJECTIVES)
    with pytest.raises(ValueError, match="helpfulness"):
        pipeline.write_report([_row("SFT", 0, 0, 0), _row("X", 0, 0, 0, {"helpfulness": 1.0})], tmp_path, OBJECTIVES)


def test_report_files_name_targets_and_changes(tmp_path):
    rows = [_row("SFT", 0.1, -0.2, 0.9), _row("MODPO", 0.3, -0.3, 0.8, {"sentiment": 0.5, "consistency": 0.5}, kl=2.0)]
    table = pipeline.write_report(rows, tmp_path, OBJECTIVES)

    assert (tmp_path / "results.md").read_text().strip() == table.strip()
    lines = table.splitlines()
    assert "target objective(s)" in lines[0] and "target gold vs SFT" in lines[0]
    modpo_line = next(line for line in lines if line.startswith("| MODPO"))
    assert "0.5 sentiment + 0.5 consistency" in modpo_line
    assert "+0.050 (sentiment +0.200, consistency -0.100)" in modpo_line
    with open(tmp_path / "results.csv") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [row["method"] for row in csv_rows] == ["SFT", "MODPO"]
    assert csv_rows[0]["target_delta"] == "" and float(csv_rows[1]["target_delta"]) == pytest.approx(0.05)
    assert csv_rows[1]["targets"] == "sentiment:0.5;consistency:0.5"
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the stage table agrees with the configs ----------------------------------------------------------


def _config(stage: pipeline.PipelineStage) -> dict:
    return yaml.safe_load((pipeline.CONFIG_DIR / stage.config).read_text())


def _pairs_objective(config: dict) -> str:
    return re.fullmatch(r".*pairs_(\w+)_train\.jsonl", config["data"]["init_args"]["train_file"]).group(1)


def _config_targets(stage: pipeline.PipelineStage) -> dict[str, float]:
    """What the config optimises, read from the YAML: pairs' objective, reward model's pairs, scorer objectives."""
    config, args = _config(stage), _config(stage)["model"]["init_args"]
    stages = {s.name: s for s in pipeline.STAGES}
    if stage.name == "dpo":
        return {_pairs_objective(config): 1.0}
    if stage.name == "modpo":
        names = [_pairs_objective(config)] + [source["init_args"]["name"] for source in args["margin_sources"]]
        return dict(zip(names, map(float, args["weights"])))
    if stage.name in ("ppo", "rloo"):
        reward_stage = args["reward"]["init_args"]["model"].split("/")[1]  # outputs/<stage>/hf/final
        return {_pairs_objective(_config(stages[reward_stage])): 1.0}
    if stage.name == "fine_grained":
        return {spec["source"]["init_args"]["objective"]: float(spec["weight"]) for spec in args["segment_rewards"]
                if spec["source"]["class_path"].endswith("GoldSegmentScorer")}
    raise AssertionError(f"no rule for method stage {stage.name}: add one here")


@pytest.mark.parametrize("stage", [s for s in pipeline.STAGES if s.method is not None], ids=lambda s: s.name)
def test_declared_targets_are_what_the_config_optimises(stage):
    assert stage.targets == _config_targets(stage)


def test_stage_list_runs_every_method_after_what_it_reads():
    assert [s.name for s in pipeline.STAGES] == [
        "sft", "reward_model", "dpo", "modpo_margin_rm", "modpo", "ppo", "rloo", "fine_grained"]
    assert METHODS == ["DPO", "MODPO", "PPO", "RLOO", "Fine-Grained RLHF"]


def test_rloo_and_ppo_train_the_sft_policy_against_the_same_reward_model():
    """The critic-free stage is comparable with PPO's row: same policy, reward model, prompts and length."""
    stages = {s.name: s for s in pipeline.STAGES}
    ppo, rloo = _config(stages["ppo"]), _config(stages["rloo"])
    assert rloo["model"]["class_path"] == "rlhf_lightning.modules.RLOOModule"
    for key in ("policy", "tokenizer", "reference"):
        assert rloo["model"]["init_args"][key] == ppo["model"]["init_args"][key]
    assert rloo["model"]["init_args"]["reward"] == ppo["model"]["init_args"]["reward"]
    assert rloo["model"]["init_args"]["sampling"]["max_new_tokens"] == ppo["model"]["init_args"]["sampling"]["max_new_tokens"]
    assert rloo["data"]["init_args"]["train_file"] == ppo["data"]["init_args"]["train_file"]
    # --quick shortens both to the same number of rollouts, with the same warm-up.
    assert stages["rloo"].quick_overrides == stages["ppo"].quick_overrides
    assert (stages["rloo"].targets, stages["rloo"].depends_on) == (stages["ppo"].targets, stages["ppo"].depends_on)


def test_materialized_rloo_config_writes_under_the_run_dir(tmp_path):
    text = pipeline.materialize_config("rloo.yaml", tmp_path).read_text()
    assert "outputs/" not in text
    config = yaml.safe_load(text)
    assert config["model"]["init_args"]["policy"] == f"{tmp_path.as_posix()}/sft/hf/final"
    assert config["model"]["init_args"]["reward"]["init_args"]["model"] == f"{tmp_path.as_posix()}/reward_model/hf/final"
    assert config["trainer"]["default_root_dir"] == f"{tmp_path.as_posix()}/rloo"


def test_margin_rm_trains_the_objective_modpo_names():
    stages = {s.name: s for s in pipeline.STAGES}
    margin = _config(stages["modpo"])["model"]["init_args"]["margin_sources"][0]["init_args"]
    assert margin["model"] == "outputs/modpo_margin_rm/hf/final"
    assert _pairs_objective(_config(stages["modpo_margin_rm"])) == margin["name"]


@pytest.mark.parametrize("stage", pipeline.STAGES, ids=lambda s: s.name)
def test_depends_on_lists_the_exports_the_config_reads(stage):
    def strings(node):
        if isinstance(node, dict):
            return [s for value in node.values() for s in strings(value)]
        if isinstance(node, list):
            return [s for value in node for s in strings(value)]
        return [node] if isinstance(node, str) else []

    read = {m.group(1) for text in strings(_config(stage)) if (m := re.fullmatch(r"outputs/(\w+)/hf/final", text))}
    assert read == set(stage.depends_on)
    order = [s.name for s in pipeline.STAGES]
    assert all(order.index(dep) < order.index(stage.name) for dep in stage.depends_on)


def test_run_stage_names_missing_dependencies(tmp_path):
    with pytest.raises(FileNotFoundError, match="modpo_margin_rm"):
        pipeline.run_stage("modpo", tmp_path)
    _fake_export(tmp_path, "sft")
    with pytest.raises(FileNotFoundError, match=r"\['reward_model'\]"):
        pipeline.run_stage("rloo", tmp_path)


def test_unknown_stage_fails_before_anything_runs(tmp_path):
    with pytest.raises(KeyError, match="rlhf"):
        pipeline.main(["--run-dir", str(tmp_path), "--stages", "rlhf"])
    assert not (tmp_path / "world").exists()


# ---- the evaluation cache -------------------------------------------------------------------------------


def _fake_export(run_dir: Path, stage: str) -> Path:
    export = pipeline.stage_export_dir(run_dir / stage)
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_bytes(b"weights of " + stage.encode())
    (run_dir / stage / "train_time_s.txt").write_text("1.5\n")
    return export


def test_evaluations_are_cached_per_weights_and_settings(tmp_path, monkeypatch):
    calls = []

    def fake_evaluate_run(policy_dir, reference_dir, prompts_file, *, num_prompts, num_samples, **kwargs):
        calls.append((Path(policy_dir).parent.parent.name, num_prompts, num_samples))
        metrics = {"kl_to_reference": 0.5, "response_length": 10.0}
        for objective in OBJECTIVES:
            metrics[f"gold/{objective}"], metrics[f"gold/{objective}_std"] = 0.25, 0.5
        return EvalResult(metrics=metrics, samples=[{"prompt": "p", "completion": "c"}] * (num_prompts * num_samples))

    monkeypatch.setattr(pipeline, "evaluate_run", fake_evaluate_run)
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "prompts_eval.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(8)))
    _fake_export(tmp_path, "sft")
    dpo = _fake_export(tmp_path, "dpo")
    quiet = dict(log=lambda message: None)

    rows = pipeline.evaluate_methods(tmp_path, num_prompts=200, num_samples=2, **quiet)
    assert calls == [("sft", 8, 2), ("dpo", 8, 2)]  # 200 asked, the world holds 8
    assert [row["method"] for row in rows] == ["SFT", "DPO"] and rows[1]["targets"] == {"sentiment": 1.0}
    assert rows[0]["num_samples"] == 16 and rows[0]["gold/sentiment_se"] == pytest.approx(0.5 / 4)
    assert rows[1]["train_time_s"] == 1.5

    calls.clear()
    assert pipeline.evaluate_methods(tmp_path, num_prompts=200, num_samples=2, **quiet) == rows
    assert calls == []
    pipeline.evaluate_methods(tmp_path, num_prompts=4, num_samples=1, **quiet)  # another setting: evaluated ...
    assert calls == [("sft", 4, 1), ("dpo", 4, 1)]
    calls.clear()
    pipeline.evaluate_methods(tmp_path, num_prompts=200, num_samples=2, **quiet)  # ... without evicting the first
    assert calls == []

    (dpo / "model.safetensors").write_bytes(b"retrained weights")  # new weights: only that policy is redone
    pipeline.evaluate_methods(tmp_path, num_prompts=200, num_samples=2, **quiet)
    assert calls == [("dpo", 8, 2)]


# ---- the whole pipeline (slow) -----------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_pipeline_writes_one_row_per_method(tiny_pipeline_run):
    run_dir, output = tiny_pipeline_run["run_dir"], tiny_pipeline_run["output"]
    print(f"rlhf-lightning pipeline --tiny took {tiny_pipeline_run['seconds']:.0f} s")
    for stage in pipeline.STAGES:
        assert (pipeline.stage_export_dir(run_dir / stage.name) / "config.json").exists(), stage.name
        assert re.search(rf"stage {stage.name} done in [0-9.]+ s", output), f"no timing printed for {stage.name}"
    assert f"stage {len(pipeline.STAGES)}/{len(pipeline.STAGES)}" in output

    with open(run_dir / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == ["SFT", *METHODS]
    for row in rows[1:]:
        assert row["targets"] and float(row["target_delta"]) == float(row["target_delta"])  # named and finite
        assert float(row["train_time_s"]) > 0
    table = (run_dir / "results.md").read_text()
    assert all(f"| {method} |" in table for method in ["SFT", *METHODS])
    assert table.split("\n\n")[0] in output  # the table is printed
    assert (run_dir / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_second_pipeline_run_reuses_every_stage(tiny_pipeline_run, monkeypatch, capsys):
    import rlhf_lightning.cli

    run_dir = tiny_pipeline_run["run_dir"]
    weights = {s.name: pipeline.stage_export_dir(run_dir / s.name) / "model.safetensors" for s in pipeline.STAGES}
    before = {name: path.stat().st_mtime_ns for name, path in weights.items()}
    results_before = (run_dir / "results.csv").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError(f"the second run trained: cli_main{args}")

    monkeypatch.setattr(rlhf_lightning.cli, "cli_main", no_training)
    assert pipeline.main(["--run-dir", str(run_dir), "--tiny"]) == 0

    output = capsys.readouterr().out
    for stage in pipeline.STAGES:
        assert f"{stage.name}: reusing" in output
    assert output.count("reusing the evaluation") == len(METHODS) + 1
    assert {name: path.stat().st_mtime_ns for name, path in weights.items()} == before
    assert (run_dir / "results.csv").read_text() == results_before
    assert not list(run_dir.glob("*/logs/version_1"))
