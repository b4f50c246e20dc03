"""scripts/gpu_check.py: its arithmetic and plan in-process, and its CPU smoke mode end to end (one subprocess
per run, single device and FSDP2, the resume comparison, CUDA-only strategies and absent features skipped
with their reason), so the script that a GPU session runs once does not rot between GPU sessions."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def script():
    """scripts/gpu_check.py as a module, registered in ``sys.modules`` first (its dataclass needs that)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("script_gpu_check", os.path.join(REPO, "scripts", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ---- arithmetic ------------------------------------------------------------------------------------


def test_matmul_params_leave_out_an_untied_input_embedding(script, tokenizer, tiny_config):
    from rlhf_lightning.models import load_causal_lm

    untied = load_causal_lm(tiny_config, tokenizer=tokenizer)
    embedding = untied.get_input_embeddings().weight.numel()
    assert script.matmul_params(untied) == sum(p.numel() for p in untied.parameters()) - embedding
    tied = load_causal_lm({**tiny_config, "tie_word_embeddings": True}, tokenizer=tokenizer)
    # Tied: the shared matrix is the LM head's, counted once (parameters() yields it once).
    assert script.matmul_params(tied) == sum(p.numel() for p in tied.parameters())


def test_step_flops_by_hand(script):
    n, tokens = 10, 100
    assert script.step_flops("sft", n, tokens, lora=False) == (6000, 6000)
    assert script.step_flops("rm", n, tokens, lora=True) == (4000, 4000)  # LoRA: no weight gradients for frozen weights
    assert script.step_flops("dpo_precomputed", n, tokens, lora=False) == (6000, 6000)
    assert script.step_flops("dpo_live", n, tokens, lora=False) == (6000, 8000)  # + the reference forward, 2N per token
    # PPO: 50 rollout tokens trained for 2 epochs (6N each), 30 decoded positions (2N), policy + reference
    # forwards over the rollout (2N each).
    ppo = {"rollout_tokens": 50, "decoded": 30, "epochs": 2, "reference_forward": 1}
    assert script.step_flops("ppo", n, None, lora=False, ppo=ppo) == (6000, 6000 + 20 * (30 + 50 * 2))


def test_count_tokens_counts_prompt_and_completion_of_every_sequence(script):
    assert script.count_tokens("sft", [{"prompt_ids": [1, 2], "completion_ids": [3, 4, 5]}, {"prompt_ids": [1], "completion_ids": [2]}]) == 7
    pair = {"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6]}
    assert script.count_tokens("dpo_live", [pair]) == 2 * 2 + 3 + 1


def test_records_are_one_token_per_word_within_the_lengths(script, tmp_path):
    from rlhf_lightning.models import load_tokenizer

    shapes = script.SHAPES["tiny"]
    tokenizer = load_tokenizer(script._tokenizer_dir(str(tmp_path), 64))
    assert len(tokenizer) == 64
    for record in script.make_records("dpo_live", shapes, words=64 - script.NON_WORD_IDS):
        for side in ("chosen", "rejected"):
            ids = tokenizer(record[side], add_special_tokens=False)["input_ids"]
            assert shapes["completion_len"] // 2 <= len(ids) <= shapes["completion_len"]
            assert tokenizer.unk_token_id not in ids


def test_loss_checks(script):
    ln2 = math.log(2)
    good = script.loss_checks("dpo_live", "train", [ln2, 0.6, 0.5], None)
    assert good["loss_finite"] and good["moved"] and good["first_loss_is_ln2"]
    stuck = script.loss_checks("sft", "train", [2.0, 2.0, 2.1], None)
    assert stuck["loss_finite"] and not stuck["moved"]
    assert not script.loss_checks("rm", "train", [0.7, float("nan"), 0.5], None)["loss_finite"]
    assert not script.loss_checks("dpo_live", "train", [0.9, 0.5], None)["first_loss_is_ln2"]
    assert "first_loss_is_ln2" not in script.loss_checks("dpo_live", "resume_second", [0.5, 0.4], None)  # starts mid-run
    online = script.loss_checks("ppo", "train", [-0.1, 0.2], [0.0, 0.03])
    assert online["moved"] and online["first_rollout_kl_is_0"]
    assert not script.loss_checks("ppo", "train", [-0.1, 0.2], [0.0, 0.0])["moved"]  # the policy never left the reference
    assert not script.loss_checks("ppo", "train", [-0.1, 0.2], [0.5, 0.6])["first_rollout_kl_is_0"]
    assert script.loss_checks("grpo", "train", [0.1, 0.2], [None, None])["moved"]  # no KL logged: the loss changed


def test_compare_resume(script):
    full = {"status": "ok", "losses": [0.7, 0.6, 0.5, 0.4]}
    assert script.compare_resume(full, {"status": "ok", "losses": [0.5, 0.4]}, 2, 1e-5)["status"] == "ok"
    verdict = script.compare_resume(full, {"status": "ok", "losses": [0.5, 0.41]}, 2, 1e-5)
    assert verdict["status"] == "failed" and math.isclose(verdict["max_abs_diff"], 0.01)
    assert script.compare_resume(full, {"status": "failed"}, 2, 1e-5)["status"] == "not run"


# ---- the plan ---------------------------------------------------------------------------------------


def test_plan_covers_every_strategy_and_method(script):
    plan = script.build_plan(tiny=False, resume_strategy="deepspeed_zero3")
    runs = [r for item in plan for r in (item if isinstance(item, list) else [item])]
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    for strategy in script.STRATEGIES:
        for method in ("sft", "rm", "dpo_live", "dpo_precomputed", "ppo"):
            assert f"qwen2-0.5b/{strategy}/{method}" in names
    assert {"llama-1.5b/single/sft", "llama-1.5b/single/ppo", "llama-1.5b/deepspeed_zero3/dpo_live"} <= set(names)
    (resume,) = [item for item in plan if isinstance(item, list)]
    assert [r.kind for r in resume] == ["resume_full", "resume_first", "resume_second"]
    assert {r.strategy for r in resume} == {"deepspeed_zero3"}
    assert {"padding_free", "lora"} <= {v for r in runs for v in r.variants} and "grpo" in {r.method for r in runs}
    # Every strategy's first steps come before the larger model and the remaining methods.
    assert names.index("qwen2-0.5b/fsdp/ppo") < names.index("llama-1.5b/single/sft") < names.index("qwen2-0.5b/fsdp/rm")
    selected = script.select(plan, ["*/fsdp2/*"])
    assert selected and all(r.strategy == "fsdp2" for r in selected)


def test_skips_name_their_reason(script):
    Run = script.Run
    assert "needs CUDA" in script.unsupported(Run("tiny-qwen2", "deepspeed_zero3", "sft"), "cpu")
    assert "needs CUDA" in script.unsupported(Run("tiny-qwen2", "fsdp", "sft"), "cpu")
    assert script.unsupported(Run("tiny-qwen2", "fsdp2", "ppo"), "cpu") is None
    import rlhf_lightning.modules as modules

    grpo = script.unsupported(Run("tiny-qwen2", "single", "grpo"), "cpu")
    assert (grpo is None) == hasattr(modules, "GRPOModule")
    lora = script.unsupported(Run("tiny-qwen2", "single", "dpo_live", ("lora",)), "cpu")
    assert (lora is None) == script._accepts(modules.DPOModule, "peft")


def test_features_join_the_check_once_the_modules_accept_them(script, monkeypatch):
    """Padding-free batches, LoRA and GRPO are built elsewhere: a module that takes ``padding_free`` / ``peft``,
    and a ``GRPOModule``, are picked up with no edit to the script, and get the arguments of their variant."""
    import rlhf_lightning.modules as modules

    class FeatureDPO(modules.DPOModule):
        def __init__(self, *args, padding_free: bool = True, peft: dict | None = None, **kwargs):
            super().__init__(*args, **kwargs)

    class GRPOModule(modules.PPOModule):
        pass

    monkeypatch.setattr(modules, "DPOModule", FeatureDPO)
    monkeypatch.setattr(modules, "GRPOModule", GRPOModule, raising=False)
    Run = script.Run
    for run in (Run("tiny-qwen2", "single", "dpo_live", ("lora",)), Run("tiny-qwen2", "fsdp2", "dpo_live", ("padding_free",)),
                Run("tiny-qwen2", "single", "grpo")):
        assert script.unsupported(run, "cpu") is None, run.name
    shapes = script.SHAPES["tiny"]
    lora = script._module_kwargs(Run("m", "single", "dpo_live", ("lora",)), FeatureDPO, {}, "tok", shapes, 1e-3)
    assert lora["peft"] == script.LORA and lora["padding_free"] is False and lora["precompute_reference"] is False
    packed = script._module_kwargs(Run("m", "single", "dpo_precomputed", ("padding_free",)), FeatureDPO, {}, "tok", shapes, 1e-3)
    assert packed["padding_free"] is True and "peft" not in packed and packed["precompute_reference"] is True
    grpo = script._module_kwargs(Run("m", "single", "grpo"), GRPOModule, {}, "tok", shapes, 1e-3)
    assert grpo["sampling"]["num_samples_per_prompt"] == shapes["grpo_group"] and "policy" in grpo


# ---- the CPU smoke mode, end to end --------------------------------------------------------------

SMOKE_RUNS = [
    "tiny-qwen2/single/sft", "tiny-qwen2/single/dpo_precomputed", "tiny-qwen2/single/ppo", "tiny-qwen2/fsdp2/dpo_live",
    "tiny-qwen2/fsdp2/dpo_live:resume-*", "tiny-qwen2/deepspeed_zero3/sft", "tiny-qwen2/fsdp/ppo", "tiny-qwen2/single/grpo",
]


@pytest.mark.slow
def test_cpu_smoke_mode(tmp_path):
    """Each run in its own process: single device and FSDP2 train (finite losses that fall, DPO starting at
    ln 2, PPO's first KL 0 and in-step generation measured against bare ``generate``), the FSDP2 resume gives
    the uninterrupted losses, CUDA-only strategies are skipped with their reason, and both reports are written."""
    out = tmp_path / "check"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "gpu_check.py"), "--device", "cpu", "--tiny", "--out", str(out),
         "--jobs", "2", "--runs", *SMOKE_RUNS],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    document = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in document["runs"]}
    trained = ["tiny-qwen2/single/sft", "tiny-qwen2/single/dpo_precomputed", "tiny-qwen2/single/ppo", "tiny-qwen2/fsdp2/dpo_live"]
    for name in trained:
        run = runs[name]
        assert run["status"] == "ok", run
        assert all(v for v in run["checks"].values() if isinstance(v, bool)), run["checks"]
        assert run["tokens_per_s"] > 0 and run["items_per_s"] > 0 and run["timed_steps"] >= 1
        assert run["peak_rss_mib"] > 0
    assert runs["tiny-qwen2/fsdp2/dpo_live"]["strategy_class"] == "FSDP2Strategy"
    assert runs["tiny-qwen2/single/dpo_precomputed"]["losses"][0] == pytest.approx(math.log(2), abs=1e-4)
    generation = runs["tiny-qwen2/single/ppo"]["generation"]
    assert generation["in_step_tokens_per_s"] > 0 and generation["bare"]["tokens_per_s"] > 0
    for name in ("tiny-qwen2/deepspeed_zero3/sft", "tiny-qwen2/fsdp/ppo"):
        assert runs[name]["status"] == "skipped" and "needs CUDA" in runs[name]["reason"]
    assert runs["tiny-qwen2/single/grpo"]["status"] in ("ok", "skipped")
    resume = document["resume"]
    assert resume["status"] == "ok" and resume["max_abs_diff"] <= 1e-5, resume
    table = (out / "results.md").read_text()
    assert "| tiny-qwen2/single/ppo | ok |" in table and "Resume (tiny-qwen2, fsdp2, dpo_live): **ok**" in table
    assert not (out / "work").exists()  # checkpoints are cleaned up
    assert (out / "logs" / "tiny-qwen2__single__sft.log").exists()
