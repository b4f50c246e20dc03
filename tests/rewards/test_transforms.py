"""Reward transforms: running statistics against the batch formula, state_dict round trip, clip, missing-EOS."""

import pytest
import torch

from rlhf_lightning.rewards import RewardTransform, RunningMoments


def test_running_moments_equal_moments_of_the_concatenation():
    torch.manual_seed(0)
    chunks = [torch.randn(5) * 3 + 1, torch.randn(1), torch.randn(7) - 2]
    moments = RunningMoments()
    for chunk in chunks:
        moments.update(chunk)
    everything = torch.cat(chunks).double()
    assert moments.count.item() == 13
    torch.testing.assert_close(moments.mean, everything.mean())
    torch.testing.assert_close(moments.var, everything.var(unbiased=False))


def test_whiten_and_scale_use_updated_stats():
    """Scores [1, 2, 3]: mean 2, population var 2/3. whiten -> (s - 2) / sqrt(2/3); scale -> s / sqrt(2/3)."""
    scores = torch.tensor([1.0, 2.0, 3.0])
    std = (2 / 3) ** 0.5
    whiten = RewardTransform(normalize="whiten", eps=0.0, warmup=0, min_std=0.0)
    torch.testing.assert_close(whiten(scores), torch.tensor([-1.0, 0.0, 1.0]) / std)
    scale = RewardTransform(normalize="scale", eps=0.0, warmup=0, min_std=0.0)
    torch.testing.assert_close(scale(scores), scores / std)
    # eval mode (or update=False) applies the stats without changing them
    whiten.eval()
    whiten(torch.tensor([100.0]))
    assert whiten.moments.count.item() == 3


def test_state_dict_round_trip_resumes_statistics():
    first = RewardTransform(normalize="whiten", warmup=3)
    first(torch.tensor([1.0, 5.0, 2.0]))
    resumed = RewardTransform(normalize="whiten", warmup=3)
    resumed.load_state_dict(first.state_dict())
    assert set(first.state_dict()) == {"moments.count", "moments.mean", "moments.var"}
    batch = torch.tensor([0.5, -3.0])
    torch.testing.assert_close(resumed(batch), first(batch))
    torch.testing.assert_close(resumed.moments.mean, first.moments.mean)


def test_clip_and_missing_eos_options():
    """Penalty is subtracted after normalisation and before clipping: [4, -1, 0.5] with finished
    [T, F, F], penalty 1 -> [4, -2, -0.5] -> clip 1.5 -> [1.5, -1.5, -0.5]."""
    scores = torch.tensor([4.0, -1.0, 0.5])
    finished = torch.tensor([True, False, False])
    penalised = RewardTransform(missing_eos_penalty=1.0, clip=1.5)(scores, finished=finished)
    torch.testing.assert_close(penalised, torch.tensor([1.5, -1.5, -0.5]))
    replaced = RewardTransform(missing_eos_score=-3.0)(scores, finished=finished)
    torch.testing.assert_close(replaced, torch.tensor([4.0, -3.0, -3.0]))
    with pytest.raises(ValueError, match="finished"):
        RewardTransform(missing_eos_penalty=1.0)(scores)
    with pytest.raises(ValueError, match="at most one"):
        RewardTransform(missing_eos_penalty=1.0, missing_eos_score=0.0)
    with pytest.raises(ValueError, match="normalize"):
        RewardTransform(normalize="zscore")


def test_first_rollout_of_equal_scores_is_not_blown_up():
    """A first rollout whose 32 scores are all 0.5 has std 0: dividing by std + 1e-8 gave 5e7 per reward.
    Until 64 scores are in, the std used is at least 1 (0.5 stays 0.5; a wide spread is still divided);
    after it, the std floor (1e-2) caps the magnification at 100x even when the spread collapses."""
    scores = torch.full((32,), 0.5)
    transform = RewardTransform(normalize="scale")
    torch.testing.assert_close(transform(scores), scores)
    torch.testing.assert_close(transform(scores), scores / 1e-2)  # 64 scores, std 0 -> floored at 1e-2
    wide = RewardTransform(normalize="scale")
    torch.testing.assert_close(wide(torch.tensor([-4.0, 4.0])), torch.tensor([-1.0, 1.0]))  # std 4 > 1: divided
    no_warmup = RewardTransform(normalize="whiten", warmup=0)
    assert no_warmup(scores).abs().max() == 0.0  # centred first, so equal scores give 0, not NaN
    spread = RewardTransform(normalize="scale", warmup=4)
    spread(torch.tensor([1.0, 3.0, 1.0, 3.0]))  # std 1 from here on
    torch.testing.assert_close(spread(torch.tensor([2.0]), update=False), torch.tensor([2.0]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="warmup"):
        RewardTransform(normalize="scale", warmup=-1)
