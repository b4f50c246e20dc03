"""MetricWindow (running means between logger writes) and the logging-step rule it is flushed on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from rlhf_lightning.modules.metric_window import MetricWindow, is_logging_step


def test_window_means_then_reset():
    """Steps a = 1, 2, 6 and b = 0, 1, 2: means 3 and 1; the next window starts empty."""
    window = MetricWindow()
    assert window.pop_means() == {}
    for a, b in ((1.0, 0.0), (2.0, 1.0), (6.0, 2.0)):
        window.update({"a": torch.tensor(a), "b": torch.tensor(b)})
    assert len(window) == 3
    means = window.pop_means()
    assert list(means) == ["a", "b"]
    assert_close(means["a"], torch.tensor(3.0))
    assert_close(means["b"], torch.tensor(1.0))
    assert len(window) == 0 and window.pop_means() == {}
    window.update({"a": torch.tensor(5.0), "b": torch.tensor(-1.0)})
    assert_close(window.pop_means()["a"], torch.tensor(5.0))


def test_window_rejects_changing_names_and_detaches():
    window = MetricWindow()
    x = torch.tensor(2.0, requires_grad=True)
    window.update({"a": x * 3})
    assert not window.pop_means()["a"].requires_grad
    window.update({"a": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="changed"):
        window.update({"b": torch.tensor(1.0)})


def fake_trainer(global_step, every=50, max_steps=-1, last_batch=False, stop=False):
    return SimpleNamespace(global_step=global_step, log_every_n_steps=every, max_steps=max_steps,
                           is_last_batch=last_batch, should_stop=stop)


@pytest.mark.parametrize(
    "trainer,expected",
    [
        (fake_trainer(0, every=2), False),  # Lightning writes when (step + 1) % every == 0
        (fake_trainer(1, every=2), True),
        (fake_trainer(48), False),
        (fake_trainer(49), True),
        (fake_trainer(2, max_steps=3), True),  # the run's last step
        (fake_trainer(1, max_steps=3), False),
        (fake_trainer(5, last_batch=True), True),  # last batch of an epoch
        (fake_trainer(5, stop=True), True),
        (fake_trainer(1, every=0), False),  # log_every_n_steps=0: the logger never writes steps
        (None, True),
    ],
)
def test_is_logging_step(trainer, expected):
    assert is_logging_step(trainer) is expected
