"""scripts/interpolate.py on tiny models: each row is the evaluation of the right merged model (alpha 0 is the
initial policy with KL exactly 0, alpha 1 is the trained one, the midpoint, a per-layer merge and a SLERP merge
equal evaluate_policy on hand-built weights), the CSV and PNG are written, bad arguments are refused."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from rlhf_lightning.evaluation import evaluate_policy
from rlhf_lightning.models import load_causal_lm, load_tokenizer

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
OBJECTIVES = ["sentiment", "fluency"]
EVAL = dict(num_prompts=6, max_new_tokens=5)


def load_script():
    from tests.conftest import load_script as load

    return load("interpolate")


@pytest.fixture()
def policies(tmp_path, tokenizer, tiny_config):
    """init, trained = init + noise, other = init + other noise; saved with the tokenizer. Returns dirs and states."""
    torch.manual_seed(0)
    init = load_causal_lm(tiny_config, tokenizer=tokenizer)
    states = {"init": {k: v.clone() for k, v in init.state_dict().items()}}
    for seed, name in ((1, "trained"), (2, "other")):
        generator = torch.Generator().manual_seed(seed)
        states[name] = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in states["init"].items()}
    dirs = {}
    for name, state in states.items():
        init.load_state_dict(state)
        init.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        dirs[name] = str(tmp_path / name)
    return dirs, states


def evaluate_state(state, tiny_config, tokenizer_dir, prompts, reference):
    """What the script should report for these weights: evaluate_policy with the script's settings."""
    tokenizer = load_tokenizer(tokenizer_dir, padding_side="left")
    model = load_causal_lm(tiny_config, tokenizer=tokenizer)
    model.load_state_dict(state)
    return evaluate_policy(model.eval(), tokenizer, prompts, scorers=OBJECTIVES, reference=reference.eval(),
                           max_new_tokens=EVAL["max_new_tokens"], seed=0, batch_size=50).metrics


def test_rows_are_the_evaluations_of_the_merged_models(policies, tmp_path, assets_dir, tiny_config):
    script = load_script()
    dirs, states = policies
    prompts_file = os.path.join(assets_dir, "prompts_tiny.jsonl")
    out = tmp_path / "out"
    layer_spec = {"0": 0.0, "default": 1.0}
    assert script.main([
        "--init", dirs["init"], "--trained", dirs["trained"], "--out", str(out), "--alphas", "0", "0.5", "1",
        "--layer-alphas", json.dumps(layer_spec), "--slerp-with", dirs["other"], "--slerp-t", "0.5",
        "--runs", f"as_trained={dirs['trained']}", "--prompts", prompts_file, "--objectives", *OBJECTIVES,
        "--num-prompts", str(EVAL["num_prompts"]), "--max-new-tokens", str(EVAL["max_new_tokens"]),
    ]) == 0
    with open(out / "interpolate.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["kind"], r["label"]) for r in rows] == [
        ("interpolation", "alpha=0"), ("interpolation", "alpha=0.5"), ("interpolation", "alpha=1"),
        ("per_layer", json.dumps(layer_spec)), ("slerp", "slerp t=0.5"), ("run", "as_trained"),
    ]
    assert (out / "interpolate.png").stat().st_size > 0
    by_label = {r["label"]: {k: v for k, v in r.items()} for r in rows}
    metric_names = [f"gold/{name}" for name in OBJECTIVES] + ["kl_to_reference", "response_length"]

    # alpha 0 is the initial policy itself: the KL to it is exactly 0
    assert float(by_label["alpha=0"]["kl_to_reference"]) == 0.0
    # alpha 1 is the trained policy: the same numbers as the trained run evaluated directly
    for name in metric_names:
        assert float(by_label["alpha=1"][name]) == float(by_label["as_trained"][name]), name
    assert float(by_label["alpha=1"]["kl_to_reference"]) > 0

    # the midpoint, the per-layer merge and the SLERP merge, built by hand from the weights
    init, trained, other = states["init"], states["trained"], states["other"]
    midpoint = {k: 0.5 * init[k] + 0.5 * trained[k] for k in init}
    layer0_init = {k: (init[k] if ".layers.0." in k else trained[k]) for k in init}
    unit = {}  # slerp at t = 1/2 of task vectors u, v: (u + v) / (2 cos(omega / 2)), per tensor
    for k in init:
        u, v = trained[k] - init[k], other[k] - init[k]
        omega = torch.arccos((u.flatten() @ v.flatten()) / (u.norm() * v.norm()))
        unit[k] = init[k] + (u + v) * torch.sin(omega / 2) / torch.sin(omega)
    reference = load_causal_lm(dirs["init"])
    with open(prompts_file) as handle:
        prompts = [json.loads(line)["prompt"] for line in handle][: EVAL["num_prompts"]]
    for label, state in (("alpha=0.5", midpoint), (json.dumps(layer_spec), layer0_init), ("slerp t=0.5", unit)):
        want = evaluate_state(state, tiny_config, dirs["init"], prompts, reference)
        for name in metric_names:
            assert float(by_label[label][name]) == pytest.approx(want[name], rel=1e-4, abs=1e-5), (label, name)


def test_runs_only_report_adds_the_initial_policy(policies, tmp_path, assets_dir):
    script = load_script()
    dirs, _ = policies
    args = script.parse_args([
        "--init", dirs["init"], "--out", str(tmp_path / "report"), "--runs", f"a={dirs['trained']}", f"b={dirs['other']}",
        "--prompts", os.path.join(assets_dir, "prompts_tiny.jsonl"), "--objectives", "sentiment", "--num-prompts", "3",
        "--max-new-tokens", "3",
    ])
    rows = script.run(args)
    assert [(row["kind"], row["label"]) for row in rows] == [("init", "init"), ("run", "a"), ("run", "b")]
    assert rows[0]["kl_to_reference"] == 0.0 and rows[0]["n_samples"] == 3


def test_layer_spec_that_misses_parameters_fails_before_evaluating(policies, tmp_path, assets_dir, monkeypatch):
    script = load_script()
    dirs, _ = policies
    monkeypatch.setattr(script, "evaluate_policy", lambda *a, **k: pytest.fail("evaluated before checking the spec"))
    args = script.parse_args([
        "--init", dirs["init"], "--trained", dirs["trained"], "--out", str(tmp_path), "--layer-alphas", '{"0": 0.5}',
        "--prompts", os.path.join(assets_dir, "prompts_tiny.jsonl"),
    ])
    with pytest.raises(ValueError, match="default"):
        script.run(args)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--alphas", "0.5"], "need --trained"),
        ([], "nothing to evaluate"),
        (["--trained", "T", "--layer-alphas", "{bad json"], "layer-alphas"),
        (["--trained", "T", "--layer-alphas", '{"0-x": 0.5}'], "Bad layer range"),
        (["--trained", "T", "--alphas", "nan"], "finite"),
        (["--runs", "no_equals_sign"], "LABEL=DIR"),
        (["--trained", "T", "--objectives", "humour"], "unknown objectives"),
    ],
)
def test_bad_arguments_are_refused(extra, message, tmp_path, assets_dir, capsys):
    script = load_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--init", "I", "--out", str(tmp_path), "--prompts", os.path.join(assets_dir, "prompts_tiny.jsonl"),
                           *extra])
    assert message in capsys.readouterr().err
