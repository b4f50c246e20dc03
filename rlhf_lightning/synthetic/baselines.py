"""Reference numbers a trained model must beat on the embedded world.

The issue's acceptance bar for SFT is a held-out perplexity at least 3x lower than a unigram model's on
the same tokenization; :func:`unigram_perplexity` is that unigram model.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence

__all__ = ["unigram_perplexity"]


def unigram_perplexity(
    train_token_ids: Iterable[Sequence[int]],
    val_token_ids: Iterable[Sequence[int]],
    *,
    vocab_size: int | None = None,
) -> float:
    """Held-out perplexity of an add-one smoothed unigram model.

    ``p(t) = (count_train(t) + 1) / (N_train + V)`` and the result is
    ``exp(-1/N_val * sum_val log p(t))``, over every token of every validation sequence.

    Args:
        train_token_ids: token id sequences the counts come from.
        val_token_ids: token id sequences scored. To compare with an SFT model, pass exactly the tokens
            its loss covers (completion ids + EOS, under the data layer's convention).
        vocab_size: ``V``; defaults to 1 + the largest id seen (pass ``len(tokenizer)`` to match a model).
    """
    counts: Counter[int] = Counter()
    for ids in train_token_ids:
        counts.update(int(i) for i in ids)
    val = [int(i) for ids in val_token_ids for i in ids]
    if not val:
        raise ValueError("val_token_ids holds no tokens.")
    largest = max([*counts, *val])
    size = largest + 1 if vocab_size is None else int(vocab_size)
    if size <= largest:
        raise ValueError(f"vocab_size={size} but token id {largest} occurs.")
    total = sum(counts.values()) + size
    nll = -sum(math.log((counts[i] + 1) / total) for i in val) / len(val)
    return math.exp(nll)
