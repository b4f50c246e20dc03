"""DDP and FSDP2 (ModelParallelStrategy) on 2 CPU processes train exactly what one process trains.

For the reward model, DPO, PPO (shared-trunk and separate critic), GRPO and REINFORCE++, the per-step losses of a 2-rank run
(mean over ranks) equal the single-process losses on the same global batch to 1e-4; what "the same
global batch" means, for PPO in particular, is worked out in ``parity_kit``'s docstring. Under FSDP2 the
consolidated HF export reloads with ``from_pretrained`` and gives the sharded model's outputs, the
frozen reference is sharded (or replicated when asked), and generation all-gathers each unit once per
call, not once per token.

Each strategy is launched once (one script, both ranks, every variant in turn) and its results are
shared by the tests below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import parity_kit as kit  # noqa: E402

pytestmark = pytest.mark.distributed

DISTRIBUTED_VARIANTS = {
    "ddp": ["reward_model", "dpo", "ppo", "ppo_critic", "dpo_precomputed", "grpo", "reinforce_pp", "dpo_lora", "ppo_lora"],
    "fsdp2": ["reward_model", "dpo", "ppo", "ppo_critic", "dpo_fsdp2_options", "grpo", "reinforce_pp", "reward_model_lora", "dpo_lora",
              "ppo_lora"],
}
LOSS_KEYS = {
    "reward_model": ["train/loss"], "dpo": ["train/loss"], "ppo": ["loss/policy", "loss/value"],
    "grpo": ["loss/policy", "loss/kl"], "reinforce_pp": ["loss/policy"],
}


def launch(strategy: str, out_dir: str, tokenizer_dir: str, variants: list[str]) -> None:
    """Run ``parity_kit.py`` under ``strategy`` on 2 CPU processes (Lightning starts the second one)."""
    env = {**os.environ, "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "parity_kit.py"), strategy, "2", out_dir, tokenizer_dir, *variants],
        cwd=out_dir, env=env, capture_output=True, text=True, timeout=420,
    )
    assert result.returncode == 0, f"{strategy} run failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory, tokenizer_dir) -> str:
    out = str(tmp_path_factory.mktemp("single"))
    for variant in sorted(set(kit.REFERENCE_VARIANT.values())):
        kit.run_variant(variant, "single", 1, out, tokenizer_dir)
    return out


@pytest.fixture(scope="module")
def distributed_dirs(tmp_path_factory, tokenizer_dir):
    """``{strategy: output folder}``, each strategy launched on first use."""
    dirs: dict[str, str] = {}

    def get(strategy: str) -> str:
        if strategy not in dirs:
            out = str(tmp_path_factory.mktemp(strategy))
            launch(strategy, out, tokenizer_dir, DISTRIBUTED_VARIANTS[strategy])
            dirs[strategy] = out
        return dirs[strategy]

    return get


def read_ranks(folder: str, variant: str) -> list[dict]:
    records = [json.load(open(os.path.join(folder, variant, f"metrics_rank{rank}.json"))) for rank in (0, 1)]
    assert all(record["world_size"] == 2 for record in records)
    return records


CASES = [(strategy, variant) for strategy, variants in DISTRIBUTED_VARIANTS.items() for variant in variants]


@pytest.mark.parametrize("strategy,variant", CASES, ids=[f"{s}-{v}" for s, v in CASES])
def test_losses_match_single_process(strategy, variant, single_dir, distributed_dirs):
    method = kit.VARIANTS[variant][0]
    ranks = read_ranks(distributed_dirs(strategy), variant)
    (single,) = [json.load(open(os.path.join(single_dir, kit.REFERENCE_VARIANT[variant], "metrics_rank0.json")))]
    assert len(single["metrics"]) == kit.MAX_STEPS
    for step, expected in enumerate(single["metrics"]):
        rows = [record["metrics"][step] for record in ranks]
        # The ranks together saw exactly the single process's batch (see parity_kit's docstring).
        assert sorted(rows[0]["index"] + rows[1]["index"]) == sorted(expected["index"])
        assert not set(rows[0]["index"]) & set(rows[1]["index"])
        for key in LOSS_KEYS[method]:
            mean = (rows[0][key] + rows[1][key]) / 2
            assert mean == pytest.approx(expected[key], abs=1e-4), f"step {step} {key}: {mean} vs single {expected[key]}"
    if method == "grpo":  # the KL term really drove the updates (zero advantages otherwise: a vacuous match)
        assert any(abs(row["loss/kl"]) > 1e-3 for row in single["metrics"])
    if method in kit.ON_POLICY:
        # Equal token counts per rank, and the ranks' greedy completions are the single process's.
        for step, expected in enumerate(single["rollouts"]):
            parts = [record["rollouts"][step] for record in ranks]
            assert parts[0]["tokens"] == parts[1]["tokens"] == expected["tokens"] // 2
            by_index = dict(zip(expected["index"], expected["completions"]))
            for part in parts:
                assert part["completions"] == [by_index[i] for i in part["index"]]


@pytest.mark.parametrize("variant", ["reward_model", "dpo", "ppo", "ppo_critic", "grpo", "reinforce_pp", "reward_model_lora", "dpo_lora",
                                     "ppo_lora"])
def test_fsdp2_export_reloads_with_the_sharded_models_outputs(variant, distributed_dirs, single_dir):
    """The consolidated HF directory written from the sharded run reloads with ``from_pretrained`` and
    gives the outputs the trained sharded model gave (probe.pt, computed under FSDP2 after fit)."""
    from transformers import AutoModelForCausalLM

    from rlhf_lightning.models import load_reward_model, reward_model_scores

    folder = os.path.join(distributed_dirs("fsdp2"), variant)
    sharded_outputs = torch.load(os.path.join(folder, "probe.pt"))
    ids = torch.tensor(kit.PROBE_IDS)
    mask = torch.ones_like(ids)
    # LoRA: the merged export (base + adapters) is the plain HF directory to compare.
    export = os.path.join(folder, "hf", "final-merged" if variant.endswith("_lora") else "final")
    with torch.no_grad():
        if variant.startswith("reward_model"):
            reloaded = reward_model_scores(load_reward_model(export), ids, mask)
        else:
            reloaded = AutoModelForCausalLM.from_pretrained(export)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(reloaded, sharded_outputs, atol=1e-5, rtol=0)
    # ... and it is the trained model, the one a single process trains, not the initial weights.
    single_outputs = torch.load(os.path.join(single_dir, variant, "probe.pt"))
    torch.testing.assert_close(reloaded, single_outputs, atol=1e-4, rtol=0)


def test_fsdp2_shards_policy_and_reference_by_default(distributed_dirs):
    for variant in ("dpo", "ppo", "ppo_critic"):
        record = read_ranks(distributed_dirs("fsdp2"), variant)[0]
        assert record["policy_sharded"] and record["reference_sharded"], variant


def test_fsdp2_options_replicate_reference_and_checkpoint_activations(distributed_dirs):
    record = read_ranks(distributed_dirs("fsdp2"), "dpo_fsdp2_options")[0]
    assert record["policy_sharded"] and not record["reference_sharded"]
    assert record["gradient_checkpointing"]


def test_fsdp2_generation_gathers_each_unit_once_per_call(distributed_dirs):
    """Decoding GENERATION_TOKENS tokens costs one all-gather per unit, not one per unit per token, and
    decodes what the unsharded export decodes."""
    from transformers import AutoModelForCausalLM

    from rlhf_lightning.generation import generate
    from rlhf_lightning.models import load_tokenizer

    folder = os.path.join(distributed_dirs("fsdp2"), "ppo")
    record = read_ranks(distributed_dirs("fsdp2"), "ppo")[0]["generation"]
    assert record["units_with_parameters"] >= 3  # blocks + embedding + norm + head
    assert min(record["completion_lengths"]) >= kit.MAX_NEW_TOKENS  # several decoding steps (min_new_tokens)
    assert record["all_gathers"] == record["units_with_parameters"]
    export = os.path.join(folder, "hf", "final")
    unsharded = generate(
        AutoModelForCausalLM.from_pretrained(export), load_tokenizer(export), torch.tensor(kit.GENERATION_PROMPTS),
        torch.ones(2, 4, dtype=torch.long), max_new_tokens=kit.GENERATION_TOKENS, do_sample=False,
    )
    assert unsharded.input_ids.tolist() == record["input_ids"]
