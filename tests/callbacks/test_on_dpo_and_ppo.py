"""The weight callbacks attach to ``DPOModule``, ``PPOModule`` and ``GRPOModule`` (the critic-free family)
unchanged, and act:

* EMA: after every training batch the EMA equals a hand-updated replica ``e <- d e + (1 - d) theta``, validation
  runs on the EMA weights, and the trained weights (which differ from the EMA) are back afterwards;
* ElasticReset: on schedule, online <- former EMA and EMA <- fit-start weights (asserted inside the reset);
* ModelAveraging: the exported directory holds ``(1 - alpha) init + alpha trained`` with per-layer alphas;
* HFExport: ``hf/final`` reloads with ``from_pretrained`` and gives the trained policy's logits;
* KL controllers (PPO and GRPO: DPO has no ``kl_coef``): the coefficient in force follows the controller's
  rule applied by hand to the KL the module reported; on DPO they fail with a clear error;
* ElasticReset(reset_critic=True) puts PPO's value head / critic back to its fit-start weights; on GRPO
  (no critic) it is a clear error.

Tiny models and data come from the module tests (tests/modules/test_dpo.py, test_ppo.py).
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForCausalLM

from rlhf_lightning.callbacks import EMA, AdaptiveKLController, ElasticReset, FixedKLController, HFExport, ModelAveraging
from rlhf_lightning.generation import SamplingConfig
from rlhf_lightning.modules import GRPOModule
from rlhf_lightning.weights import interpolate_state_dicts

from tests.callbacks.callback_testkit import assert_same_tensors, params
from tests.callbacks.test_elastic_reset import CheckedElasticReset
from tests.callbacks.test_ema import CheckEMA
from tests.modules import test_dpo as dpo_tests
from tests.modules import test_policy_gradient as pg_tests
from tests.modules import test_ppo as ppo_tests

KINDS = ["dpo", "ppo", "grpo"]
IDS = torch.tensor([[2, 10, 11, 12, 13, 3]])


def make(kind: str, tiny_config, tokenizer_dir):
    if kind == "dpo":
        return dpo_tests.make_module(tiny_config, tokenizer_dir)
    if kind == "grpo":
        return pg_tests.make_module(tiny_config, tokenizer_dir, cls=GRPOModule, kl_coef=0.05,
                                    sampling=SamplingConfig(max_new_tokens=6, num_samples_per_prompt=2))
    return ppo_tests.make_module(tiny_config, tokenizer_dir)


def fit(kind: str, module, tmp_path, tokenizer_dir, assets_dir, callbacks, *, validate: bool = False, **kwargs):
    """Fit with the method's own tiny data; ``validate`` runs one validation batch every 2 steps."""
    if validate:
        kwargs.update(val_check_interval=2, limit_val_batches=1)
    else:
        kwargs.setdefault("limit_val_batches", 0)
    if kind == "dpo":
        return dpo_tests.fit(module, tmp_path, tokenizer_dir, assets_dir, callbacks=callbacks, **kwargs)
    datamodule = ppo_tests.prompts_datamodule(tokenizer_dir, assets_dir, val_fraction=0.25 if validate else 0.0)
    return ppo_tests.fit(module, tmp_path, tokenizer_dir, assets_dir, callbacks=callbacks, datamodule=datamodule, **kwargs)


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("kind", KINDS)
def test_ema_on_method_modules(kind, tmp_path, tokenizer_dir, assets_dir, tiny_config):
    module = make(kind, tiny_config, tokenizer_dir)
    ema = EMA(decay=0.6)
    check = CheckEMA(ema, every=1)  # asserts the hand-updated replica after every batch, and the validation swap
    fit(kind, module, tmp_path, tokenizer_dir, assets_dir, [ema, check], validate=True, max_steps=4)
    assert ema.num_updates == check.updates_seen == 4
    assert check.validations > 0, "validation never ran on the EMA weights"
    trained, averaged = params(module.policy), ema.ema_state_dict()
    assert averaged.keys() == trained.keys()  # every policy weight is tracked (the value head is not the policy)
    assert differs(averaged, trained), "EMA equals the online weights: it did not average"
    for name, value in check.replica.items():
        torch.testing.assert_close(averaged[name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_elastic_reset_on_method_modules(kind, tmp_path, tokenizer_dir, assets_dir, tiny_config):
    module = make(kind, tiny_config, tokenizer_dir)
    reset = CheckedElasticReset(
        decay=0.6, reset_every_n_steps=2, reset_optimizer=True, init_weights=params(module.policy)
    )
    fit(kind, module, tmp_path, tokenizer_dir, assets_dir, [reset], max_steps=5)
    assert reset.reset_steps == [2, 4] and reset.num_resets == 2
    # after the last reset (step 4) the EMA restarted from the initial weights and took one update (step 5)
    assert differs(reset.ema_state_dict(), reset.init_weights)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_model_averaging_on_method_modules(kind, tmp_path, tokenizer_dir, assets_dir, tiny_config):
    module = make(kind, tiny_config, tokenizer_dir)
    init = {k: v.clone() for k, v in module.policy.state_dict().items()}
    spec = {"0": 0.2, "1": 0.8, "default": 0.5}
    with torch.enable_grad():
        fit(kind, module, tmp_path, tokenizer_dir, assets_dir, [ModelAveraging(alpha=spec, dirpath=str(tmp_path / "avg"))],
            max_steps=2)
    trained = {k: v.clone() for k, v in module.policy.state_dict().items()}
    assert differs(trained, init)
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "avg")).state_dict()
    assert_same_tensors(exported, interpolate_state_dicts(init, trained, spec))
    # and by hand on one tensor per region: layer 0 -> 0.2, layer 1 -> 0.8, lm_head -> 0.5
    for name, alpha in (("model.layers.0.mlp.up_proj.weight", 0.2), ("model.layers.1.self_attn.q_proj.weight", 0.8),
                        ("lm_head.weight", 0.5)):
        torch.testing.assert_close(exported[name], (1 - alpha) * init[name] + alpha * trained[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_hf_export_on_method_modules(kind, tmp_path, tokenizer_dir, assets_dir, tiny_config):
    module = make(kind, tiny_config, tokenizer_dir)
    with torch.enable_grad():
        fit(kind, module, tmp_path, tokenizer_dir, assets_dir, [HFExport(dirpath=str(tmp_path / "hf"), on_best=False)],
            max_steps=2)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf" / "final"))
    assert not hasattr(reloaded, "v_head")
    policy = module.policy.eval()
    torch.testing.assert_close(reloaded(IDS).logits, policy(IDS).logits, rtol=0, atol=1e-5)


class RecordRollouts(Callback):
    """Placed before the KL controller: the coefficient in force at each step and the KL the module reported."""

    def __init__(self):
        self.coefs, self.reports = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.coefs.append(pl_module.kl_coef)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.reports.append((float(pl_module.last_rollout_kl), pl_module.last_rollout_size))


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_kl_controllers_on_ppo(kind, tmp_path, tokenizer_dir, assets_dir, tiny_config):
    module = make(kind, tiny_config, tokenizer_dir)
    assert module.kl_coef == 0.05
    recorder = RecordRollouts()
    controller = AdaptiveKLController(init_kl_coef=0.3, target=0.5, horizon=16)
    fit(kind, module, tmp_path / "adaptive", tokenizer_dir, assets_dir, [recorder, controller], max_steps=3)
    # beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), applied by hand to the reported KLs
    beta, expected = 0.3, [0.3]
    for kl, size in recorder.reports:
        beta *= 1 + min(max(kl / 0.5 - 1, -0.2), 0.2) * size / 16
        expected.append(beta)
    assert recorder.coefs == pytest.approx(expected[:-1], rel=1e-12)
    assert module.kl_coef == pytest.approx(expected[-1], rel=1e-12) and controller.num_updates == 3
    assert len(set(recorder.coefs)) == 3  # the coefficient really moved between rollouts

    module = make(kind, tiny_config, tokenizer_dir)
    recorder = RecordRollouts()
    fit(kind, module, tmp_path / "fixed", tokenizer_dir, assets_dir, [recorder, FixedKLController(kl_coef=0.3)], max_steps=2)
    assert recorder.coefs == [0.3, 0.3]


class CriticResetCheck(ElasticReset):
    """Asserts around the real reset: the critic had moved, and is back at its fit-start weights after."""

    def __init__(self, *args, critic_init=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.critic_init = critic_init
        self.checked = 0

    def reset(self, trainer, pl_module):
        assert differs(params(pl_module.value_model), self.critic_init), "the critic never moved: a no-op reset"
        super().reset(trainer, pl_module)
        assert_same_tensors(params(pl_module.value_model), self.critic_init)
        self.checked += 1


@pytest.mark.parametrize("separate_critic", [False, True], ids=["value_head", "separate_critic"])
def test_elastic_reset_resets_the_critic(separate_critic, tmp_path, tokenizer_dir, assets_dir, tiny_config):
    module = ppo_tests.make_module(tiny_config, tokenizer_dir, critic=dict(tiny_config) if separate_critic else None)
    critic_init = params(module.value_model)
    reset = CriticResetCheck(decay=0.6, reset_every_n_steps=2, reset_critic=True, critic_init=critic_init)
    fit("ppo", module, tmp_path, tokenizer_dir, assets_dir, [reset], max_steps=4)
    assert reset.checked == 2
    trainable = {name for name, p in module.value_model.named_parameters() if p.requires_grad}
    assert set(reset.state_dict()["critic_init"]) == trainable  # checkpointed with the callback


def test_elastic_reset_critic_on_a_critic_free_module_is_a_clear_error(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    module = make("grpo", tiny_config, tokenizer_dir)
    with pytest.raises(AttributeError, match="value_model"):
        fit("grpo", module, tmp_path, tokenizer_dir, assets_dir, [ElasticReset(0.6, 2, reset_critic=True)], max_steps=1)


def test_kl_controller_on_dpo_is_a_clear_error(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    module = make("dpo", tiny_config, tokenizer_dir)
    with pytest.raises(AttributeError, match="kl_coef"):
        fit("dpo", module, tmp_path, tokenizer_dir, assets_dir, [FixedKLController()], max_steps=1)


@pytest.mark.parametrize("kind", KINDS)
def test_callbacks_added_on_the_command_line_to_the_method_configs(kind, tmp_path, tokenizer_dir, assets_dir, tiny_config):
    """configs/dpo.yaml and configs/ppo_gold.yaml, shrunk to a tiny model, with EMA, ElasticReset and
    ModelAveraging appended to their callback list (``--trainer.callbacks+=``): they parse, attach and act."""
    import json
    import os

    from rlhf_lightning.cli import cli_main

    config_dir = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    if kind == "dpo":
        data_file = os.path.join(assets_dir, "pairs_tiny.jsonl")
        method_args = [
            "--config", os.path.join(config_dir, "dpo.yaml"), f"--model.init_args.model={json.dumps(tiny_config)}",
            "--data.init_args.batch_size=4",
        ]
    else:
        data_file = os.path.join(assets_dir, "prompts_tiny.jsonl")
        method_args = [
            "--config", os.path.join(config_dir, "ppo_gold.yaml"), f"--model.init_args.policy={json.dumps(tiny_config)}",
            "--model.init_args.sampling.max_new_tokens=4", "--model.init_args.ppo_epochs=1",
            "--model.init_args.optim.lr=1e-3", "--data.init_args.batch_size=4", "--data.init_args.val_batch_size=8",
        ]
    added = [
        {"class_path": "rlhf_lightning.callbacks.EMA", "init_args": {"decay": 0.9}},
        {"class_path": "rlhf_lightning.callbacks.ElasticReset", "init_args": {"decay": 0.9, "reset_every_n_steps": 2}},
        {"class_path": "rlhf_lightning.callbacks.ModelAveraging",
         "init_args": {"alpha": {"0": 0.2, "default": 0.8}, "dirpath": str(tmp_path / "averaged")}},
    ]
    cli = cli_main([
        *method_args, f"--model.init_args.tokenizer={tokenizer_dir}",
        f"--data.init_args.train_file={data_file}", f"--data.init_args.val_file={data_file}",
        *[f"--trainer.callbacks+={json.dumps(callback)}" for callback in added],
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--run_dir={tmp_path / 'run'}",
    ], run=False)
    by_type = {type(callback).__name__: callback for callback in cli.trainer.callbacks}
    assert {"EMA", "ElasticReset", "ModelAveraging", "HFExport"} <= set(by_type)  # appended, the config's kept
    assert by_type["ModelAveraging"].alpha == {"0": 0.2, "default": 0.8}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert by_type["EMA"].num_updates == 2
    assert by_type["ElasticReset"].num_resets == 1
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "averaged")).config.hidden_size == tiny_config["hidden_size"]
    assert (tmp_path / "run" / "hf" / "final" / "config.json").exists()
