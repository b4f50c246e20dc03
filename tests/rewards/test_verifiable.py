"""VerifiableRewardSource: the RewardSource protocol over the verifiable rules, and its errors."""

import pytest
import torch

from rlhf_lightning.rewards import VerifiableRewardSource


def test_scores_each_completion_against_its_prompt():
    source = VerifiableRewardSource("states_rating")
    prompts = ["review of a drama film starring omar. rating 2 out of 5."] * 2 + [
        "film review. genre western. lead lena. rating 5 out of 5."]
    completions = ["my rating is 2 out of 5.", "my rating is 5 out of 5.", "5 out of 5 from me."]
    scores = source(prompts, completions)
    assert scores.dtype == torch.float32 and scores.tolist() == [1.0, 0.0, 1.0]
    assert source.name == "verifiable/states_rating"


def test_bad_task_and_length_mismatch():
    with pytest.raises(ValueError, match="Unknown verifiable task"):
        VerifiableRewardSource("sudoku")
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        VerifiableRewardSource()(["a", "b"], ["c"])
