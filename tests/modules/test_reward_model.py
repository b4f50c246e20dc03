"""RewardModelModule: smoke fit, loss and metrics by hand, export round trip, and a learning test."""

from __future__ import annotations

import math
import os

import lightning as L
import pytest
import torch
from torch.testing import assert_close

from rlhf_lightning.data import PreferenceDataModule
from rlhf_lightning.losses import reward_centering_loss, reward_model_loss
from rlhf_lightning.models import load_causal_lm, load_reward_model, reward_model_scores
from rlhf_lightning.modules import Optimization, RewardModelModule
from rlhf_lightning.modules.reward_model import PairRewardMetrics, pair_reward_stats

from tests.modules.test_pair_forward import make_batch


def tiny_trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def pairs_datamodule(tokenizer_dir, assets_dir, **kwargs) -> PreferenceDataModule:
    return PreferenceDataModule(
        train_file=os.path.join(assets_dir, "pairs_tiny.jsonl"), val_fraction=0.25, tokenizer=tokenizer_dir, batch_size=4, **kwargs
    )


def test_metrics_by_hand():
    """Rewards r_c = [2, 0, 1], r_r = [1, 1, -1] then r_c = [3], r_r = [3]:
    accuracy: (2>1, 0>1, 1>-1, 3>3) -> 2/4 = 0.5; margins 1, -1, 2, 0 -> mean 0.5;
    all rewards [2, 0, 1, 1, 1, -1, 3, 3]: mean 10/8 = 1.25, E[r^2] = 26/8 = 3.25,
    var = 3.25 - 1.5625 = 1.6875, std = 1.2990."""
    first = (torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, -1.0]))
    second = (torch.tensor([3.0]), torch.tensor([3.0]))
    metrics = PairRewardMetrics()
    metrics.update(*first)
    metrics.update(*second)
    got = metrics.compute()
    assert_close(got["accuracy"], torch.tensor(0.5))
    assert_close(got["margin"], torch.tensor(0.5))
    assert_close(got["reward_mean"], torch.tensor(1.25))
    assert_close(got["reward_std"], torch.tensor(math.sqrt(1.6875)))
    # One batch: rewards [2, 0, 1, 1, 1, -1], mean 4/6, accuracy 2/3, margin 2/3.
    batch = pair_reward_stats(*first)
    assert_close(batch["accuracy"], torch.tensor(2 / 3))
    assert_close(batch["margin"], torch.tensor(2 / 3))
    assert_close(batch["reward_mean"], torch.tensor(4 / 6))
    metrics.reset()
    assert not metrics.has_updates


def test_step_loss_is_bradley_terry_with_margin_and_centering(tokenizer, tokenizer_dir, tiny_config):
    torch.manual_seed(0)
    module = RewardModelModule(tiny_config, tokenizer_dir, use_margin=True, center_rewards_coef=0.01)
    module.model.eval()
    batch = make_batch(tokenizer)  # margins 0, 1, 2
    loss, chosen, rejected = module._step(batch)
    expected_chosen = reward_model_scores(module.model, batch["chosen_input_ids"], batch["chosen_attention_mask"])
    expected_rejected = reward_model_scores(module.model, batch["rejected_input_ids"], batch["rejected_attention_mask"])
    expected = reward_model_loss(expected_chosen, expected_rejected, margin=batch["margin"]).mean() + reward_centering_loss(
        expected_chosen, expected_rejected, coef=0.01
    )
    assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    del batch["margin"]
    with pytest.raises(KeyError, match="margin"):
        module._step(batch)


def test_argument_validation(tokenizer_dir, tiny_config):
    with pytest.raises(ValueError, match="center_rewards_coef"):
        RewardModelModule(tiny_config, tokenizer_dir, center_rewards_coef=-1.0)
    assert RewardModelModule(tiny_config, tokenizer_dir, center_rewards_coef=None).center_rewards_coef == 0.0


def test_smoke_fit_logs_metrics_and_exports_a_loadable_reward_model(tmp_path, tokenizer, tokenizer_dir, assets_dir, tiny_config):
    L.seed_everything(0)
    # Start from a causal LM directory (as from the SFT export): a new score head is created.
    lm_dir = tmp_path / "lm"
    load_causal_lm(tiny_config, tokenizer=tokenizer).save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    module = RewardModelModule(str(lm_dir), use_margin=True, optim=Optimization(lr=1e-3))
    trainer = tiny_trainer(tmp_path, val_check_interval=2)
    trainer.fit(module, datamodule=pairs_datamodule(tokenizer_dir, assets_dir))
    logged = trainer.callback_metrics
    for name in ("train/loss", "train/accuracy", "train/margin", "train/reward_mean", "train/reward_std",
                 "val/loss", "val/accuracy", "val/margin", "val/reward_mean", "val/reward_std"):
        assert name in logged and torch.isfinite(logged[name]), name
    assert 0.0 <= float(logged["val/accuracy"]) <= 1.0

    exported = module.export_model()
    assert exported.config.num_labels == 1
    out_dir = tmp_path / "rm"
    exported.save_pretrained(out_dir)
    module.tokenizer.save_pretrained(out_dir)
    reloaded = load_reward_model(str(out_dir)).eval()
    module.model.eval()
    batch = make_batch(tokenizer)
    assert_close(
        reward_model_scores(reloaded, batch["chosen_input_ids"], batch["chosen_attention_mask"]),
        reward_model_scores(module.model, batch["chosen_input_ids"], batch["chosen_attention_mask"]),
    )
    # And through the reward source other methods use.
    from rlhf_lightning.rewards.reward_model import RewardModelSource

    source = RewardModelSource(str(out_dir))
    scores = source(["the movie was"], ["great fun"])
    assert torch.as_tensor(scores).shape == (1,)


@pytest.mark.slow
def test_reward_model_learns_gold_preferences_with_label_noise(world_dir, tmp_path):
    """Trained on 10%-noisy sentiment pairs of the embedded world, the RM orders held-out pairs
    as the gold scorer does (labels from ``chosen_scores`` / ``rejected_scores``) >= 85% of the time."""
    import json
    import random

    train_file = os.path.join(world_dir, "pairs_sentiment_train.jsonl")
    val_file = os.path.join(world_dir, "pairs_sentiment_val.jsonl")

    def write_gold_labelled(src_path, dst_path, flip_rate, rng):
        """Order each pair by its gold sentiment score (ties dropped), then flip ``flip_rate`` of them."""
        with open(src_path) as src, open(dst_path, "w") as dst:
            for line in src:
                record = json.loads(line)
                c, r = record["chosen_scores"]["sentiment"], record["rejected_scores"]["sentiment"]
                if c == r:
                    continue
                if (c < r) != (rng.random() < flip_rate):
                    record["chosen"], record["rejected"] = record["rejected"], record["chosen"]
                    record["chosen_scores"], record["rejected_scores"] = record["rejected_scores"], record["chosen_scores"]
                record.pop("margin", None)
                dst.write(json.dumps(record) + "\n")

    rng = random.Random(0)
    noisy, gold_val = tmp_path / "noisy_train.jsonl", tmp_path / "gold_val.jsonl"
    write_gold_labelled(train_file, noisy, 0.10, rng)  # exactly the brief's 10% label noise
    write_gold_labelled(val_file, gold_val, 0.0, rng)

    L.seed_everything(0)
    tokenizer_dir = os.path.join(world_dir, "tokenizer")
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False}
    module = RewardModelModule(config, tokenizer_dir, optim=Optimization(lr=1e-3, warmup_steps=10, weight_decay=0.0))
    data = PreferenceDataModule(train_file=str(noisy), val_file=str(gold_val), tokenizer=tokenizer_dir, batch_size=32,
                                val_batch_size=64, max_length=96)
    tiny_trainer(tmp_path, max_steps=300, max_epochs=None, limit_val_batches=0).fit(module, datamodule=data)
    metrics = tiny_trainer(tmp_path).validate(module, datamodule=data, verbose=False)[0]
    print("held-out gold accuracy", metrics["val/accuracy"])
    assert metrics["val/accuracy"] >= 0.85
