"""Elastic Reset: right after each reset the policy equals the EMA of just before it and the EMA equals the
fit-start weights (asserted inside the reset); optimizer reset; crash-and-resume equals an uninterrupted
run; under 2-process DDP all ranks hold identical weights after a reset."""

import os
import subprocess
import sys
import textwrap

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

from rlhf_lightning.callbacks import ElasticReset

HERE = os.path.dirname(os.path.abspath(__file__))


class CheckedElasticReset(ElasticReset):
    """Asserts the reset semantics around the real ``reset``."""

    def __init__(self, *args, init_weights=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_weights = init_weights
        self.reset_steps = []

    def reset(self, trainer, pl_module):
        former_ema = {k: v.clone() for k, v in self.ema_state_dict().items()}
        online = params(pl_module.policy)
        assert any(not torch.equal(former_ema[k], online[k]) for k in former_ema), "EMA equals the policy: a no-op reset"
        super().reset(trainer, pl_module)
        # online <- former EMA, exactly (float32 policy, float32 EMA)
        assert_same_tensors(params(pl_module.policy), former_ema)
        # EMA <- weights at fit start
        assert_same_tensors(self.ema_state_dict(), self.init_weights)
        assert_same_tensors(self.init_state_dict(), self.init_weights)
        if self.reset_optimizer:
            assert all(len(opt.state) == 0 for opt in trainer.optimizers)
        self.reset_steps.append(trainer.global_step)


def test_reset_semantics_inside_hooks(tmp_path):
    module = MLPPolicyModule()
    callback = CheckedElasticReset(decay=0.6, reset_every_n_steps=3, init_weights=params(module.policy))
    make_trainer(tmp_path, 10, [callback]).fit(module, dataloader())
    assert callback.reset_steps == [3, 6, 9]
    assert callback.num_resets == 3


def test_reset_clears_optimizer_state(tmp_path):
    module = MLPPolicyModule()
    callback = CheckedElasticReset(
        decay=0.6, reset_every_n_steps=2, reset_optimizer=True, init_weights=params(module.policy)
    )
    make_trainer(tmp_path, 4, [callback]).fit(module, dataloader())
    assert callback.reset_steps == [2, 4]


def test_keep_running_ema_when_not_resetting_to_init(tmp_path):
    module = MLPPolicyModule()
    callback = ElasticReset(decay=0.6, reset_every_n_steps=2, reset_ema_to_init=False)
    make_trainer(tmp_path, 2, [callback]).fit(module, dataloader())
    # online <- EMA, and the EMA is left where it was: both equal
    assert_same_tensors(params(module.policy), callback.ema_state_dict())


def test_elastic_reset_crash_and_resume_equals_uninterrupted(tmp_path):
    make_module = lambda seed: MLPPolicyModule(seed=seed)  # noqa: E731
    make_callbacks = lambda: [ElasticReset(decay=0.7, reset_every_n_steps=3, reset_optimizer=True)]  # noqa: E731
    module_a, (reset_a,) = uninterrupted(tmp_path / "full", make_module, make_callbacks, total_steps=8)
    # crash at 4: between the resets at 3 and 6; the one at 6 must use the checkpointed initial weights
    module_b, (reset_b,) = crash_then_resume(tmp_path / "crash", make_module, make_callbacks, total_steps=8, crash_step=4)
    assert reset_b.num_resets == reset_a.num_resets == 2
    assert_same_tensors(reset_b.init_state_dict(), reset_a.init_state_dict())
    assert_same_tensors(reset_b.ema_state_dict(), reset_a.ema_state_dict())
    assert_same_tensors(params(module_b.policy), params(module_a.policy))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"decay": -0.1, "reset_every_n_steps": 3}, "decay"),
        ({"decay": 0.9, "reset_every_n_steps": 0}, "reset_every_n_steps"),
    ],
)
def test_elastic_reset_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ElasticReset(**kwargs)


DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    sys.path.insert(0, {here!r})
    from callback_testkit import MLPPolicyModule, dataloader, make_trainer
    from rlhf_lightning.callbacks import ElasticReset

    OUT = {out!r}

    class Perturbed(ElasticReset):
        # Rank 1's EMA is nudged before the reset: only the broadcast from rank 0 can make ranks agree after it.
        def reset(self, trainer, pl_module):
            if trainer.global_rank == 1:
                for t in self._ema.tensors:
                    t.add_(0.01)
            super().reset(trainer, pl_module)
            state = {{
                "policy": {{k: v.detach().clone() for k, v in pl_module.policy.named_parameters()}},
                "ema": {{k: v.clone() for k, v in self.ema_state_dict().items()}},
                "init": {{k: v.clone() for k, v in self.init_state_dict().items()}},
                "step": trainer.global_step,
            }}
            torch.save(state, os.path.join(OUT, f"rank{{trainer.global_rank}}_step{{trainer.global_step}}.pt"))

    if __name__ == "__main__":
        torch.set_num_threads(1)
        trainer = make_trainer(OUT, 4, [Perturbed(decay=0.7, reset_every_n_steps=2)], strategy="ddp", devices=2)
        trainer.fit(MLPPolicyModule(seed=0), dataloader())
    """
)


@pytest.mark.distributed
def test_ranks_identical_after_reset_under_ddp(tmp_path):
    script = tmp_path / "ddp_elastic_reset.py"
    script.write_text(DDP_SCRIPT.format(here=HERE, out=str(tmp_path)))
    env = {**os.environ, "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for step in (2, 4):
        rank0 = torch.load(tmp_path / f"rank0_step{step}.pt")
        rank1 = torch.load(tmp_path / f"rank1_step{step}.pt")
        for key in ("policy", "ema", "init"):
            assert_same_tensors(rank1[key], rank0[key])
        # and the reset really happened on rank 0's values: EMA back at the initial weights
        assert_same_tensors(rank0["ema"], rank0["init"])
