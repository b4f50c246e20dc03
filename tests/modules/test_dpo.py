"""DPOModule: smoke fit per loss type, frozen reference never optimised, precomputed reference equals
the live one, the on-disk cache is hit on the second run, checkpoints, and a learning test."""

from __future__ import annotations

import json
import os

import lightning as L
import pytest
import torch
from torch.testing import assert_close

from rlhf_lightning.losses import dpo_loss
from rlhf_lightning.modules import DPOModule, Optimization
from rlhf_lightning.modules.pair_forward import pair_logps

from tests.modules.test_pair_forward import make_batch
from tests.modules.test_reward_model import pairs_datamodule, tiny_trainer

TRL_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


class RecordLosses(L.Callback):
    """Collects the per-step training loss and the validation loss of every batch."""

    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append(float(outputs["loss"]))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val.append(float(outputs["loss"]))


def make_module(tiny_config, tokenizer_dir, seed=0, **kwargs) -> DPOModule:
    torch.manual_seed(seed)
    kwargs.setdefault("optim", Optimization(lr=1e-3))
    return DPOModule(tiny_config, tokenizer_dir, **kwargs)


def fit(module, tmp_path, tokenizer_dir, assets_dir, callbacks=(), datamodule_kwargs=None, **trainer_kwargs):
    L.seed_everything(0)
    trainer = tiny_trainer(tmp_path, callbacks=list(callbacks), **trainer_kwargs)
    trainer.fit(module, datamodule=pairs_datamodule(tokenizer_dir, assets_dir, **(datamodule_kwargs or {})))
    return trainer


@pytest.mark.parametrize(
    "loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)]
)
def test_smoke_fit_each_loss_type(loss_type, label_smoothing, tmp_path, tokenizer_dir, assets_dir, tiny_config):
    module = make_module(tiny_config, tokenizer_dir, loss_type=loss_type, label_smoothing=label_smoothing)
    assert module.average_logps == (loss_type == "ipo")
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = fit(module, tmp_path, tokenizer_dir, assets_dir, max_steps=3, val_check_interval=3)
    for split in ("train", "val"):
        for name in TRL_NAMES + ("logits/chosen", "logits/rejected"):
            key = f"{split}/{name}"
            assert key in trainer.callback_metrics and torch.isfinite(trainer.callback_metrics[key]), key
    after = module.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the policy did not move"


def test_train_statistics_are_logged_as_window_means_when_the_logger_writes(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    """log_every_n_steps=2 over 4 steps: the logger writes after steps 1 and 3 (0-based); each
    ``rewards/margins`` written is the mean of the two steps since the previous write, while
    ``loss`` is the value of the step itself."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    module = make_module(tiny_config, tokenizer_dir)
    per_step = []
    step = module._step

    def recording_step(batch, split):
        loss, metrics = step(batch, split)
        if split == "train":
            per_step.append({name: float(value) for name, value in metrics.items()})
        return loss, metrics

    module._step = recording_step
    L.seed_everything(0)
    trainer = tiny_trainer(tmp_path, max_steps=4, limit_val_batches=0, log_every_n_steps=2,
                           logger=CSVLogger(str(tmp_path), name="logs", version=0))
    trainer.fit(module, datamodule=pairs_datamodule(tokenizer_dir, assets_dir))
    assert len(per_step) == 4
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f) if r.get("train/rewards/margins")}
    assert sorted(rows) == [1, 3]
    for logged_step, window in ((1, per_step[0:2]), (3, per_step[2:4])):
        for name in ("rewards/margins", "logps/chosen", "logits/rejected"):
            expected = sum(m[name] for m in window) / 2
            assert abs(float(rows[logged_step][f"train/{name}"]) - expected) < 1e-5, (logged_step, name)
        assert abs(float(rows[logged_step]["train/loss"]) - window[-1]["loss"]) < 1e-5


class RecordGradients(L.Callback):
    """After each training batch: whether every policy parameter's gradient is None."""

    def __init__(self):
        self.freed = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.freed.append(all(p.grad is None for p in pl_module.policy.parameters()))


def test_gradients_are_freed_after_each_optimizer_step_not_between_accumulated_batches(
    tmp_path, tokenizer_dir, assets_dir, tiny_config
):
    """With accumulate_grad_batches=2 the optimizer steps on batches 1 and 3: gradients survive batch 0
    and 2 (they accumulate) and are gone after 1 and 3 (not kept alive through the next forward)."""
    module = make_module(tiny_config, tokenizer_dir)
    recorder = RecordGradients()
    fit(module, tmp_path, tokenizer_dir, assets_dir, callbacks=[recorder], max_steps=2, accumulate_grad_batches=2,
        limit_val_batches=0)
    assert recorder.freed == [False, True, False, True]


def test_reference_is_frozen_and_never_in_the_optimizer(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    module = make_module(tiny_config, tokenizer_dir)
    ref_before = {k: v.clone() for k, v in module.reference.state_dict().items()}
    trainer = fit(module, tmp_path, tokenizer_dir, assets_dir, max_steps=2, limit_val_batches=0)
    reference = module.reference
    assert reference is not None and not reference.training
    assert all(not p.requires_grad for p in reference.parameters())
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in reference.parameters()}
    assert optimised == {id(p) for p in module.policy.parameters()}
    for key, value in reference.state_dict().items():
        assert torch.equal(value, ref_before[key]), key
    # Default reference = a copy of the initial policy (also for an inline, randomly initialised config).
    fresh = make_module(tiny_config, tokenizer_dir)
    for key, value in fresh.reference.state_dict().items():
        assert torch.equal(value, fresh.policy.state_dict()[key])


def test_step_matches_dpo_loss_on_hand_batch(tokenizer, tokenizer_dir, tiny_config):
    module = make_module(tiny_config, tokenizer_dir, beta=0.5)
    with torch.no_grad():  # make the policy differ from the reference
        for p in module.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    module.model.eval()
    batch = make_batch(tokenizer)
    loss, metrics = module._step(batch, "train")
    pol = pair_logps(module.model, batch)
    ref = pair_logps(module.reference, batch)
    losses, chosen, rejected = dpo_loss(pol.chosen_logps, pol.rejected_logps, ref.chosen_logps, ref.rejected_logps, beta=0.5)
    assert_close(loss, losses.mean(), atol=1e-5, rtol=1e-5)
    assert_close(metrics["rewards/margins"], (chosen - rejected).mean(), atol=1e-5, rtol=1e-5)
    assert_close(metrics["rewards/accuracies"], (chosen > rejected).float().mean())


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_precomputed_reference_equals_live_and_drops_the_model(precision, tmp_path, tokenizer_dir, assets_dir, tiny_config):
    """Also under bf16-mixed: the precomputed log-probs are computed under the step's autocast (they were
    computed in float32 outside it: losses differed by up to 4e-5, reference log-probs by ~1e-3).
    Unshuffled, so live and precomputed batches hold the same rows: in bf16 a row's log-prob also
    depends on its batch's padded length, which no precomputation can reproduce under shuffling."""
    runs = {}
    for precompute in (False, True):
        module = make_module(tiny_config, tokenizer_dir, precompute_reference=precompute)
        recorder = RecordLosses()
        fit(
            module, tmp_path / str(precompute), tokenizer_dir, assets_dir, callbacks=[recorder], max_steps=4, val_check_interval=2,
            precision=precision, datamodule_kwargs={"shuffle": False},
        )
        runs[precompute] = (recorder, module)
    live, pre = runs[False][0], runs[True][0]
    assert len(live.train) == 4 and len(live.val) > 0
    assert_close(torch.tensor(pre.train), torch.tensor(live.train), atol=1e-7, rtol=0)
    assert_close(torch.tensor(pre.val), torch.tensor(live.val), atol=1e-7, rtol=0)
    module = runs[True][1]
    assert module.reference is None and module.ref_model is None
    assert not any(name.startswith("ref_model") for name, _ in module.named_parameters())
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in module.policy.parameters())


def test_reference_cache_is_hit_on_the_second_run(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    cache_dir = tmp_path / "cache"
    reference_calls = []
    for run in range(2):
        module = make_module(tiny_config, tokenizer_dir, precompute_reference=True, reference_cache_dir=str(cache_dir))
        reference_calls.append(0)
        module.reference.register_forward_hook(lambda *args: reference_calls.__setitem__(-1, reference_calls[-1] + 1))
        fit(module, tmp_path / f"run{run}", tokenizer_dir, assets_dir, max_steps=2, val_check_interval=2)
        assert module.reference is None
        assert module.reference_cache_hits == {"train": run == 1, "val": run == 1}
    assert reference_calls[0] > 0 and reference_calls[1] == 0
    files = sorted(os.listdir(cache_dir))
    assert len(files) == 2 and all(f.endswith(".pt") and not f.startswith(".") for f in files)
    # A different averaging flag (IPO) is a different fingerprint: a miss, not a wrong hit.
    module = make_module(tiny_config, tokenizer_dir, loss_type="ipo", precompute_reference=True, reference_cache_dir=str(cache_dir))
    fit(module, tmp_path / "ipo", tokenizer_dir, assets_dir, max_steps=1, limit_val_batches=0)
    assert module.reference_cache_hits == {"train": False}


def test_checkpoint_omits_reference_and_reloads_strictly(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    module = make_module(tiny_config, tokenizer_dir)
    trainer = fit(module, tmp_path, tokenizer_dir, assets_dir, max_steps=1, limit_val_batches=0)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert state and not any(k.startswith("ref_model.") for k in state)
    # weights_only=False: the hyperparameters hold an `Optimization` dataclass (not a torch safe global).
    reloaded = DPOModule.load_from_checkpoint(path, model=tiny_config, tokenizer=tokenizer_dir, weights_only=False)
    for key, value in module.policy.state_dict().items():
        assert torch.equal(reloaded.policy.state_dict()[key], value)


def test_argument_validation(tokenizer_dir, tiny_config):
    with pytest.raises(ValueError, match="loss_type"):
        DPOModule(tiny_config, tokenizer_dir, loss_type="nope")
    with pytest.raises(ValueError, match="beta"):
        DPOModule(tiny_config, tokenizer_dir, beta=0.0)
    with pytest.raises(ValueError, match="reference_cache_dir"):
        DPOModule(tiny_config, tokenizer_dir, reference_cache_dir="x")


@pytest.mark.slow
def test_dpo_raises_gold_sentiment_of_samples(world_dir, sft_policy_dir, tmp_path):
    """DPO on the world's sentiment pairs, from the SFT policy: the mean gold sentiment of sampled
    completions on held-out prompts goes up."""
    from rlhf_lightning.data import PreferenceDataModule
    from rlhf_lightning.evaluation import evaluate_policy
    from rlhf_lightning.models import freeze, load_causal_lm

    with open(os.path.join(world_dir, "prompts_eval.jsonl")) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()][:64]
    L.seed_everything(0)
    module = DPOModule(sft_policy_dir, beta=0.1, precompute_reference=True, optim=Optimization(lr=5e-4, warmup_steps=5))
    sft = freeze(load_causal_lm(sft_policy_dir))

    def gold(policy):
        return evaluate_policy(policy, module.tokenizer, prompts, scorers=["sentiment"], reference=sft, max_new_tokens=24, seed=0).metrics

    before = gold(module.policy)
    data = PreferenceDataModule(train_file=os.path.join(world_dir, "pairs_sentiment_train.jsonl"), batch_size=16)
    trainer = tiny_trainer(tmp_path, max_steps=120, max_epochs=None, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    after = gold(module.policy)
    print("gold/sentiment before", before["gold/sentiment"], "after", after["gold/sentiment"], "KL", after["kl_to_reference"])
    assert after["gold/sentiment"] > before["gold/sentiment"] + 0.1 * abs(before["gold/sentiment"]) + 0.05
