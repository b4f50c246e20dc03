"""scripts/benchmark_memory.py on a tiny model, in-process: every mode trains, LoRA modes count only the
adapters as trainable, the full-FT policy counts all its parameters, and the table has one row per mode."""

from __future__ import annotations

import argparse

from tests.conftest import load_script


def test_modes_run_and_count_parameters():
    bench = load_script("benchmark_memory")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--hidden-size", "64", "--layers", "1", "--vocab", "50", "--seq-len", "16", "--steps", "1",
                              "--device", "cpu"])
    results = [bench.measure(mode, args) for mode in bench.MODES]
    by_mode = {r["mode"]: r for r in results}
    assert by_mode["sft_lora"]["trainable"] == by_mode["dpo_lora"]["trainable"] < by_mode["dpo_full"]["trainable"]
    assert by_mode["dpo_full"]["trainable"] == by_mode["dpo_full"]["total"]  # the policy alone, the reference apart
    # The LoRA policy holds the base weights plus adapters: base = full-FT policy.
    assert by_mode["dpo_lora"]["total"] - by_mode["dpo_lora"]["trainable"] == by_mode["dpo_full"]["total"]
    assert all(r["peak_mb"] > 0 for r in results)
    table = bench.to_markdown([dict(r, trainable_share=r["trainable"] / r["total"]) for r in results], args)
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(bench.MODES)  # header + one row per mode
