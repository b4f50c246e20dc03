"""scripts/morlhf_vs_modpo.py: its arguments extend the MODPO sweep's, and its results table and figure are written
(training both fronts is a study, see docs/results/overoptimization.md; not run here)."""

from __future__ import annotations

import csv


def load_script():
    from tests.conftest import load_script as load

    return load("morlhf_vs_modpo")


def test_arguments_extend_the_sweep():
    args = load_script().parse_args(["--run-dir", "x", "--quick", "--weights", "0.8", "0.2", "--ppo-steps", "7"])
    assert args.weights == [0.8, 0.2] and args.ppo_steps == 7 and args.quick and args.steps == 150  # the sweep's --quick
    assert load_script().parse_args(["--quick"]).ppo_steps == 40


def test_results_table_and_figure(tmp_path):
    rows = [{"policy": "SFT", "w_sentiment": "", "w_consistency": "", "gold/sentiment": 0.0, "gold/consistency": 0.7,
             "method": "SFT", "train_s": 0.0, "train_cpu_s": 0.0}]
    for method, shift in (("MODPO", 0.0), ("MORLHF", 0.05)):
        for w in (0.9, 0.1):
            rows.append({"policy": f"{method} w={w}", "w_sentiment": w, "w_consistency": round(1 - w, 6),
                         "gold/sentiment": w / 2 + shift, "gold/consistency": 0.7 - w / 2, "method": method,
                         "train_s": 10.0, "train_cpu_s": 18.5})
    load_script().write_results(rows, tmp_path)
    with open(tmp_path / "morlhf_vs_modpo.csv") as handle:
        written = list(csv.DictReader(handle))
    assert [r["policy"] for r in written] == [r["policy"] for r in rows]
    assert [float(r["train_cpu_s"]) for r in written] == [r["train_cpu_s"] for r in rows]  # CPU seconds beside wall
    assert (tmp_path / "morlhf_vs_modpo.png").stat().st_size > 0
