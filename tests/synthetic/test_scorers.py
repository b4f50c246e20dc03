"""Gold scorers on hand-written texts: known scores, spans, robustness to junk, objective conflict."""

from __future__ import annotations

import random

import pytest

from rlhf_lightning.synthetic import (
    GOLD_OBJECTIVES,
    SCORE_RANGES,
    GoldScorer,
    generate_candidate,
    get_scorer,
    make_prompt,
    parse_prompt,
    sample_facts,
    score_all,
    score_texts,
    split_sentences,
)

LOW = "review of a horror film starring nina. rating 1 out of 5."
HIGH = "a horror film starring nina. the critic rates it 5 out of 5."


def _sentences(name: str, completion: str, prompt: str = LOW) -> list[float]:
    return get_scorer(name).score(prompt, completion).sentence_scores


def test_parse_prompt():
    assert parse_prompt(LOW) == ("horror", "nina", 1)
    assert parse_prompt("film review. genre western. lead omar. rating 3 out of 5.") == ("western", "omar", 3)
    assert parse_prompt("hello") == (None, None, None)


@pytest.mark.parametrize(
    "text, sentences",
    [
        ("", []),
        ("   ", []),
        ("the plot was great.", ["the plot was great."]),
        (" a b.  c d!! e f", ["a b.", "c d!!", "e f"]),
        (". the plot.", [".", "the plot."]),
        ("the plot was  ", ["the plot was"]),
    ],
)
def test_split_sentences(text, sentences):
    assert [text[a:b] for a, b in split_sentences(text)] == sentences


def test_spans_index_the_completion():
    completion = "the plot was dull.  i hated the scares. nina plays the lead"
    for name in GOLD_OBJECTIVES:
        result = get_scorer(name).score(LOW, completion)
        assert [completion[a:b] for a, b in result.spans] == [
            "the plot was dull.", "i hated the scares.", "nina plays the lead"
        ]
        assert len(result.sentence_scores) == 3
        assert isinstance(get_scorer(name), GoldScorer)


@pytest.mark.parametrize(
    "sentence, expected",
    [
        ("the plot was great.", 1.0),
        ("the plot was good.", 0.5),
        ("the plot was dull.", -0.5),
        ("the plot was very good.", 0.75),  # intensifier x1.5
        ("the plot was very great.", 1.0),  # clipped
        ("the plot was somewhat awful.", -0.5),  # diminisher x0.5
        ("the plot was not great.", -0.75),  # negation: flip, x0.75
        ("i did not enjoy the plot.", -0.375),
        ("the plot was dull, but the music was great.", 0.25),  # mean of -0.5 and 1
        ("the plot was not dull, but the music was awful.", -0.3125),  # "but" ends the negation's clause
        ("it is set in the desert.", 0.0),
        ("great great great great.", 1.0),  # stacking gains nothing over one word
    ],
)
def test_sentiment_known_values(sentence, expected):
    assert _sentences("sentiment", sentence) == [pytest.approx(expected)]


def test_sentiment_total_is_sentence_mean_and_repeats_score_zero():
    result = get_scorer("sentiment").score(LOW, "the plot was great. the ending was dull. the plot was great.")
    assert result.sentence_scores == [1.0, -0.5, 0.0]
    assert result.total == pytest.approx(0.5 / 3)


@pytest.mark.parametrize(
    "prompt, sentence, expected",
    [
        (LOW, "it is a horror film.", 1.0),
        (LOW, "it is a comedy film.", -1.0),
        (LOW, "the scares are the main draw.", 1.0),
        (LOW, "the jokes are the main draw.", -1.0),  # a comedy's signature element
        (LOW, "nina plays the lead.", 1.0),
        (LOW, "marco plays the lead.", -1.0),
        (LOW, "i give it 1 out of 5.", 1.0),
        (LOW, "i give it 2 out of 5.", 0.0),
        (LOW, "i give it 4 out of 5.", -1.0),
        (LOW, "the plot was awful.", 1.0),  # expected polarity -1
        (LOW, "the plot was dull.", 0.5),
        (LOW, "the plot was great.", -1.0),
        (HIGH, "the plot was great.", 1.0),
        (LOW, "nina was awful in the lead role.", 1.0),
        (LOW, "marco was awful in the lead role.", -1.0),  # the worst claim decides
        (LOW, "i saw it last week.", 0.0),  # no claim
    ],
)
def test_consistency_known_values(prompt, sentence, expected):
    assert _sentences("consistency", sentence, prompt) == [pytest.approx(expected)]


def test_fluency_known_values():
    fluency = get_scorer("fluency")
    assert fluency.score(LOW, "the plot was great. i hated the scares.").sentence_scores == [1.0, 1.0]
    assert fluency.score(LOW, "the plot was great. i hated the scares.").total == 1.0
    assert fluency.score(LOW, "the plot was great.").total == pytest.approx(0.8)  # one sentence
    assert _sentences("fluency", "the plot was great") == [0.5]  # unterminated
    assert _sentences("fluency", "great.") == [pytest.approx(1 / 3 * 0.5)]  # 1 word: length 1/3; "<s> great" is not a template bigram, "great ." is
    assert _sentences("fluency", "the the the the.") == [0.0]
    assert _sentences("fluency", "xyz qq.") == [0.0]
    # content words reused in a later sentence cost 0.15 each; a verbatim repeat scores 0
    assert _sentences("fluency", "the plot was great. the plot was great.") == [1.0, 0.0]
    assert _sentences("fluency", "the plot was great. the music was great.") == [1.0, pytest.approx(0.85)]
    shuffled = _sentences("fluency", "was plot the great.")[0]
    assert 0.0 < shuffled < 0.5


@pytest.mark.parametrize("completion", ["", " ", ".", "!!!", "the", "the plot was", "<unk> <pad>", "x" * 500, "a. " * 200])
def test_scores_are_defined_and_in_range_for_junk(completion):
    for name, result in score_all(LOW, completion).items():
        low, high = SCORE_RANGES[name]
        assert low <= result.total <= high
        assert all(low <= s <= high for s in result.sentence_scores)
        assert len(result.spans) == len(result.sentence_scores)
    empty = score_all(LOW, "")
    assert {n: r.total for n, r in empty.items()} == {n: SCORE_RANGES[n][0] for n in GOLD_OBJECTIVES}


def test_sentiment_and_consistency_conflict_on_low_ratings():
    rng = random.Random(0)
    for rating in (1, 2):
        facts = sample_facts(rng)._replace(rating=rating)
        prompt = make_prompt(facts)
        candidates = [generate_candidate(rng, facts) for _ in range(300)]
        sentiment = score_texts("sentiment", [prompt] * len(candidates), candidates)
        consistency = score_texts("consistency", [prompt] * len(candidates), candidates)
        best = max(range(len(candidates)), key=sentiment.__getitem__)
        ranked = sorted(consistency)
        assert consistency[best] <= ranked[len(ranked) // 4], (rating, candidates[best])
        # and the correlation over candidates is negative
        n = len(candidates)
        ms, mc = sum(sentiment) / n, sum(consistency) / n
        cov = sum((s - ms) * (c - mc) for s, c in zip(sentiment, consistency))
        assert cov < 0


def test_get_scorer_rejects_unknown_names():
    with pytest.raises(ValueError, match="sentiment"):
        get_scorer("helpfulness")
    with pytest.raises(ValueError):
        score_texts("sentiment", ["a"], [])


def test_genre_key_words_are_unambiguous():
    # A genre key word must occur in exactly one phrase of the world, or consistency would misread
    # an innocent phrase ("the story") as a claim about the genre.
    from rlhf_lightning.synthetic.lexicon import CLASSES, GENRE_ASPECTS, GENRE_KEYWORDS, TEMPLATES, tokenize_words

    phrases = [f for fillers in CLASSES.values() for f in fillers] + [t for ts in TEMPLATES.values() for t in ts]
    for word in GENRE_KEYWORDS:
        assert sum(word in tokenize_words(p) for p in phrases) == 1, word
    for genre, (singular, plural) in GENRE_ASPECTS.items():
        for phrase in (*singular, *plural):
            keys = [GENRE_KEYWORDS[w] for w in phrase.split() if w in GENRE_KEYWORDS]
            assert keys == [genre], phrase
