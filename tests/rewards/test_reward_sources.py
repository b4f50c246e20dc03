"""Reward sources: function / import-path sources, gold adapter, ensembles by hand, reward-model source."""


import pytest
import torch

from rlhf_lightning.models import load_reward_model, reward_model_scores
from rlhf_lightning.rewards import (
    EnsembleRewardSource,
    FunctionRewardSource,
    FunctionSegmentRewardSource,
    GoldRewardSource,
    RewardModelSource,
    RewardSource,
    SegmentRewardSource,
    import_object,
)

PROMPTS = ["the movie was", "i hated it", "boring"]
COMPLETIONS = ["great fun.", "bad", ""]


def word_count(prompt, completion):
    return float(len(completion.split()))


def test_function_source_callable_and_import_path():
    source = FunctionRewardSource(word_count)
    assert isinstance(source, RewardSource) and source.name == "word_count"
    expected = torch.tensor([2.0, 1.0, 0.0])  # "great fun." -> 2 words
    torch.testing.assert_close(source(PROMPTS, COMPLETIONS), expected)
    by_path = FunctionRewardSource(f"{__name__}:word_count", name="words")
    assert by_path.name == "words" and by_path.fn is word_count
    torch.testing.assert_close(by_path(PROMPTS, COMPLETIONS), expected)
    batched = FunctionRewardSource(lambda ps, cs: [len(c) for c in cs], name="chars", batched=True)
    torch.testing.assert_close(batched(PROMPTS, COMPLETIONS), torch.tensor([10.0, 3.0, 0.0]))
    assert import_object("os.path:join") is import_object("os.path.join")
    with pytest.raises(AttributeError, match="no attribute"):
        FunctionRewardSource("os.path:not_there")


def test_gold_source_imports_synthetic_lazily(monkeypatch):
    import rlhf_lightning.synthetic as synthetic

    calls = []

    def fake_score_texts(name, prompts, completions):
        calls.append(name)
        return [len(c) * (1.0 if name == "sentiment" else -1.0) for c in completions]

    monkeypatch.setattr(synthetic, "score_texts", fake_score_texts, raising=False)
    source = GoldRewardSource("sentiment")
    assert source.name == "gold/sentiment"
    torch.testing.assert_close(source(PROMPTS, COMPLETIONS), torch.tensor([10.0, 3.0, 0.0]))
    assert calls == ["sentiment"]


def test_ensemble_aggregations_by_hand():
    """Members a = [1, 4], b = [3, 0], c = [2, 2] (K=3, N=2).
    mean = [2, 2]; min = [1, 0]; population var = [((1-2)^2 + 1 + 0)/3, (4 + 4 + 0)/3] = [2/3, 8/3];
    uncertainty with lambda = 0.5: [2 - 1/3, 2 - 4/3] = [5/3, 2/3]."""
    values = {"a": [1.0, 4.0], "b": [3.0, 0.0], "c": [2.0, 2.0]}
    members = [FunctionRewardSource(lambda ps, cs, v=v: v, name=k, batched=True) for k, v in values.items()]
    prompts, completions = ["x", "y"], ["1", "2"]
    mean = EnsembleRewardSource(members, "mean")
    torch.testing.assert_close(mean(prompts, completions), torch.tensor([2.0, 2.0]))
    assert mean.last_member_scores.shape == (3, 2)
    torch.testing.assert_close(EnsembleRewardSource(members, "min")(prompts, completions), torch.tensor([1.0, 0.0]))
    unc = EnsembleRewardSource(members, "uncertainty", uncertainty_coef=0.5)
    torch.testing.assert_close(unc(prompts, completions), torch.tensor([5 / 3, 2 / 3]))
    with pytest.raises(ValueError, match="aggregation"):
        EnsembleRewardSource(members, "max")


def test_weighted_ensemble_by_hand():
    """MORLHF's scalarisation: weights [0.7, 0.3] over a = [1, 4], b = [3, 0] give [0.7 + 0.9, 2.8 + 0] = [1.6, 2.8];
    weights [2, 1, 1] over a, b, c = [2, 2] give the weighted mean [(2 + 3 + 2) / 4, (8 + 0 + 2) / 4] = [1.75, 2.5]."""
    values = {"a": [1.0, 4.0], "b": [3.0, 0.0], "c": [2.0, 2.0]}
    members = [FunctionRewardSource(lambda ps, cs, v=v: v, name=k, batched=True) for k, v in values.items()]
    prompts, completions = ["x", "y"], ["1", "2"]
    two = EnsembleRewardSource(members[:2], weights=[0.7, 0.3])
    torch.testing.assert_close(two(prompts, completions), torch.tensor([1.6, 2.8]))
    three = EnsembleRewardSource(members, weights=[2, 1, 1])
    torch.testing.assert_close(three(prompts, completions), torch.tensor([1.75, 2.5]))
    torch.testing.assert_close(  # equal weights are the plain mean
        EnsembleRewardSource(members, weights=[1, 1, 1])(prompts, completions), torch.tensor([2.0, 2.0]))
    with pytest.raises(ValueError, match="one per source"):
        EnsembleRewardSource(members, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="positive sum"):
        EnsembleRewardSource(members[:2], weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="'mean' aggregation only"):
        EnsembleRewardSource(members[:2], "min", weights=[0.5, 0.5])


def test_segment_source_adapter():
    def sentences(prompt, completion):
        ends = [i + 1 for i, ch in enumerate(completion) if ch == "."]
        return [(end, float(k)) for k, end in enumerate(ends)]

    source = FunctionSegmentRewardSource(sentences)
    assert isinstance(source, SegmentRewardSource)
    assert source(["p", "p"], ["a b. c.", "none"]) == [[(4, 0.0), (7, 1.0)], []]
    with pytest.raises(ValueError, match="char_end"):
        FunctionSegmentRewardSource(lambda p, c: [(99, 1.0)])(["p"], ["short"])


def test_reward_model_source_matches_reward_model_scores(tmp_path, tokenizer, tiny_config):
    torch.manual_seed(0)
    model = load_reward_model(tiny_config, tokenizer=tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    source = RewardModelSource(str(tmp_path), batch_size=2)
    assert not any(p.requires_grad for p in source.model.parameters()) and not source.model.training
    scores = source(PROMPTS, COMPLETIONS)
    assert scores.shape == (3,) and scores.dtype == torch.float32

    # By hand: prompt ids (with BOS) + completion ids + EOS, one unpadded sequence at a time.
    model.eval()
    for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        ids = tokenizer(prompt)["input_ids"] + tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ids + [tokenizer.eos_token_id]])
        with torch.no_grad():
            expected = reward_model_scores(model, ids, torch.ones_like(ids))
        torch.testing.assert_close(scores[row], expected[0], atol=1e-5, rtol=0)
    # The output follows the device of the policy batch it is given (CPU here).
    assert source(PROMPTS, COMPLETIONS, input_ids=torch.zeros(3, 2, dtype=torch.long)).device.type == "cpu"
