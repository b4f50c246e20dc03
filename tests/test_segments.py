"""Segmenters and the char -> token -> shifted-grid mapping (word-level and byte-level BPE tokenizers)."""

import pytest
import torch

from rlhf_lightning.segments import (
    char_ends_to_token_indices,
    completion_to_shifted_grid,
    get_segmenter,
    sentence_spans,
    sequence_spans,
    sub_sentence_spans,
    token_char_ends,
)

TEXT = "The plot, sadly, was thin; fine acting. Wow!! Great fun, truly and"


def texts(text, spans):
    return [text[s:e] for s, e in spans]


def test_sentence_spans_edge_cases():
    assert texts(TEXT, sentence_spans(TEXT)) == ["The plot, sadly, was thin; fine acting.", "Wow!!", "Great fun, truly and"]
    assert sentence_spans("") == [] and sentence_spans("   ") == []
    assert texts("no punctuation here  ", sentence_spans("no punctuation here  ")) == ["no punctuation here"]
    # multiple punctuation is one end; a run of marks on its own is a segment
    assert texts("Really?! Yes... ok.", sentence_spans("Really?! Yes... ok.")) == ["Really?!", "Yes...", "ok."]
    assert texts(" . a.", sentence_spans(" . a.")) == [".", "a."]


def test_sentence_spans_agree_with_gold_scorers():
    from rlhf_lightning.synthetic.scorers import split_sentences

    for text in [TEXT, "", "a. b", "..a!? b c", "  hi  ", "x.y. z"]:
        assert sentence_spans(text) == split_sentences(text)


def test_sub_sentence_spans_merge_short_pieces():
    assert texts(TEXT, sub_sentence_spans(TEXT)) == [
        "The plot, sadly,",  # "The plot," (2 words) merged forward
        "was thin; fine acting.",  # "fine acting." (2 words, last of its sentence) merged backward
        "Wow!!",  # a sentence shorter than the minimum stays one segment; never merged across sentences
        "Great fun, truly and",  # truncated last segment
    ]
    assert texts(TEXT, sub_sentence_spans(TEXT, min_words=1)) == [
        "The plot,", "sadly,", "was thin;", "fine acting.", "Wow!!", "Great fun,", "truly and"
    ]
    long = "a bb, c dd, eeeeeeeeee."
    assert texts(long, sub_sentence_spans(long, min_words=1, min_chars=8)) == ["a bb, c dd,", "eeeeeeeeee."]
    assert sub_sentence_spans("") == []


def test_sequence_spans_and_registry():
    assert sequence_spans(TEXT) == [(0, len(TEXT))]
    assert sequence_spans("") == [(0, 0)]  # one (empty) segment: the sequence reward is still paid
    assert get_segmenter("sub_sentence", min_words=1)(TEXT) == sub_sentence_spans(TEXT, min_words=1)
    with pytest.raises(ValueError, match="granularity"):
        get_segmenter("paragraph")
    with pytest.raises(TypeError):
        get_segmenter("sentence", min_words=2)


def _word_level():
    from rlhf_lightning.synthetic.tokenizer import build_word_level_tokenizer

    return build_word_level_tokenizer("the plot was thin fine acting wow great fun truly and sadly".split())


def _bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["The movie was great. I loved it!", "The plot, sadly, was thin; fine acting.", "Wow!! Great fun, truly."]
    backend.train_from_iterator(corpus * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>")


def _completion_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def _last_tokens(tokenizer, text, spans_fn):
    ids = _completion_ids(tokenizer, text)
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    ends = token_char_ends(tokenizer, ids, decoded)
    assert ends == sorted(ends) and ends[-1] == len(decoded)
    index = char_ends_to_token_indices([e for _, e in spans_fn(decoded)], ends)
    # the prefix up to and including each last token decodes to text that ends with the segment
    prefixes = [tokenizer.decode(ids[: j + 1], skip_special_tokens=True) for j in index]
    return ids, decoded, index, prefixes


def test_word_level_mapping():
    tokenizer = _word_level()
    ids, decoded, index, prefixes = _last_tokens(tokenizer, TEXT.lower(), sentence_spans)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert [tokens[j] for j in index] == [".", "!", "and"]  # "!!" is two tokens: the second ends the sentence
    assert [p.rstrip() for p in prefixes] == [decoded[:e] for _, e in sentence_spans(decoded)]
    assert tokens[-1] == "</s>" and index[-1] == len(ids) - 2  # truncated sentence: its last word, not EOS
    _, decoded, index, prefixes = _last_tokens(tokenizer, TEXT.lower(), sub_sentence_spans)
    assert [p for p in prefixes] == [decoded[:e] for _, e in sub_sentence_spans(decoded)]


def test_bpe_mapping_with_multibyte_characters():
    tokenizer = _bpe()
    text = "The plot was great. Café naïve, wow!! and"
    ids, decoded, index, prefixes = _last_tokens(tokenizer, text, sentence_spans)
    assert decoded == text
    assert prefixes == ["The plot was great.", "The plot was great. Café naïve, wow!!", text]
    # a byte-level token ending inside "é" (decoded as U+FFFD) has not produced "é" yet
    ends = token_char_ends(tokenizer, ids, decoded)
    cafe_end = text.index("é") + 1
    first = next(j for j, e in enumerate(ends) if e >= cafe_end)
    assert tokenizer.decode(ids[: first + 1]).endswith("Café")
    _, _, index, prefixes = _last_tokens(tokenizer, text, lambda t: sub_sentence_spans(t, min_words=1))
    assert prefixes == ["The plot was great.", "The plot was great. Café naïve,", "The plot was great. Café naïve, wow!!", text]


def test_empty_completion_and_uncovered_ends():
    tokenizer = _word_level()
    ids = [tokenizer.eos_token_id]  # the policy emitted EOS right away
    ends = token_char_ends(tokenizer, ids, "")
    assert ends == [0]
    assert char_ends_to_token_indices([0], ends) == [0]  # the sequence segment lands on EOS
    assert char_ends_to_token_indices([3, 99], [1, 3, 3]) == [1, 2]  # first covering token; beyond -> last
    with pytest.raises(ValueError):
        char_ends_to_token_indices([0], [])


def test_shifted_grid_matches_rollout_convention():
    # P = 3 prompt tokens, completion token j at input_ids[:, 3 + j], produced by the action at column 2 + j
    input_ids = torch.tensor([[0, 5, 6, 7, 8, 9, 3]])
    completion_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    mask = completion_mask[:, 1:]  # Rollout.mask (no padding here)
    columns = completion_to_shifted_grid(torch.tensor([0, 3]), prompt_length=3)
    assert columns.tolist() == [2, 5]
    assert mask[0, columns].tolist() == [1, 1] and input_ids[0, columns + 1].tolist() == [7, 3]
    assert columns[-1] == mask.shape[1] - 1  # the last completion token is the last action


# ---- segmentation edge cases: empty completion, no punctuation, truncated last segment ----------------


def test_segmenters_on_empty_and_whitespace_completions():
    for text in ("", "   ", "\n"):
        assert sentence_spans(text) == [] and sub_sentence_spans(text) == []
        assert sub_sentence_spans(text, min_words=1) == []
        assert sequence_spans(text) == [(0, len(text))]  # paid anyway (on EOS, see the module docstring)
    # a completion of marks only is one segment at every granularity, not dropped
    assert sentence_spans("...") == sub_sentence_spans("...") == [(0, 3)]


def test_segmenters_without_punctuation():
    text = "the plot was thin and the acting fine"
    for spans_fn in (sentence_spans, sub_sentence_spans, sequence_spans):
        assert spans_fn(text) == [(0, len(text))]
    # a single word is shorter than min_words but has nothing to merge with: it stays one segment
    assert sub_sentence_spans("great") == [(0, 5)]
    # surrounding whitespace is never part of a segment
    assert texts("  great fun  ", sentence_spans("  great fun  ")) == ["great fun"]


def test_truncated_last_segment_merges_backward_within_its_sentence():
    text = "wow. the plot was thin, and"  # cut after "and" by max_new_tokens
    assert texts(text, sentence_spans(text)) == ["wow.", "the plot was thin, and"]
    # "and" (1 word < 3) is the last piece of its sentence: glued to the clause before it
    assert texts(text, sub_sentence_spans(text)) == ["wow.", "the plot was thin, and"]
    assert texts(text, sub_sentence_spans(text, min_words=1)) == ["wow.", "the plot was thin,", "and"]
    # the truncated piece is long enough: it is its own segment
    text = "the plot was thin, and the acting was"
    assert texts(text, sub_sentence_spans(text)) == ["the plot was thin,", "and the acting was"]


def test_mapping_without_punctuation_and_without_eos():
    tokenizer = _word_level()
    text = "the plot was thin and fine acting"
    with_eos = _completion_ids(tokenizer, text)
    truncated = with_eos[:-1]  # max_new_tokens reached: no EOS
    for ids in (with_eos, truncated):
        ends = token_char_ends(tokenizer, ids, text)
        (index,) = char_ends_to_token_indices([e for _, e in sentence_spans(text)], ends)
        assert index == len(truncated) - 1  # the last word: EOS (if any) is not part of the sentence
    assert token_char_ends(tokenizer, [], "") == []  # nothing generated: no token to pay


def test_bpe_mapping_of_a_completion_cut_inside_a_word():
    tokenizer = _bpe()
    full = tokenizer("Wow!! Great fun, truly.", add_special_tokens=False)["input_ids"]
    # cut the generation one token before the end of "truly" (BPE splits the rare word in pieces)
    cut = next(n for n in range(len(full), 0, -1) if not tokenizer.decode(full[:n]).endswith(("truly", "truly.")))
    ids = full[:cut]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith("Wow!! Great fun,") and not text.endswith((".", "truly"))
    spans = sentence_spans(text)
    assert texts(text, spans) == ["Wow!!", text[len("Wow!! "):]]  # the cut sentence is the last segment
    index = char_ends_to_token_indices([e for _, e in spans], token_char_ends(tokenizer, ids, text))
    assert index[-1] == len(ids) - 1  # paid on the last generated token
    assert tokenizer.decode(ids[: index[0] + 1]) == "Wow!!"
