"""evaluate_policy: KL of a policy to a copy of itself is 0, results are deterministic per seed."""

import copy

import torch

from rlhf_lightning.evaluation import evaluate_policy
from rlhf_lightning.models import freeze, load_causal_lm

PROMPTS = ["the movie was", "i loved it", "boring", "the plot"]


def word_count(prompt, completion):
    return float(len(completion.split()))


def test_kl_to_itself_is_zero_and_metrics_are_complete(tiny_model, tokenizer):
    reference = freeze(copy.deepcopy(tiny_model))
    result = evaluate_policy(
        tiny_model, tokenizer, PROMPTS, scorers={"words": word_count}, reference=reference,
        num_samples=2, max_new_tokens=5, batch_size=3, seed=0,
    )
    assert len(result.samples) == 8
    assert abs(result.metrics["kl_to_reference"]) < 1e-5
    assert [s["prompt_index"] for s in result.samples] == [0, 0, 1, 1, 2, 2, 3, 3]
    for sample in result.samples:
        assert sample["score/words"] == word_count(sample["prompt"], sample["completion"])
        assert 1 <= sample["length"] <= 5
    lengths = torch.tensor([float(s["length"]) for s in result.samples])
    assert abs(result.metrics["response_length"] - lengths.mean().item()) < 1e-6
    assert set(result.metrics) >= {"score/words", "kl_to_reference", "response_length", "finished_fraction"}


def test_kl_to_a_different_reference_is_positive_on_average(tiny_model, tokenizer, tiny_config):
    torch.manual_seed(123)
    other = freeze(load_causal_lm(tiny_config, tokenizer=tokenizer))
    result = evaluate_policy(tiny_model, tokenizer, PROMPTS, reference=other, num_samples=4, max_new_tokens=4, seed=0)
    assert result.metrics["kl_to_reference"] > 0


def test_deterministic_given_seed(tiny_model, tokenizer):
    kwargs = dict(scorers={"words": f"{__name__}:word_count"}, num_samples=2, max_new_tokens=6, batch_size=2)
    state = torch.get_rng_state()
    first = evaluate_policy(tiny_model, tokenizer, PROMPTS, seed=7, **kwargs)
    assert torch.equal(state, torch.get_rng_state())
    second = evaluate_policy(tiny_model, tokenizer, PROMPTS, seed=7, **kwargs)
    third = evaluate_policy(tiny_model, tokenizer, PROMPTS, seed=8, **kwargs)
    assert first.samples == second.samples and first.metrics == second.metrics
    assert [s["completion"] for s in first.samples] != [s["completion"] for s in third.samples]


def test_gold_objective_names(tiny_model, tokenizer, monkeypatch):
    import rlhf_lightning.synthetic as synthetic

    monkeypatch.setattr(synthetic, "score_texts", lambda name, ps, cs: [float(len(c)) for c in cs], raising=False)
    result = evaluate_policy(tiny_model, tokenizer, PROMPTS[:2], scorers=["sentiment"], max_new_tokens=3, seed=0)
    assert [s["gold/sentiment"] for s in result.samples] == [float(len(s["completion"])) for s in result.samples]
    assert "gold/sentiment" in result.metrics and "kl_to_reference" not in result.metrics
