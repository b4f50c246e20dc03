"""scripts/benchmark.py, offline sections: one in-process measurement per kind and layout on a tiny model,
the token accounting of each layout, and the table."""

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


@pytest.mark.parametrize(
    "kind,bare",
    [("dpo_live", "dpo"), ("dpo_precomputed:shared_prompt", "dpo"), ("dpo_live:padding_free", "dpo"), ("rm:shared_prompt", "rm"),
     ("sft:padding_free", "sft")],
)
def test_module_measurement_interleaves_its_bare_steps(bench, kind, bare):
    result = bench._measure(kind, tiny_args(bench), bare=bare)
    for key in ("times", "cpu_times", "bare_times", "bare_cpu_times"):
        assert len(result[key]) == 2 and all(t > 0 for t in result[key]), key
    assert isinstance(result["peak_mb"], float)


def test_token_counts_by_layout(bench):
    """Default shape, T = 16: prompt 4, chosen 12 (16 in all), rejected 8 (12 in all), 2 pairs per step.
    Padded: 4 rows x 16 = 64 computed; useful = 2 x (4 + 12 + 8) = 48. Padding-free with rows of at most
    16: the 16-token sequences alone, the 12-token ones alone -> 4 x 16 again. Shared prompt: trees of
    24 tokens, one per row -> 48, no waste."""
    args = tiny_args(bench)
    padded = bench.token_counts("dpo", "padded", args, 50)
    free = bench.token_counts("dpo", "padding_free", args, 50)
    tree = bench.token_counts("dpo", "shared_prompt", args, 50)
    assert padded == {"computed": 64, "useful": 48, "output": 64}
    assert free["computed"] == 64 and free["useful"] == 48 and free["output"] == 2 * (12 + 8)
    assert tree["computed"] == 48 and tree["output"] == 2 * (12 + 8)
    sft_padded, sft_free = bench.token_counts("sft", "padded", args, 50), bench.token_counts("sft", "padding_free", args, 50)
    assert sft_free["useful"] == sft_padded["useful"] and sft_free["computed"] < sft_padded["computed"]


def test_bare_measurement_rows_and_table(bench):
    args = tiny_args(bench)
    result = bench._measure("dpo_bare", args)
    assert len(result["times"]) == 2 and len(result["cpu_times"]) == 2
    cost = bench._step_cost(result, bench._device(args))
    tokens = {"computed": 64.0, "useful": 48.0, "output": 64.0}
    bare = bench._row("dpo", "default", "bare", result, args, cost, tokens)
    faster = {"times": [0.1, 0.1], "cpu_times": [cost / 2] * 2, "peak_mb": 1.0}
    row = bench._row("dpo", "default", "module", faster, args, cost, {**tokens, "computed": 48.0})
    assert bare["speedup"] == 1.0 and math.isclose(row["speedup"], 2.0)
    table = bench.to_markdown([bare, row], args)
    assert "| dpo | default | module | 48 | 48 | 0.0% |" in table and "2.00x" in table and "25.0%" in table
    with pytest.raises(ValueError):
        bench._measure("nope", args)
