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


# ---- best-of-n -------------------------------------------------------------------------------------

import itertools  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402

from rlhf_lightning.evaluation import (  # noqa: E402
    best_of_n, best_of_n_expectation, best_of_n_kl, best_of_n_weights,
)
from rlhf_lightning.rewards import FunctionRewardSource  # noqa: E402


def test_best_of_n_kl_by_hand():
    # log n - (n - 1) / n: n = 1 -> 0; n = 2 -> log 2 - 1/2; n = 256 -> log 256 - 255/256.
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(0.693147 - 0.5, abs=1e-6)
    assert best_of_n_kl(256) == pytest.approx(5.545177 - 0.996094, abs=1e-6)
    with pytest.raises(ValueError, match="n must be >= 1"):
        best_of_n_kl(0)


def test_best_of_n_weights_by_hand():
    # N = 4, n = 2: the i-th smallest is the max of a 2-subset with probability C(i-1, 1) / C(4, 2) = (i-1)/6.
    torch.testing.assert_close(best_of_n_weights(4, 2), torch.tensor([0, 1 / 6, 2 / 6, 3 / 6], dtype=torch.float64))
    torch.testing.assert_close(best_of_n_weights(5, 1), torch.full((5,), 0.2, dtype=torch.float64))  # n = 1: any draw
    torch.testing.assert_close(best_of_n_weights(5, 5), torch.tensor([0, 0, 0, 0, 1.0], dtype=torch.float64))  # the max
    with pytest.raises(ValueError, match="1 <= n <= num_samples"):
        best_of_n_weights(4, 5)


def test_best_of_n_expectation_equals_enumerating_every_subset():
    generator = torch.Generator().manual_seed(0)
    selection = torch.randn(3, 7, generator=generator)
    values = torch.randn(3, 7, generator=generator)
    for n in (1, 2, 3, 7):
        expected = []
        for p in range(3):
            picks = [values[p, max(subset, key=lambda j: selection[p, j])] for subset in itertools.combinations(range(7), n)]
            expected.append(sum(picks) / len(picks))
        torch.testing.assert_close(best_of_n_expectation(selection, values, n), torch.tensor(expected, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(P, N\)"):
        best_of_n_expectation(selection, values[:, :3], 2)


def test_best_of_n_picks_by_the_given_reward_source(tiny_model, tokenizer):
    words = FunctionRewardSource(word_count, name="words")  # a RewardSource: batched, returns a tensor
    chars = lambda prompt, completion: float(len(completion))  # noqa: E731  a plain function reports
    result = best_of_n(tiny_model, tokenizer, PROMPTS, selectors={"words": words}, scorers={"chars": chars},
                       ns=[1, 2, 8], max_new_tokens=6, batch_size=2, seed=0)
    assert len(result.samples) == len(PROMPTS) * 8
    rows = {row["n"]: row for row in result.rows}
    assert set(rows) == {1, 2, 8} and all(row["selector"] == "words" for row in result.rows)
    assert rows[8]["kl_bon"] == pytest.approx(math.log(8) - 7 / 8) and rows[8]["sqrt_kl"] == pytest.approx(rows[8]["kl_bon"] ** 0.5)
    grid = result.scores["words"]  # (P, N)
    # n = 1 is the plain sample mean; n = N is the per-prompt maximum of the selector.
    assert rows[1]["score/words"] == pytest.approx(grid.mean().item())
    assert rows[8]["score/words"] == pytest.approx(grid.max(dim=1).values.mean().item())
    assert rows[1]["score/words"] <= rows[2]["score/words"] <= rows[8]["score/words"]
    # The reported metric at n = N is that of the argmax draw, which best() returns.
    best = result.best("words")
    assert [s["prompt_index"] for s in best] == list(range(len(PROMPTS)))
    assert [s["score/words"] for s in best] == grid.max(dim=1).values.tolist()
    assert rows[8]["score/chars"] == pytest.approx(sum(s["score/chars"] for s in best) / len(best))
    assert result.best("words", n=1) == [result.samples[p * 8] for p in range(len(PROMPTS))]


def test_best_of_n_rejects_bad_arguments(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="at least one selector"):
        best_of_n(tiny_model, tokenizer, PROMPTS, selectors={}, ns=[1, 2])
    with pytest.raises(ValueError, match=r"every n must be in \[1, num_samples=4\]"):
        best_of_n(tiny_model, tokenizer, PROMPTS, selectors={"w": word_count}, ns=[1, 8], num_samples=4)
    with pytest.raises(ValueError, match="no reference"):
        best_of_n(tiny_model, tokenizer, PROMPTS, selectors={"w": word_count}, ns=[2], reference=tiny_model)
