"""Session fixtures: one tiny tokenizer and one tiny Llama-style config shared by every test."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores in CI: more intra-op threads than cores only adds contention.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TEST_WORDS = (
    "the a movie film story actor actors plot was is were great good bad awful boring fun loved hated "
    "it this that and but i we they very really not so acting music ending scenes review stars star "
    "one two three four five genre comedy drama horror action funny scary sad slow fast long short"
).split()

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    from rlhf_lightning.synthetic.tokenizer import build_word_level_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_word_level_tokenizer(TEST_WORDS, path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from rlhf_lightning.models import load_tokenizer

    return load_tokenizer(tokenizer_dir, padding_side="right")


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    """Inline config dict (copy it before mutating)."""
    return dict(TINY_LLAMA)


@pytest.fixture()
def tiny_model(tokenizer, tiny_config):
    from rlhf_lightning.models import load_causal_lm

    torch.manual_seed(0)
    return load_causal_lm(tiny_config, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def assets_dir() -> str:
    return os.path.join(os.path.dirname(__file__), "assets")
