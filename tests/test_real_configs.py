"""configs/real/*.yaml (LoRA DPO / PPO of a Hub model, not trained in CI: no Hub access) parse with the
CLI, and build their modules when the Hub name and the reward-model folder point at tiny local models:
the ``peft:`` keys are valid LoRA arguments, the reference is the adapter-disabled base model and the
critic starts from the reward model."""

from __future__ import annotations

import glob
import os

import pytest
import torch

pytest.importorskip("peft")

from rlhf_lightning.cli import cli_main  # noqa: E402
from rlhf_lightning.models import AdapterDisabledReference, load_causal_lm, load_reward_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = sorted(glob.glob(os.path.join(REPO, "configs", "real", "*.yaml")))


def test_there_are_real_configs():
    assert {os.path.basename(p) for p in REAL} >= {"dpo_lora.yaml", "ppo_lora.yaml"}


@pytest.mark.parametrize("path", REAL, ids=os.path.basename)
def test_real_config_parses(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", path, "--print_config"])
    assert exit_info.value.code == 0


@pytest.fixture(scope="module")
def local_models(tmp_path_factory, tokenizer, tiny_config):
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    load_causal_lm(dict(tiny_config), tokenizer=tokenizer).save_pretrained(root / "lm")
    load_reward_model(dict(tiny_config), tokenizer=tokenizer).save_pretrained(root / "rm")
    for name in ("lm", "rm"):
        tokenizer.save_pretrained(root / name)
    return str(root / "lm"), str(root / "rm")


@pytest.mark.parametrize("path", REAL, ids=os.path.basename)
def test_real_config_builds_with_local_models(path, local_models, tmp_path):
    lm, rm = local_models
    key = "policy" if "ppo" in os.path.basename(path) else "model"
    overrides = [f"--model.init_args.{key}={lm}", "--model.init_args.dtype=float32", "--model.init_args.gradient_checkpointing=false",
                 "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]
    if key == "policy":
        overrides += [f"--model.init_args.reward.init_args.model={rm}", f"--model.init_args.critic={rm}"]
    cli = cli_main(["--config", path, *overrides], run=False)
    module = cli.model
    assert isinstance(module.reference, AdapterDisabledReference)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "v_head" in n for n in trainable), trainable
