"""ImplicitRewardSource: beta * (log pi - log pi_ref) by hand, text level equals token level, zero when
policy == reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from rlhf_lightning.models import load_causal_lm
from rlhf_lightning.modules.pair_forward import pair_logps
from rlhf_lightning.rewards import ImplicitRewardSource

from tests.modules.test_pair_forward import PAIRS, make_batch


def _models(tokenizer, tiny_config):
    torch.manual_seed(0)
    reference = load_causal_lm(tiny_config, tokenizer=tokenizer)
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # a "trained" policy: differs from its reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, reference


def test_score_pairs_is_beta_times_log_ratio(tokenizer, tiny_config):
    """r(x, y) = beta * (sum_t log pi(y_t | .) - sum_t log pi_ref(y_t | .)), from the pair forward."""
    policy, reference = _models(tokenizer, tiny_config)
    source = ImplicitRewardSource(policy, reference, beta=0.25, tokenizer=tokenizer)
    batch = make_batch(tokenizer)
    chosen, rejected = source.score_pairs(batch)
    pol, ref = pair_logps(policy, batch), pair_logps(reference, batch)
    assert_close(chosen, 0.25 * (pol.chosen_logps - ref.chosen_logps))
    assert_close(rejected, 0.25 * (pol.rejected_logps - ref.rejected_logps))
    assert chosen.shape == (len(PAIRS),) and not chosen.requires_grad


@pytest.mark.parametrize("average", [False, True])
def test_text_level_equals_token_level(tokenizer, tiny_config, average):
    policy, reference = _models(tokenizer, tiny_config)
    source = ImplicitRewardSource(policy, reference, beta=0.1, average=average, tokenizer=tokenizer, batch_size=2)
    chosen, rejected = source.score_pairs(make_batch(tokenizer))
    prompts = [p for p, _, _ in PAIRS]
    text_scores = source(prompts + prompts, [c for _, c, _ in PAIRS] + [r for _, _, r in PAIRS])
    assert_close(text_scores, torch.cat([chosen, rejected]), atol=1e-5, rtol=1e-5)


def test_identical_policy_and_reference_score_zero(tokenizer, tiny_config):
    _, reference = _models(tokenizer, tiny_config)
    source = ImplicitRewardSource(reference, copy.deepcopy(reference), tokenizer=tokenizer)
    assert_close(source(["the movie was"], ["great fun"]), torch.zeros(1))
    assert source.fingerprint() == ImplicitRewardSource(reference, copy.deepcopy(reference), tokenizer=tokenizer).fingerprint()
    assert source.fingerprint() != ImplicitRewardSource(reference, reference, beta=0.2, tokenizer=tokenizer).fingerprint()


def test_argument_validation(tokenizer, tiny_config):
    policy, reference = _models(tokenizer, tiny_config)
    with pytest.raises(ValueError, match="beta"):
        ImplicitRewardSource(policy, reference, beta=0.0, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        ImplicitRewardSource(policy, reference)
