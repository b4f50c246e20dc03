"""scripts/benchmark.py, on-policy sections (ppo, fine_grained): each measurement kind in-process on a tiny
random policy, the phase shares, and the extra table."""

from __future__ import annotations

import math

import pytest


@pytest.fixture(scope="module")
def bench():
    from tests.conftest import load_script

    return load_script("benchmark")


def tiny_args(bench):
    return bench.build_parser().parse_args(
        ["--hidden-size", "32", "--layers", "1", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--device", "cpu",
         "--max-new-tokens", "4", "--ppo-epochs", "1", "--num-minibatches", "1"]
    )


def test_generation_comparison_draws_the_same_tokens_and_times_both(bench):
    result = bench._measure_onpolicy("ppo_generate", tiny_args(bench))
    for key in ("ours", "ours_cpu", "bare", "bare_cpu"):
        assert len(result[key]) == 2 and all(t > 0 for t in result[key]), key
    # 2 prompts x 2 samples x at most 4 decoded positions (it raises if the two draws differ)
    assert all(0 < tokens <= 16 for tokens in result["tokens"])


@pytest.mark.parametrize("kind", ["ppo", "ppo_padded", "fine_grained", "fine_grained_sequence"])
def test_step_phases_are_timed_and_restored(bench, kind):
    import rlhf_lightning.rollout as rollout_lib

    originals = rollout_lib.generate, rollout_lib.policy_forward
    args = tiny_args(bench)
    result = bench._measure_onpolicy(kind, args)
    assert (rollout_lib.generate, rollout_lib.policy_forward) == originals  # the wrappers do not leak
    assert len(result["steps"]) == 2 and result["episodes"] == 4
    for step in result["steps"]:
        for phase in ("generation", "logprob/value forwards", "reward scoring", "reward shaping", "updates"):
            assert step["phase_wall"][phase] > 0, phase
        assert sum(step["phase_wall"].values()) <= step["wall"]  # phases are disjoint parts of the step
    row = bench._onpolicy_row(kind, "module", result, args)
    shares = [float(v.rstrip("%")) for k, v in row["extra"].items() if k.startswith("share: ")]
    assert math.isclose(sum(shares), 100.0, abs_tol=0.5) and min(shares[:-1]) > 0
    table = bench.to_markdown([row], args)
    assert f"| {kind} | module |" in table and "share: generation" in table and "share: updates" in table


def test_unknown_kind_is_rejected(bench):
    with pytest.raises(ValueError, match="unknown on-policy kind"):
        bench._measure_onpolicy("nope", tiny_args(bench))


def test_update_forward_rows_compare_padded_and_padding_free(bench):
    """The update-forward rows time both layouts on the same minibatches (it raises if their log-probs or
    values differ) and count tokens: packed rows never compute more than the padded minibatch."""
    args = tiny_args(bench)
    result = bench._measure_onpolicy("ppo_update", args)
    for shape in ("as sampled", "variable completions"):
        measured = result[shape]
        for key in ("padded", "padded_cpu", "padding_free", "padding_free_cpu"):
            assert len(measured[key]) == 2 and all(t > 0 for t in measured[key]), (shape, key)
        for useful, packed, padded in zip(measured["useful_tokens"], measured["packed_tokens"], measured["padded_tokens"]):
            assert 0 < useful <= packed <= padded
    # the cut completions are shorter (the tiny policy's completions have up to 4 tokens)
    assert sum(result["variable completions"]["useful_tokens"]) <= sum(result["as sampled"]["useful_tokens"])
    rows = bench.update_forward_rows(result, args)
    assert len(rows) == 4 and rows[0]["overhead"] == 1.0 and rows[2]["overhead"] == 1.0
    table = bench.to_markdown(rows, args)
    assert "update fwd+bwd, variable completions, padding-free" in table and "padding share" in table
