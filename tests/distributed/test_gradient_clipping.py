"""Gradient clipping under manual optimization (PPO's ``max_grad_norm``), per strategy
(``rlhf_lightning.strategies.clip_gradient_norm`` / ``set_deepspeed_gradient_clipping``).

Lightning's own ``clip_gradients`` raises under FSDP1 (its precision plugin refuses "norm") and does nothing
under DeepSpeed, so PPO under configs/strategy/fsdp.yaml crashed at its first update and under
deepspeed_zero{2,3}.yaml trained unclipped. Both strategies need CUDA, so the dispatch is checked here with
the real strategy objects and a recording stand-in for what they would call; the GPU check
(scripts/gpu_check.py) runs the real thing.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from rlhf_lightning.strategies import clip_gradient_norm, set_deepspeed_gradient_clipping


def module_under(strategy):
    """A stand-in LightningModule: its trainer's strategy, and a record of ``clip_gradients`` calls."""
    calls: list[dict] = []
    module = SimpleNamespace(trainer=SimpleNamespace(strategy=strategy), clip_gradients=lambda optimizer, **kw: calls.append(kw))
    return module, calls


def test_lightning_clips_on_a_single_device_ddp_and_fsdp2():
    module, calls = module_under(SingleDeviceStrategy(device="cpu"))
    clip_gradient_norm(module, optimizer=None, max_norm=0.5)
    assert calls == [{"gradient_clip_val": 0.5, "gradient_clip_algorithm": "norm"}]


def test_fsdp1_clips_through_its_root_unit():
    from lightning.pytorch.plugins.precision import FSDPPrecision

    with pytest.raises(MisconfigurationException, match="norm"):  # why Lightning's path cannot be used
        FSDPPrecision("32-true").clip_grad_by_norm(None, 1.0)
    strategy = FSDPStrategy()
    norms: list[float] = []
    strategy.model = SimpleNamespace(clip_grad_norm_=norms.append)  # the FSDP-wrapped LightningModule
    module, calls = module_under(strategy)
    clip_gradient_norm(module, optimizer=None, max_norm=0.5)
    assert norms == [0.5] and calls == []


def test_deepspeed_clips_inside_its_engine():
    pytest.importorskip("deepspeed", reason="DeepSpeedStrategy needs `pip install rlhf-lightning[deepspeed]`")
    strategy = DeepSpeedStrategy(stage=2)
    module, calls = module_under(strategy)
    set_deepspeed_gradient_clipping(module, 1.0)
    assert strategy.config["gradient_clipping"] == 1.0
    clip_gradient_norm(module, optimizer=None, max_norm=1.0)
    assert calls == []  # the engine clips at its step
    # Lightning fills 0.0 when it formats the config first (ZeRO-3 does, entering zero.Init): ours replaces it.
    strategy.config["gradient_clipping"] = 0.0
    set_deepspeed_gradient_clipping(module, 0.5)
    assert strategy.config["gradient_clipping"] == 0.5
    strategy.config["gradient_clipping"] = 2.0
    with pytest.raises(ValueError, match="gradient_clipping=2.0.*max_grad_norm=0.5"):
        set_deepspeed_gradient_clipping(module, 0.5)
    set_deepspeed_gradient_clipping(module, None)  # max_grad_norm=None keeps the config's value
    assert strategy.config["gradient_clipping"] == 2.0


def test_ppo_sets_the_deepspeed_clipping_when_the_model_is_configured(tokenizer_dir, tiny_config):
    pytest.importorskip("deepspeed", reason="DeepSpeedStrategy needs `pip install rlhf-lightning[deepspeed]`")
    from rlhf_lightning.modules import PPOModule

    module = PPOModule(dict(tiny_config), tokenizer_dir, reward=lambda prompts, completions, **_: None, max_grad_norm=0.7)
    strategy = DeepSpeedStrategy(stage=3)
    module._trainer = SimpleNamespace(strategy=strategy)
    module.configure_model()
    assert strategy.config["gradient_clipping"] == 0.7
