"""``rlhf-lightning test`` for every module: ``trainer.test`` on a DataModule's ``test_file`` runs the
validation step and logs its metrics as ``test/<name>``, equal to ``trainer.validate`` on the same records
given as ``val_file`` (DPO also with precomputed reference log-probs: the test split is precomputed)."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch

from rlhf_lightning.data import DemonstrationDataModule, PreferenceDataModule, PromptDataModule
from rlhf_lightning.modules import (
    DPOModule,
    FineGrainedPPOModule,
    MODPOModule,
    PPOModule,
    RewardModelModule,
    SFTModule,
)
from rlhf_lightning.rewards import FunctionRewardSource, GoldSegmentScorer, SegmentRewardSpec

from tests.modules.test_ppo import count_positive


def _trainer(tmp_path):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path))


def _module(name, tiny_config, tokenizer_dir):
    torch.manual_seed(0)
    config = dict(tiny_config)
    sampling = {"max_new_tokens": 4, "do_sample": False}
    if name == "sft":
        return SFTModule(config, tokenizer_dir)
    if name == "reward_model":
        return RewardModelModule(config, tokenizer_dir)
    if name in ("dpo", "dpo_precomputed"):
        return DPOModule(config, tokenizer_dir, precompute_reference=name == "dpo_precomputed")
    if name == "modpo":
        return MODPOModule(config, tokenizer_dir, weights=[0.7, 0.3], margin_score_columns=["sentiment"])
    if name == "ppo":
        return PPOModule(config, tokenizer_dir, reward=FunctionRewardSource(count_positive), sampling=sampling)
    if name == "fine_grained":
        spec = SegmentRewardSpec(GoldSegmentScorer("sentiment"), "sentence", weight=1.0)
        return FineGrainedPPOModule(config, tokenizer_dir, segment_rewards=[spec], sampling=sampling)
    raise ValueError(name)


DATA = {
    "sft": (DemonstrationDataModule, "sft_tiny.jsonl"),
    "reward_model": (PreferenceDataModule, "pairs_tiny.jsonl"),
    "dpo": (PreferenceDataModule, "pairs_tiny.jsonl"),
    "dpo_precomputed": (PreferenceDataModule, "pairs_tiny.jsonl"),
    "modpo": (PreferenceDataModule, "pairs_tiny.jsonl"),
    "ppo": (PromptDataModule, "prompts_tiny.jsonl"),
    "fine_grained": (PromptDataModule, "prompts_tiny.jsonl"),
}


@pytest.mark.parametrize("name", list(DATA))
def test_test_metrics_equal_validation_on_the_same_records(name, tmp_path, tiny_config, tokenizer_dir, assets_dir):
    cls, file = DATA[name]
    path = os.path.join(assets_dir, file)
    validated = _trainer(tmp_path).validate(_module(name, tiny_config, tokenizer_dir), datamodule=cls(val_file=path, batch_size=4),
                                            verbose=False)[0]
    tested = _trainer(tmp_path).test(_module(name, tiny_config, tokenizer_dir), datamodule=cls(test_file=path, batch_size=4),
                                     verbose=False)[0]
    assert validated and all(key.startswith("val/") for key in validated)
    assert sorted(tested) == sorted("test/" + key[len("val/"):] for key in validated)
    for key, value in validated.items():
        assert tested["test/" + key[len("val/"):]] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_no_test_data_is_a_clear_error(tmp_path, tiny_config, tokenizer_dir, assets_dir):
    data = PreferenceDataModule(train_file=os.path.join(assets_dir, "pairs_tiny.jsonl"))
    with pytest.raises(ValueError, match="no test data: set test_file"):
        _trainer(tmp_path).test(_module("dpo", tiny_config, tokenizer_dir), datamodule=data)


def test_cli_test_subcommand(tmp_path, tokenizer_dir, assets_dir, capsys):
    """``rlhf-lightning test --config configs/sft.yaml --data.init_args.test_file=...`` logs ``test/loss``."""
    from rlhf_lightning.cli import cli_main

    from tests.modules.test_sft import REPO, TINY_MODEL_ARGS

    cli_main([
        "test", "--config", os.path.join(REPO, "configs", "sft.yaml"), f"--model.init_args.tokenizer={tokenizer_dir}", *TINY_MODEL_ARGS,
        "--data.init_args.train_file=null", "--data.init_args.val_file=null",
        f"--data.init_args.test_file={os.path.join(assets_dir, 'sft_tiny.jsonl')}",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.callbacks=null",
    ])
    printed = capsys.readouterr().out  # Lightning's table of test metrics
    assert "test/loss" in printed and "test/perplexity" in printed
