"""Every YAML in configs/ parses with the CLI; the Fine-Grained RLHF and Elastic Reset configs run 2 rollouts
through the console entry point on a tiny policy; paired configs stay paired (same values except the one
they exist to change); the comparison scripts that drive them write their CSV / PNG / summary."""

from __future__ import annotations

import copy
import csv
import glob
import json
import os

import pytest
import yaml

from rlhf_lightning.cli import cli_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.yaml")))
STRATEGIES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "strategy", "*.yaml")))


def config_path(name: str) -> str:
    return os.path.join(REPO, "configs", name)


def load(name: str) -> dict:
    with open(config_path(name)) as handle:
        return yaml.safe_load(handle)


def test_the_configs_of_this_file_exist():
    assert {"fine_grained.yaml", "fine_grained_sequence.yaml", "ppo_elastic_reset.yaml", "ppo_gold.yaml"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_parses(capsys, name):
    """``rlhf-lightning fit --config configs/<name> --print_config``: types and class paths resolve."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", config_path(name), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("rlhf_lightning.modules.")
    assert printed["trainer"]["max_steps"] > 0


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_configs_compose_with_a_method_config(capsys, name):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", config_path("sft.yaml"), "--config", config_path(os.path.join("strategy", name)),
                  "--print_config"])
    assert exit_info.value.code == 0


def test_bad_value_in_a_config_is_a_clear_error(tmp_path, capsys):
    config = load("fine_grained.yaml")
    config["model"]["init_args"]["segment_rewards"][0]["granularity"] = "paragraph"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises((ValueError, SystemExit)) as error:
        cli_main(["--config", str(path)], run=False)
    message = str(error.value) + capsys.readouterr().err
    assert "paragraph" in message and "granularity" in message


# ---- paired configs differ only where they mean to -------------------------------------------------


def _without(config: dict, *paths: str) -> dict:
    config = copy.deepcopy(config)
    for path in paths:
        *parents, leaf = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        node.pop(leaf)
    return config


def test_elastic_reset_config_is_ppo_gold_plus_the_callback():
    gold, elastic = load("ppo_gold.yaml"), load("ppo_elastic_reset.yaml")
    resets = [c for c in elastic["trainer"]["callbacks"] if c["class_path"].endswith("ElasticReset")]
    assert len(resets) == 1
    args = resets[0]["init_args"]
    assert 0.0 < args["decay"] < 1.0 and args["reset_every_n_steps"] < elastic["trainer"]["max_steps"]
    # an EMA horizon 1 / (1 - decay) shorter than the reset period, as in the paper (200 vs 260 steps)
    assert 1.0 / (1.0 - args["decay"]) < args["reset_every_n_steps"]
    assert [c for c in elastic["trainer"]["callbacks"] if c is not resets[0]] == gold["trainer"]["callbacks"]
    assert elastic["trainer"]["default_root_dir"] == "outputs/ppo_elastic_reset"
    assert elastic["trainer"]["logger"]["init_args"]["save_dir"] == "outputs/ppo_elastic_reset"
    outputs = ("trainer.callbacks", "trainer.default_root_dir", "trainer.logger")
    assert _without(elastic, *outputs) == _without(gold, *outputs)


def test_fine_grained_configs_share_sources_weights_and_budget():
    fine, sequence = load("fine_grained.yaml"), load("fine_grained_sequence.yaml")
    fine_specs = fine["model"]["init_args"]["segment_rewards"]
    sequence_specs = sequence["model"]["init_args"]["segment_rewards"]
    assert [(s["source"], s["weight"]) for s in fine_specs] == [(s["source"], s["weight"]) for s in sequence_specs]
    assert {s["granularity"] for s in sequence_specs} == {"sequence"}
    assert len({s["granularity"] for s in fine_specs}) >= 2  # at least two granularities
    for spec in fine_specs:  # same budget: gold sources are normalised; the repetition penalty is additive
        if spec["source"]["class_path"].endswith("GoldSegmentScorer"):
            assert spec.get("normalize") is True and spec["source"]["init_args"]["aggregate"] == "mean"
        else:
            assert spec["source"]["class_path"].endswith("RepetitionPenalty") and not spec.get("normalize")
    paths = ("model.init_args.segment_rewards", "trainer.default_root_dir", "trainer.logger", "trainer.callbacks")
    assert _without(fine, *paths) == _without(sequence, *paths)


# ---- 2 rollouts through the CLI on a tiny policy ---------------------------------------------------


def _tiny_run_args(root, tokenizer_dir, assets_dir, tiny_config) -> list[str]:
    prompts = os.path.join(assets_dir, "prompts_tiny.jsonl")
    return [
        f"--model.init_args.policy={json.dumps(tiny_config)}", f"--model.init_args.tokenizer={tokenizer_dir}",
        "--model.init_args.sampling.max_new_tokens=6", "--model.init_args.ppo_epochs=1",
        "--model.init_args.log_samples_every_n_steps=1",
        f"--data.init_args.train_file={prompts}", f"--data.init_args.val_file={prompts}",
        "--data.init_args.batch_size=4", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", f"--run_dir={root}",
    ]


def _metrics(root) -> list[dict[str, str]]:
    (path,) = glob.glob(os.path.join(root, "logs", "version_*", "metrics.csv"))
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("name", ["fine_grained.yaml", "fine_grained_sequence.yaml"])
def test_fine_grained_configs_run_through_the_cli(tmp_path, tokenizer_dir, assets_dir, tiny_config, name):
    from transformers import AutoModelForCausalLM

    root = tmp_path / "run"
    cli_main(["fit", "--config", config_path(name), *_tiny_run_args(root, tokenizer_dir, assets_dir, tiny_config),
              "--data.init_args.val_batch_size=8"])
    rows = _metrics(root)
    columns = set(rows[0])
    for metric in ("reward/raw", "reward/sentiment", "reward/fluency", "reward/repetition", "reward/segments", "kl",
                   "val/gold/sentiment", "val/kl_to_reference"):
        assert metric in columns, metric
    train = [r for r in rows if r.get("reward/raw")]
    assert [int(r["step"]) for r in train] == [0, 1]
    for row in train:  # reward/raw is the sum of the per-source totals
        parts = sum(float(row[f"reward/{k}"]) for k in ("sentiment", "fluency", "repetition"))
        assert parts == pytest.approx(float(row["reward/raw"]), abs=1e-5)
    segments = [float(r["reward/segments"]) for r in train]
    if name == "fine_grained_sequence.yaml":
        assert segments == [3.0, 3.0]  # one sequence segment per source
    else:
        assert all(s >= 3.0 for s in segments)
    exported = AutoModelForCausalLM.from_pretrained(root / "hf" / "final")
    assert exported.config.hidden_size == tiny_config["hidden_size"]


def test_elastic_reset_config_runs_and_resets_through_the_cli(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    """configs/ppo_elastic_reset.yaml with its reset interval shortened to 1 rollout: 2 resets in 2 rollouts,
    logged, checkpointed (the callback's state is in the checkpoint), and the HF export written."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load("ppo_elastic_reset.yaml")
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ElasticReset"):
            callback["init_args"]["reset_every_n_steps"] = 1
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = 1
    path = tmp_path / "ppo_elastic_reset.yaml"
    path.write_text(yaml.safe_dump(config))
    root = tmp_path / "run"
    cli_main(["fit", "--config", str(path), *_tiny_run_args(root, tokenizer_dir, assets_dir, tiny_config),
              "--data.init_args.val_batch_size=8"])
    rows = [r for r in _metrics(root) if r.get("elastic_reset/num_resets")]
    assert [float(r["elastic_reset/num_resets"]) for r in rows] == [1.0, 2.0]
    last = torch.load(next(root.rglob("last.ckpt")), map_location="cpu", weights_only=False)
    (state,) = [v for k, v in last["callbacks"].items() if k.startswith("ElasticReset")]
    assert state["num_resets"] == 2 and state["last_reset_step"] == 2
    assert AutoModelForCausalLM.from_pretrained(root / "hf" / "final").config.hidden_size == tiny_config["hidden_size"]


# ---- the comparison scripts ----------------------------------------------------------------------


def _script(name: str):
    from tests.conftest import load_script

    return load_script(name)


def _script_args(tmp_path, tokenizer_dir, assets_dir, tiny_config) -> list[str]:
    prompts = os.path.join(assets_dir, "prompts_tiny.jsonl")
    return [
        "--policy", json.dumps(tiny_config), "--tokenizer", tokenizer_dir, "--prompts", prompts,
        "--eval-prompts", prompts, "--num-eval-prompts", "4", "--batch-size", "2", "--max-new-tokens", "4",
        "--seeds", "0", "--steps", "2", "--eval-every", "1", "--out", str(tmp_path / "out"),
    ]


def _read_csv(path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_fine_grained_vs_sequence_script_writes_curves(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    script = _script("fine_grained_vs_sequence")
    assert script.main(_script_args(tmp_path, tokenizer_dir, assets_dir, tiny_config)) == 0
    out = tmp_path / "out"
    curves = _read_csv(out / "curves.csv")
    assert [(r["variant"], r["step"]) for r in curves] == [
        ("fine_grained", "0"), ("fine_grained", "1"), ("fine_grained", "2"),
        ("sequence", "0"), ("sequence", "1"), ("sequence", "2"),
    ]
    for row in curves:  # the budget-weighted gold of the shipped configs: sentiment + 0.5 fluency
        assert float(row["gold"]) == pytest.approx(float(row["sentiment"]) + 0.5 * float(row["fluency"]), abs=1e-4)
    # both variants start from the same policy and evaluate with the same sampling noise
    assert curves[0]["gold"] == curves[3]["gold"] and curves[0]["kl_to_reference"] == curves[3]["kl_to_reference"]
    train = _read_csv(out / "train.csv")
    assert len(train) == 4 and "reward/sentiment" in train[0]
    assert (out / "curves.png").stat().st_size > 0 and "threshold" in (out / "summary.md").read_text()


def test_elastic_reset_vs_ppo_script_removes_or_reschedules_the_callback(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    script = _script("elastic_reset_vs_ppo")
    argv = _script_args(tmp_path, tokenizer_dir, assets_dir, tiny_config) + ["--reset-every", "1", "--decay", "0.5"]
    assert script.main(argv) == 0
    out = tmp_path / "out"
    train = _read_csv(out / "train.csv")
    resets = {(r["variant"], r["step"]): r.get("elastic_reset/num_resets", "") for r in train}
    assert resets == {("ppo", "1"): "", ("ppo", "2"): "", ("elastic_reset", "1"): "1", ("elastic_reset", "2"): "2"}
    curves = _read_csv(out / "curves.csv")
    assert {r["variant"] for r in curves} == {"ppo", "elastic_reset"} and len(curves) == 6
    assert (out / "curves.png").stat().st_size > 0 and "elastic_reset" in (out / "summary.md").read_text()

    class Fake:  # the callback editor refuses a config without exactly one ElasticReset
        pass

    edit = script.edit_callbacks(script.argparse.Namespace(config="x.yaml", decay=None, reset_every=None), "ppo")
    with pytest.raises(ValueError, match="exactly one ElasticReset"):
        edit([Fake()])


def test_elastic_reset_vs_ppo_script_optimises_a_given_reward_model(tmp_path, tokenizer_dir, assets_dir, tiny_config,
                                                                    monkeypatch):
    """--reward-model: both arms optimise that reward model and every evaluation logs its score as 'proxy'. A stand-in
    source scoring every completion 7.0 shows it is that source, not the config's gold scorer, that PPO sees."""
    import torch

    import rlhf_lightning.rewards

    class Constant:
        def __init__(self, model, **kwargs):
            self.model_path, self.name = model, kwargs.get("name", "reward_model")

        def __call__(self, prompts, completions, **kwargs):
            return torch.full((len(prompts),), 7.0)

    monkeypatch.setattr(rlhf_lightning.rewards, "RewardModelSource", Constant)
    script = _script("elastic_reset_vs_ppo")
    argv = _script_args(tmp_path, tokenizer_dir, assets_dir, tiny_config) + [
        "--reset-every", "1", "--reward-model", "some/proxy", "--steps", "1"]
    assert script.main(argv) == 0
    curves = _read_csv(tmp_path / "out" / "curves.csv")
    assert {r["variant"] for r in curves} == {"ppo", "elastic_reset"} and {float(r["proxy"]) for r in curves} == {7.0}
    train = _read_csv(tmp_path / "out" / "train.csv")
    assert {float(r["reward/raw"]) for r in train} == {7.0}


def test_curve_helpers_by_hand(tmp_path):
    curves = _script("gold_curves")
    rows_a = [{"step": 0, "gold": 0.1}, {"step": 5, "gold": 0.4}, {"step": 10, "gold": 0.9}]
    rows_b = [{"step": 0, "gold": 0.1}, {"step": 5, "gold": 0.6}]
    assert curves.steps_to_reach(rows_a, 0.4) == 5 and curves.steps_to_reach(rows_a, 1.0) is None
    steps, means = curves.mean_curve([rows_a, rows_b], "gold")
    assert steps == [0, 5] and means == pytest.approx([0.1, 0.5])  # only steps every run evaluated
    # CSV round trip, two folders merged, grouped per variant and seed (steps sorted)
    for seed, rows in ((0, rows_a), (1, rows_b)):
        curves.write_csv(str(tmp_path / f"s{seed}" / "curves.csv"),
                         [{"variant": "v", "seed": seed, **r} for r in reversed(rows)], first=["variant", "seed"])
    merged = curves.read_runs([str(tmp_path / "s0"), str(tmp_path / "s1")], "curves.csv")
    grouped, seeds = curves.group_runs(merged, ["v"])
    assert seeds == [0, 1] and grouped["v"][0] == [{"variant": "v", "seed": 0, **r} for r in rows_a]


def test_frontier_residual_by_hand():
    """Reference on gold = 1 + 2 KL; the other run's points lie +0.5, +0.5, -0.5 off it: mean 1/6, sample
    variance 1/3, standard error sqrt(1/3 / 3) = 1/3. Step-0 rows are ignored."""
    script = _script("elastic_reset_vs_ppo")
    ref = [[{"step": 0, "kl_to_reference": 0.0, "gold": 9.0}] + [
        {"step": s, "kl_to_reference": x, "gold": 1 + 2 * x} for s, x in ((1, 1.0), (2, 2.0), (3, 3.0))]]
    other = [[{"step": s, "kl_to_reference": x, "gold": y} for s, x, y in ((1, 1.0, 3.5), (2, 2.0, 5.5), (3, 3.0, 6.5))]]
    mean, sem, slope, n = script.frontier_residual(ref, other)
    assert (mean, sem, slope, n) == pytest.approx((1 / 6, 1 / 3, 2.0, 3))
    assert script.frontier_residual(ref, other[:0]) is None
