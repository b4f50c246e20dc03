"""configs/strategy/*.yaml: each composes with a method config as a second ``--config`` (only trainer keys
change), and builds the strategy it promises with the settings its comments describe.

FSDP1 and DeepSpeed need CUDA (Lightning refuses them on CPU), so they are validated here by parsing
and instantiating the strategy object, not by running it. ``fsdp2.yaml`` also runs end to end through
the CLI on 2 CPU processes (DPO with validation, a sharded checkpoint and the HF export).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, Strategy

from rlhf_lightning.strategies import FSDP2Strategy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STRATEGY_DIR = os.path.join(REPO, "configs", "strategy")
# Each strategy with a different method config, so that every method config is composed with one.
PAIRINGS = {
    "ddp": "reward_model.yaml",
    "fsdp2": "ppo.yaml",
    "fsdp": "dpo.yaml",
    "deepspeed_zero2": "sft.yaml",
    "deepspeed_zero3": "fine_grained.yaml",
}


def composed_config(capsys, method_config: str, strategy: str) -> dict:
    from rlhf_lightning.cli import cli_main

    method_path = os.path.join(REPO, "configs", method_config)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", method_path, "--config", os.path.join(STRATEGY_DIR, f"{strategy}.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    # Libraries imported while parsing may log to stdout first (DeepSpeed does): start at the config's header.
    return yaml.safe_load(printed[printed.find("# lightning.pytorch=="):])


def instantiate_strategy(spec: dict) -> Strategy:
    """The strategy object from its ``class_path``/``init_args``, as LightningCLI's parser builds it."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=Strategy)
    return parser.instantiate(parser.parse_object({"strategy": spec})).strategy


def test_every_strategy_config_is_tested():
    assert sorted(f[: -len(".yaml")] for f in os.listdir(STRATEGY_DIR) if f.endswith(".yaml")) == sorted(PAIRINGS)


@pytest.mark.parametrize("strategy", sorted(PAIRINGS))
def test_strategy_config_composes_with_a_method_config(capsys, strategy):
    """The strategy file changes trainer.strategy / devices / precision and nothing else."""
    method_config = PAIRINGS[strategy]
    with open(os.path.join(REPO, "configs", method_config)) as f:
        method = yaml.safe_load(f)
    with open(os.path.join(STRATEGY_DIR, f"{strategy}.yaml")) as f:
        fragment = yaml.safe_load(f)
    assert set(fragment) == {"trainer"}, "a strategy file holds trainer keys only"
    assert set(fragment["trainer"]) <= {"strategy", "devices", "precision", "num_nodes"}
    config = composed_config(capsys, method_config, strategy)
    trainer = config["trainer"]
    assert trainer["strategy"]["class_path"] == fragment["trainer"]["strategy"]["class_path"]
    assert trainer["precision"] == fragment["trainer"]["precision"]
    for key, value in method["trainer"].items():  # the method's own trainer settings survive the merge
        if key in fragment["trainer"] or key == "callbacks":
            continue
        if isinstance(value, dict):  # a class_path spec: printed with every default filled in
            assert trainer[key]["class_path"] == value["class_path"], key
            assert value.get("init_args", {}).items() <= trainer[key]["init_args"].items(), key
        else:
            assert trainer[key] == value, key
    assert [c["class_path"] for c in trainer["callbacks"]] == [c["class_path"] for c in method["trainer"]["callbacks"]]
    assert config["model"]["class_path"] == method["model"]["class_path"]


def _strategy_spec(capsys, strategy: str) -> dict:
    return composed_config(capsys, PAIRINGS[strategy], strategy)["trainer"]["strategy"]


def test_ddp_config(capsys):
    strategy = instantiate_strategy(_strategy_spec(capsys, "ddp"))
    assert type(strategy) is DDPStrategy
    assert strategy._ddp_kwargs["find_unused_parameters"] is False


def test_fsdp2_config(capsys):
    from torch.distributed.fsdp import OffloadPolicy

    strategy = instantiate_strategy(_strategy_spec(capsys, "fsdp2"))
    assert type(strategy) is FSDP2Strategy
    plan = strategy.plan
    assert (plan.frozen_models, plan.reshard_after_forward, plan.activation_checkpointing, plan.cpu_offload) == ("shard", True, False, False)
    policy = plan.mp_policy()
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert type(plan.offload_policy()) is OffloadPolicy  # the base class: no offloading
    # Pure FSDP: the whole world is one data-parallel dimension, never tensor parallel.
    assert strategy._tensor_parallel_size == 1 and strategy._data_parallel_size == "auto"
    assert strategy._save_distributed_checkpoint is True


def test_fsdp_config_wraps_each_decoder_layer(capsys, tiny_model):
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    strategy = instantiate_strategy(_strategy_spec(capsys, "fsdp"))
    assert type(strategy) is FSDPStrategy
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy.cpu_offload.offload_params is False
    assert strategy._state_dict_type == "sharded"
    assert strategy.kwargs["use_orig_params"] is True  # units mixing trainable and frozen parameters
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    # The policy's classes pick exactly the transformer blocks of a (tiny Llama) model.
    classes = tuple(policy._module_classes)
    wrapped = [type(m).__name__ for m in tiny_model.modules() if isinstance(m, classes)]
    assert wrapped == ["LlamaDecoderLayer"] * tiny_model.config.num_hidden_layers


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs(capsys, stage):
    spec = _strategy_spec(capsys, f"deepspeed_zero{stage}")
    assert spec["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    args = spec["init_args"]
    assert args["stage"] == stage and args["offload_optimizer"] is False
    assert args["exclude_frozen_parameters"] is True and args["zero_allow_untested_optimizer"] is True
    pytest.importorskip("deepspeed", reason="instantiating DeepSpeedStrategy needs `pip install rlhf-lightning[deepspeed]`")
    strategy = instantiate_strategy(spec)
    assert type(strategy) is DeepSpeedStrategy
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == stage
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    assert strategy.exclude_frozen_parameters is True


@pytest.mark.distributed
def test_fsdp2_config_runs_dpo_through_the_cli(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    """``--config configs/dpo.yaml --config configs/strategy/fsdp2.yaml`` on 2 CPU processes, bf16 FSDP2
    mixed precision as configured: validation, a sharded checkpoint and a reloadable consolidated export."""
    import json

    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    pairs = os.path.join(assets_dir, "pairs_tiny.jsonl")
    args = [
        "fit", "--config", os.path.join(REPO, "configs", "dpo.yaml"), "--config", os.path.join(STRATEGY_DIR, "fsdp2.yaml"),
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false", f"--run_dir={run_dir}",
        f"--model.init_args.model={json.dumps(tiny_config)}", f"--model.init_args.tokenizer={tokenizer_dir}",
        # The precomputed, disk-cached reference under sharding (the config's default is the live one).
        "--model.init_args.precompute_reference=true", f"--model.init_args.reference_cache_dir={tmp_path / 'ref_cache'}",
        "--model.init_args.optim.warmup_steps=0",
        f"--data.init_args.train_file={pairs}", f"--data.init_args.val_file={pairs}", "--data.init_args.batch_size=2",
    ]
    env = {**os.environ, "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_lightning.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    (last,) = run_dir.rglob("last.ckpt")
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # a sharded checkpoint: one file per rank
    for name in ("final", "best"):
        model = AutoModelForCausalLM.from_pretrained(str(run_dir / "hf" / name))
        assert model.config.num_hidden_layers == tiny_config["num_hidden_layers"]
    metrics = (run_dir / "logs").rglob("metrics.csv")
    assert any("val/loss" in path.read_text() for path in metrics)


@pytest.mark.distributed
def test_fsdp2_run_resumes_exactly_from_a_sharded_checkpoint(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    """DPO under configs/strategy/fsdp2.yaml on 2 CPU processes: 4 steps straight through, saving a
    sharded checkpoint at step 2; resuming from it and running to step 4 gives the same exported weights.
    (The frozen reference is left out of the checkpoint; before the module's state dict left it out too,
    torch.distributed.checkpoint refused to load: "Missing key in checkpoint state_dict: ...ref_model...".)"""
    import json

    from safetensors.torch import load_file

    pairs = os.path.join(assets_dir, "pairs_tiny.jsonl")  # 32 pairs / (8 x 2 ranks): step 2 ends an epoch
    base = [
        "fit", "--config", os.path.join(REPO, "configs", "dpo.yaml"), "--config", os.path.join(STRATEGY_DIR, "fsdp2.yaml"),
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.max_steps=4", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        f"--model.init_args.model={json.dumps(tiny_config)}", f"--model.init_args.tokenizer={tokenizer_dir}",
        "--model.init_args.optim.warmup_steps=0",
        f"--data.init_args.train_file={pairs}", f"--data.init_args.val_file={pairs}", "--data.init_args.batch_size=8",
    ]
    every_two = json.dumps({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "dirpath": str(tmp_path / "every2"), "every_n_train_steps": 2, "save_top_k": -1, "filename": "s{step}"}})
    env = {**os.environ, "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)

    def run(*extra):
        result = subprocess.run([sys.executable, "-m", "rlhf_lightning.cli", *base, *extra], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    run(f"--run_dir={tmp_path / 'straight'}", f"--trainer.callbacks+={every_two}")
    checkpoint = tmp_path / "every2" / "sstep=2.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata.keys()
    assert any(".model.embed_tokens." in key for key in stored)  # the policy is in it ...
    assert not any("ref_model." in key for key in stored)  # ... the frozen reference is not
    run(f"--run_dir={tmp_path / 'resumed'}", f"--ckpt_path={checkpoint}")

    def weights(run_name):
        (path,) = (tmp_path / run_name / "hf" / "final").glob("*.safetensors")
        return load_file(str(path))

    straight, resumed = weights("straight"), weights("resumed")
    assert straight.keys() == resumed.keys()
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
