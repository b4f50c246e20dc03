"""KL controllers: Ziegler et al.'s update worked by hand, the coefficient each training step sees, the
hook contract's errors, and a crash-and-resume run that keeps the coefficient."""

import pytest
import torch
from tests.callbacks.callback_testkit import PPOLikeModule, crash_then_resume, dataloader, make_trainer, uninterrupted

from rlhf_lightning.callbacks import AdaptiveKLController, FixedKLController
from rlhf_lightning.callbacks.kl_control import AdaptiveKL, FixedKL

KLS = [9.0, 3.0, 6.6, 6.0, 12.0, 0.0, 7.2, 6.3, 5.1, 6.0]


def test_adaptive_kl_update_by_hand():
    """beta0 = 0.2, target 6, horizon 100, 10 episodes per rollout (n/H = 0.1):

    KL 9   -> e = clip(9/6 - 1 = 0.5)  = 0.2  -> 0.2    * (1 + 0.02)  = 0.204
    KL 3   -> e = clip(3/6 - 1 = -0.5) = -0.2 -> 0.204  * (1 - 0.02)  = 0.19992
    KL 6.6 -> e = 0.1                         -> 0.19992 * (1 + 0.01) = 0.2019192
    """
    controller = AdaptiveKL(0.2, target=6.0, horizon=100)
    expected = [0.204, 0.19992, 0.2019192]
    for kl, want in zip([9.0, 3.0, 6.6], expected):
        assert controller.update(kl, 10) == pytest.approx(want, rel=1e-12)
    assert controller.steps == 30
    assert FixedKL(0.1).update(100.0, 10) == 0.1


def expected_coefs(init, target, horizon, kls, size):
    controller, coefs = AdaptiveKL(init, target, horizon), []
    for kl in kls:
        coefs.append(controller.value)
        controller.update(kl, size)
    return coefs, controller.value


def test_adaptive_controller_sets_module_coef_each_step(tmp_path):
    module = PPOLikeModule(KLS[:6], rollout_size=4)
    callback = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=40)
    make_trainer(tmp_path, 6, [callback]).fit(module, dataloader())
    coefs, final = expected_coefs(0.2, 6.0, 40, KLS[:6], 4)
    assert module.coefs_seen == pytest.approx(coefs, rel=1e-12)  # what training_step saw, step by step
    assert module.kl_coef == pytest.approx(final, rel=1e-12)
    assert module.last_rollout_kl is None  # consumed, so it is never counted twice
    assert callback.controller.steps == 24 and callback.num_updates == 6


def test_fixed_controller_sets_and_keeps_coef(tmp_path):
    module = PPOLikeModule(KLS[:3])
    make_trainer(tmp_path, 3, [FixedKLController(0.05)]).fit(module, dataloader())
    assert module.coefs_seen == [0.05, 0.05, 0.05]


def test_kl_controller_crash_and_resume_keeps_coef(tmp_path):
    make_module = lambda seed: PPOLikeModule(KLS, rollout_size=4, seed=seed)  # noqa: E731
    make_callbacks = lambda: [AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=40)]  # noqa: E731
    module_a, (kl_a,) = uninterrupted(tmp_path / "full", make_module, make_callbacks, total_steps=10)
    module_b, (kl_b,) = crash_then_resume(tmp_path / "crash", make_module, make_callbacks, total_steps=10, crash_step=5)
    coefs, final = expected_coefs(0.2, 6.0, 40, KLS, 4)
    # the resumed run's first step (global step 5) already sees the coefficient the crashed run reached
    assert module_b.coefs_seen == pytest.approx(coefs[5:], rel=1e-12)
    assert module_b.kl_coef == module_a.kl_coef == pytest.approx(final, rel=1e-12)
    assert kl_b.state_dict() == kl_a.state_dict()


def test_module_without_kl_coef_is_rejected(tmp_path):
    class NoCoef(PPOLikeModule):
        def __init__(self):
            super().__init__(KLS)
            del self.kl_coef

    with pytest.raises(AttributeError, match="kl_coef"):
        make_trainer(tmp_path, 1, [FixedKLController(0.1)]).fit(NoCoef(), dataloader())


def test_rollout_without_size_is_rejected(tmp_path):
    class NoSize(PPOLikeModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.last_rollout_size = 0
            return loss

    with pytest.raises(ValueError, match="last_rollout_size"):
        make_trainer(tmp_path, 1, [AdaptiveKLController()]).fit(NoSize(KLS), dataloader())


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: AdaptiveKLController(init_kl_coef=-1.0), "init_kl_coef|kl_coef"),
        (lambda: AdaptiveKLController(target=0.0), "target"),
        (lambda: AdaptiveKLController(horizon=0), "horizon"),
        (lambda: FixedKLController(float("nan")), "kl_coef"),
    ],
)
def test_controllers_reject_bad_arguments(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_tensor_kl_is_accepted():
    controller = AdaptiveKL(0.1, target=1.0, horizon=10)
    assert controller.update(float(torch.tensor(2.0)), 1) == pytest.approx(0.1 * 1.02)
