"""Fixtures for the data-layer tests."""

from __future__ import annotations

import pytest


class CountingTokenizer:
    """Forwards everything to a real tokenizer and counts encode calls (``__call__``)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.fixture()
def counting_tokenizer():
    """Factory: ``counting_tokenizer(tokenizer)`` wraps a tokenizer so tests can assert it was (not) called."""
    return CountingTokenizer
