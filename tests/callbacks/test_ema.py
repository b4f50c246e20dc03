"""EMA callback: the hand-computed EMA holds inside every hook, validation sees the EMA and training
gets its own weights back, and a crash-and-resume run equals an uninterrupted one."""

import pytest
import torch
from tests.callbacks.callback_testkit import (
    MLPPolicyModule,
    assert_same_tensors,
    crash_then_resume,
    dataloader,
    make_trainer,
    params,
    uninterrupted,
)
from lightning.pytorch.callbacks import Callback

from rlhf_lightning.callbacks import EMA


class CheckEMA(Callback):
    """Runs after EMA; keeps its own replica ``e <- d e + (1 - d) theta`` at every update step."""

    def __init__(self, ema: EMA, every: int):
        self.ema, self.every = ema, every
        self.replica = None
        self.updates_seen = 0
        self.validations = 0

    def on_fit_start(self, trainer, pl_module):
        self.replica = {k: v.float().clone() for k, v in params(pl_module.policy).items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            d = self.ema.decay
            for name, p in pl_module.policy.named_parameters():
                self.replica[name] = d * self.replica[name] + (1 - d) * p.detach()
            self.updates_seen += 1
        assert self.ema.num_updates == self.updates_seen
        assert self.ema.last_update_step == self.every * (trainer.global_step // self.every)
        ema = self.ema.ema_state_dict()
        for name, value in self.replica.items():
            torch.testing.assert_close(ema[name], value, rtol=1e-6, atol=1e-7)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        assert_same_tensors(params(pl_module.policy), self.ema.ema_state_dict())
        self.validations += 1


def test_ema_matches_hand_computation_in_hooks(tmp_path):
    ema = EMA(decay=0.8, update_every_n_steps=2)
    check = CheckEMA(ema, every=2)
    module = MLPPolicyModule()
    trainer = make_trainer(tmp_path, 7, [ema, check], limit_val_batches=2, val_check_interval=3)
    trainer.fit(module, dataloader(), dataloader(4))
    assert ema.num_updates == 3 and check.validations > 0
    # after the last validation the trained weights came back (not the EMA ones)
    assert not torch.equal(next(iter(ema.ema_state_dict().values())), module.policy[0].weight)


def test_validation_swap_restores_trained_weights_exactly(tmp_path):
    ema = EMA(decay=0.5)
    module = MLPPolicyModule()
    trainer = make_trainer(tmp_path, 3, [ema], limit_val_batches=1)
    trainer.fit(module, dataloader())
    trained = params(module.policy)
    trainer.validate(module, dataloader(2), verbose=False)
    assert_same_tensors(params(module.policy), trained)


def _ema_run(tmp_path, crash: bool):
    make_module = lambda seed: MLPPolicyModule(seed=seed)  # noqa: E731
    make_callbacks = lambda: [EMA(decay=0.7, update_every_n_steps=2)]  # noqa: E731
    if crash:
        return crash_then_resume(tmp_path / "crash", make_module, make_callbacks, total_steps=9, crash_step=4)
    return uninterrupted(tmp_path / "full", make_module, make_callbacks, total_steps=9)


def test_ema_crash_and_resume_equals_uninterrupted(tmp_path):
    module_a, (ema_a,) = _ema_run(tmp_path, crash=False)
    module_b, (ema_b,) = _ema_run(tmp_path, crash=True)
    assert (ema_b.num_updates, ema_b.last_update_step) == (ema_a.num_updates, ema_a.last_update_step) == (4, 8)
    assert_same_tensors(ema_b.ema_state_dict(), ema_a.ema_state_dict())
    assert_same_tensors(params(module_b.policy), params(module_a.policy))


def test_state_key_tells_instances_apart():
    assert EMA(decay=0.9).state_key != EMA(decay=0.99).state_key
    assert EMA(state_key="slow").state_key == "slow"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"decay": 1.5}, "decay"),
        ({"decay": "0.9"}, "decay"),
        ({"update_every_n_steps": 0}, "update_every_n_steps"),
        ({"update_every_n_steps": 1.5}, "update_every_n_steps"),
        ({"state_key": 3}, "state_key"),
    ],
)
def test_ema_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EMA(**kwargs)


def test_ema_needs_a_policy(tmp_path):
    class NoPolicy(MLPPolicyModule):
        policy = None

    with pytest.raises(TypeError, match="policy"):
        make_trainer(tmp_path, 1, [EMA()]).fit(NoPolicy(), dataloader())


def test_should_update_is_overridable(tmp_path):
    class AfterThree(EMA):
        def should_update(self, trainer, step):
            return step > 3

    ema = AfterThree(decay=0.5)
    make_trainer(tmp_path, 5, [ema]).fit(MLPPolicyModule(), dataloader())
    assert ema.num_updates == 2
