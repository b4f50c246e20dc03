"""scripts/online_rl_study.py on a tiny policy: every run in its own process, curves / train / memory CSVs,
the figure and the summary; the summary's arithmetic by hand."""

from __future__ import annotations

import csv
import json
import os

import pytest

from tests.conftest import load_script


def _read(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow  # one process per run: ~1-2 min on a loaded 2-core machine
def test_study_writes_curves_memory_and_summary(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    script = load_script("online_rl_study")
    prompts = os.path.join(assets_dir, "prompts_tiny.jsonl")
    out = tmp_path / "out"
    argv = ["--policy", json.dumps(tiny_config), "--tokenizer", tokenizer_dir, "--prompts", prompts, "--eval-prompts", prompts,
            "--num-eval-prompts", "4", "--max-new-tokens", "4", "--reward", "gold", "--variants", "ppo", "grpo",
            "--seeds", "0", "--steps", "2", "--eval-every", "1", "--out", str(out)]
    assert script.main(argv) == 0
    curves = _read(out / "curves.csv")
    assert [(r["variant"], r["step"]) for r in curves] == [("ppo", "0"), ("ppo", "1"), ("ppo", "2"),
                                                           ("grpo", "0"), ("grpo", "1"), ("grpo", "2")]
    assert curves[0]["gold"] == curves[3]["gold"]  # same start, same evaluation noise
    memory = {r["variant"]: r for r in _read(out / "memory.csv")}
    assert float(memory["ppo"]["peak_rss_mb"]) > 0 and float(memory["grpo"]["peak_rss_mb"]) > 0
    # PPO trains a value head on top of the same policy: strictly more trainable parameters.
    assert int(memory["ppo"]["trainable_params"]) > int(memory["grpo"]["trainable_params"])
    assert len(_read(out / "train.csv")) == 4
    assert (out / "curves.png").stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert "| ppo |" in summary and "| grpo |" in summary


def test_mean_se_by_hand():
    script = load_script("online_rl_study")
    mean, se = script.mean_se([1.0, 3.0])  # mean 2, sample std sqrt(2), s.e. sqrt(2)/sqrt(2) = 1
    assert mean == 2.0 and se == pytest.approx(1.0)
