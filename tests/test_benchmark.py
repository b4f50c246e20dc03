"""scripts/benchmark.py: one in-process measurement per kind on a tiny model, and the table."""

from __future__ import annotations

import math

import pytest


@pytest.fixture(scope="module")
def bench():
    from tests.conftest import load_script

    return load_script("benchmark")


def tiny_args(bench, *extra):
    return bench.build_parser().parse_args(
        ["--hidden-size", "32", "--layers", "1", "--vocab", "50", "--batch-size", "2", "--seq-len", "16",
         "--steps", "2", "--warmup", "1", "--device", "cpu", *extra]
    )


@pytest.mark.parametrize("kind,bare", [("dpo_live", "dpo"), ("dpo_precomputed", "dpo"), ("rm", "rm")])
def test_module_measurement_interleaves_its_bare_steps(bench, kind, bare):
    result = bench._measure(kind, tiny_args(bench), bare=bare)
    for key in ("times", "cpu_times", "bare_times", "bare_cpu_times"):
        assert len(result[key]) == 2 and all(t > 0 for t in result[key]), key
    assert isinstance(result["peak_mb"], float)


def test_bare_measurement_and_table(bench):
    args = tiny_args(bench)
    result = bench._measure("dpo_bare", args)
    assert len(result["times"]) == 2 and len(result["cpu_times"]) == 2
    bare = bench._row("dpo", "bare", result, args)
    module = {"times": [0.2, 0.2], "cpu_times": [2 * result["cpu_times"][0]] * 2, "peak_mb": 1.0}
    row = bench._row("dpo", "module", module, args, bench._step_cost(result, bench._device(args)))
    assert bare["overhead"] == 1.0
    # On CPU the ratio is taken on CPU time: module CPU / median bare CPU.
    assert math.isclose(row["overhead"], module["cpu_times"][0] / bench._median(result["cpu_times"]))
    table = bench.to_markdown([bare, row], args)
    assert "step / bare" in table and "| dpo | module |" in table
    with pytest.raises(ValueError):
        bench._measure("nope", args)
