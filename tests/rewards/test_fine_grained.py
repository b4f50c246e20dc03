"""Segment reward sources and their placement on tokens (FineGrainedReward)."""

import pytest
import torch

from rlhf_lightning.losses import dense_reward_from_segments
from rlhf_lightning.rewards import (
    FineGrainedReward,
    FunctionRewardSource,
    FunctionSegmentRewardSource,
    FunctionSegmentScorer,
    GoldSegmentScorer,
    RepetitionPenalty,
    SegmentRewardSpec,
    SegmentScorer,
    SegmentTextScorer,
)
from rlhf_lightning.segments import sentence_spans, sequence_spans, sub_sentence_spans
from rlhf_lightning.synthetic import get_scorer

PROMPT = "four stars. this comedy movie was"
COMPLETION = "the acting was great, the jokes were fun. the plot was bad. the acting was great"


def test_gold_segment_scorer_per_granularity():
    gold = get_scorer("sentiment").score(PROMPT, COMPLETION)
    scorer = GoldSegmentScorer("sentiment")
    assert isinstance(scorer, SegmentScorer) and scorer.name == "sentiment"
    (sentence,) = scorer([PROMPT], [COMPLETION], [sentence_spans(COMPLETION)])
    assert sentence == pytest.approx(gold.sentence_scores)
    assert sentence[0] > 0 > sentence[1] and sentence[2] == 1.0  # the truncated last sentence is scored too
    (sequence,) = scorer([PROMPT], [COMPLETION], [sequence_spans(COMPLETION)])
    assert sequence == pytest.approx([gold.total])  # mean over sentences = the gold total for sentiment
    (summed,) = GoldSegmentScorer("sentiment", aggregate="sum")([PROMPT], [COMPLETION], [sequence_spans(COMPLETION)])
    assert summed == pytest.approx([sum(gold.sentence_scores)])
    # sub-sentences: the clause that ends a sentence carries the sentence's score, the others 0
    clauses = sub_sentence_spans(COMPLETION)
    assert [COMPLETION[s:e] for s, e in clauses][:2] == ["the acting was great,", "the jokes were fun."]
    (sub,) = scorer([PROMPT], [COMPLETION], [clauses])
    assert sub == pytest.approx([0.0, *gold.sentence_scores])
    # an empty completion: no sentences; its sequence segment gets the objective's minimum
    assert scorer([PROMPT], [""], [sequence_spans("")]) == [[-1.0]]
    assert scorer([PROMPT], [""], [sentence_spans("")]) == [[]]


def test_normalized_sentence_rewards_have_the_sequence_budget():
    """sum_i s_i / n (sentence level, normalize=True) == mean_i s_i (sequence level, aggregate="mean")."""
    completions = [COMPLETION, "great fun.", "", "the plot was bad"]
    prompts = [PROMPT] * len(completions)
    for objective in ("sentiment", "fluency"):
        fine = FineGrainedReward([SegmentRewardSpec(GoldSegmentScorer(objective), "sentence", weight=0.5, normalize=True)])
        seq = FineGrainedReward([SegmentRewardSpec(GoldSegmentScorer(objective), "sequence", weight=0.5)])
        fine_totals, seq_totals = fine.score(prompts, completions).totals, seq.score(prompts, completions).totals
        # equal except for the empty completion, which has no sentence to pay (sequence: 0.5 * minimum)
        torch.testing.assert_close(fine_totals[[0, 1, 3]], seq_totals[[0, 1, 3]])
        assert fine_totals[2] == 0.0


def test_repetition_penalty_is_additive_over_segments():
    penalty = RepetitionPenalty(penalty=0.1)
    for spans_fn in (sentence_spans, sub_sentence_spans, sequence_spans):
        (scores,) = penalty([PROMPT], [COMPLETION], [spans_fn(COMPLETION)])
        assert sum(scores) == pytest.approx(-0.2)  # "acting" and "great" again; "the", "was" are no content words
    (by_sentence,) = penalty([PROMPT], [COMPLETION], [sentence_spans(COMPLETION)])
    assert by_sentence == pytest.approx([0.0, 0.0, -0.2])
    (any_word,) = RepetitionPenalty(penalty=1.0, vocabulary=None, min_chars=3)([PROMPT], [COMPLETION], [sentence_spans(COMPLETION)])
    assert any_word == pytest.approx([-1.0, -2.0, -4.0])  # "the" x1 | "the", "was" | "the", "acting", "was", "great"


def test_segment_text_scorer_function_and_reward_source():
    spans = [sentence_spans("good. bad fun.")]

    def n_words(prompt, text):
        return float(len(text.split()))

    assert SegmentTextScorer(n_words)(["p"], ["good. bad fun."], spans) == [[1.0, 2.0]]
    seen = []

    def record(prompts, completions):
        seen.extend(zip(prompts, completions))
        return [len(c) for c in completions]

    source = FunctionRewardSource(record, name="chars", batched=True)
    scorer = SegmentTextScorer(source, context="prefix")
    assert scorer.name == "chars"
    assert scorer(["p", "q"], ["good. bad fun.", ""], [spans[0], []]) == [[5.0, 8.0], []]
    assert seen == [("p", "good."), ("pgood. ", "bad fun.")]  # one batched call, prompt + preceding text


def test_placement_positions_and_sums(tokenizer):
    # tests/conftest.py word-level tokenizer: every word and mark is one token
    completion = "the movie was great, i loved it. the plot was"
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == completion
    reward = FineGrainedReward(
        [
            SegmentRewardSpec(FunctionSegmentScorer(lambda p, c, s: [1.0] * len(s), name="ones"), "sentence", weight=2.0),
            SegmentRewardSpec(
                FunctionSegmentScorer(lambda p, c, s: [10.0 * (k + 1) for k in range(len(s))], name="tens"),
                "sub_sentence",
                segmenter_kwargs={"min_words": 1},
            ),
            SegmentRewardSpec(FunctionSegmentScorer(lambda p, c, s: [100.0], name="seq"), "sequence", weight=0.5),
        ]
    )
    batch = reward(["p", "p"], [completion, ""], [ids, [tokenizer.eos_token_id]], tokenizer)
    dot, comma, was, eos = tokens.index("."), tokens.index(","), len(ids) - 2, len(ids) - 1
    row = sorted(zip(batch.positions[0][batch.mask[0]].tolist(), batch.rewards[0][batch.mask[0]].tolist()))
    assert row == sorted(
        [(dot, 2.0), (was, 2.0), (comma, 10.0), (dot, 20.0), (was, 30.0), (eos, 50.0)]
    )  # sentence ends and the sequence end (EOS, where PPO pays) differ for a finished completion
    assert batch.mask[1].sum() == 1 and batch.positions[1][batch.mask[1]].tolist() == [0]  # empty: EOS only
    torch.testing.assert_close(batch.totals, torch.tensor([114.0, 50.0]))
    torch.testing.assert_close(batch.per_source["tens"], torch.tensor([60.0, 0.0]))
    assert set(batch.per_source) == {"ones", "tens", "seq"}

    # on a rollout grid: rewards ending on the same token add up, KL on every valid token
    prompt_length, width = 2, 2 + len(ids)
    mask = torch.zeros(2, width - 1)
    mask[0, prompt_length - 1 : prompt_length - 1 + len(ids)] = 1
    mask[1, prompt_length - 1] = 1
    kl = torch.full((2, width - 1), 0.5) * mask
    columns = batch.positions + prompt_length - 1
    dense = dense_reward_from_segments(kl, batch.rewards, columns, mask, kl_coef=0.1, segment_mask=batch.mask)
    expected = -0.05 * mask
    expected[0, prompt_length - 1 + dot] += 22.0
    expected[0, prompt_length - 1 + comma] += 10.0
    expected[0, prompt_length - 1 + was] += 32.0
    expected[0, prompt_length - 1 + eos] += 50.0
    expected[1, prompt_length - 1] += 50.0
    torch.testing.assert_close(dense, expected)


def test_native_segment_source_and_validation(tokenizer):
    native = FunctionSegmentRewardSource(lambda p, c: [(len(c), 3.0)], name="native")
    reward = FineGrainedReward([SegmentRewardSpec(native, "native")])
    ids = tokenizer("great fun.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    batch = reward(["p"], ["great fun."], [ids], tokenizer)
    assert batch.positions[batch.mask].tolist() == [len(ids) - 2]  # the "." token, not EOS
    with pytest.raises(ValueError, match="granularity"):
        SegmentRewardSpec(native, "paragraph")
    with pytest.raises(ValueError, match="unique"):
        FineGrainedReward([SegmentRewardSpec(native, "native"), SegmentRewardSpec(native, "native")])
    bad = SegmentRewardSpec(FunctionSegmentScorer(lambda p, c, s: [1.0], name="bad"), "sentence")
    with pytest.raises(ValueError, match="one score per span"):
        FineGrainedReward([bad]).score(["p"], ["a. b."])


def test_placement_edge_cases_empty_unpunctuated_truncated(tokenizer):
    """Empty completion: no sentence to pay, the sequence segment lands on EOS; no punctuation: the one
    sentence ends on its last word; truncated (no EOS): everything ends on the last generated token."""
    eos = tokenizer.eos_token_id
    sentence = SegmentRewardSpec(FunctionSegmentScorer(lambda p, c, s: [1.0] * len(s), name="sent"), "sentence")
    sequence = SegmentRewardSpec(FunctionSegmentScorer(lambda p, c, s: [10.0] * len(s), name="seq"), "sequence")
    reward = FineGrainedReward([sentence, sequence])
    unpunctuated = "the movie was great"
    words = tokenizer(unpunctuated, add_special_tokens=False)["input_ids"]
    completions = ["", unpunctuated, unpunctuated, ""]
    ids = [[eos], words + [eos], words, []]  # the last row generated nothing at all (no token to pay)
    batch = reward(["p"] * 4, completions, ids, tokenizer)

    def paid(i):
        return sorted(zip(batch.positions[i][batch.mask[i]].tolist(), batch.rewards[i][batch.mask[i]].tolist()))

    assert paid(0) == [(0, 10.0)]  # EOS only
    assert paid(1) == [(len(words) - 1, 1.0), (len(words), 10.0)]  # "great", then EOS
    assert paid(2) == [(len(words) - 1, 1.0), (len(words) - 1, 10.0)]  # both on "great", the last action
    assert paid(3) == []
    torch.testing.assert_close(batch.totals, torch.tensor([10.0, 11.0, 11.0, 0.0]))
    torch.testing.assert_close(batch.per_source["sent"][:3], torch.tensor([0.0, 1.0, 1.0]))
