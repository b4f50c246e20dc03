"""A word-level tokenizer built with ``tokenizers`` and saved as a standard HF tokenizer directory.

The embedded world (and the test suite) cannot download a tokenizer, so we build one: whitespace +
punctuation pre-tokenization, one id per word, and four special tokens. The saved directory holds a
``tokenizer.json`` and loads with ``AutoTokenizer.from_pretrained(path)`` like any Hub tokenizer.
"""

from __future__ import annotations

import os
from typing import Iterable

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)

__all__ = ["build_word_level_tokenizer", "SPECIAL_TOKENS", "PAD_TOKEN", "UNK_TOKEN", "BOS_TOKEN", "EOS_TOKEN"]


def build_word_level_tokenizer(words: Iterable[str], save_dir: str | os.PathLike | None = None, *, model_max_length: int = 512):
    """Build a ``PreTrainedTokenizerFast`` over ``words`` (plus punctuation and special tokens).

    Args:
        words: vocabulary; duplicates are ignored, order is kept (ids are deterministic).
        save_dir: if given, ``save_pretrained`` there (writes ``tokenizer.json``).
        model_max_length: stored in the tokenizer config.

    Decoding joins words with spaces and glues punctuation to the previous word, so
    ``decode(encode(text)) == text`` for text written as ``"word word, word."``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, ".", ",", ";", "!", "?", *words):
        if token not in vocab:
            vocab[token] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
    # WordPiece's decoder with an empty prefix joins on spaces and cleans up " ." -> "."
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    # Like Llama's tokenizer: add_special_tokens=True prepends BOS (prompts); completions are encoded
    # with add_special_tokens=False and get EOS appended by the data layer.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer
