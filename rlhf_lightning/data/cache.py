"""Fingerprints and the on-disk cache of tokenized datasets.

A cache entry is keyed by what determines its content: the data (a file's content hash, a
``datasets.Dataset`` fingerprint, or a hash of in-memory records), the tokenizer (its full serialized
definition and chat template), the record kind and the length/truncation policy. Entries are JSON
(plain lists of ints, safe to load) written atomically, so concurrent writers — e.g. several DDP ranks —
never leave a half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Mapping

from rlhf_lightning.data.records import RecordSource, is_hf_dataset

__all__ = ["CACHE_FORMAT_VERSION", "source_fingerprint", "tokenizer_fingerprint", "cache_key", "read_cache", "write_cache"]

# Bump when the tokenized layout or the truncation semantics change: old entries then stop matching.
CACHE_FORMAT_VERSION = 1


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_fingerprint(source: RecordSource) -> str:
    """Content fingerprint of a record source (a path's bytes, not its name or modification time)."""
    if isinstance(source, (str, os.PathLike)):
        return "file:" + _file_sha256(os.fspath(source))
    if is_hf_dataset(source):
        return "dataset:" + str(source._fingerprint)
    payload = json.dumps(list(source), sort_keys=True, default=repr, ensure_ascii=False)
    return "records:" + _sha256(payload.encode("utf-8"))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything that changes token ids: vocabulary, merges, normalizer, pre-tokenizer, the
    post-processor (BOS handling), special tokens, and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:  # slow tokenizers: the vocabulary and the tokenizer class are the best stable description
        definition = json.dumps(
            {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items())}, ensure_ascii=False
        )
    extras = {
        "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos": getattr(tokenizer, "eos_token_id", None),
    }
    return _sha256(definition.encode("utf-8") + json.dumps(extras, sort_keys=True, default=str).encode("utf-8"))


def cache_key(**parts: Any) -> str:
    """One hex digest over named parts (order-independent)."""
    parts = {"format": CACHE_FORMAT_VERSION, **parts}
    return _sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8"))


def _entry_path(cache_dir: str | os.PathLike, kind: str, key: str) -> str:
    return os.path.join(os.fspath(cache_dir), f"{kind}-{key[:24]}.json")


def read_cache(cache_dir: str | os.PathLike, kind: str, key: str) -> dict[str, Any] | None:
    """The cached payload for ``key``, or ``None`` (missing, unreadable, or a different full key)."""
    path = _entry_path(cache_dir, kind, key)
    try:
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict) or payload.get("key") != key:
        return None
    return payload


def write_cache(cache_dir: str | os.PathLike, kind: str, key: str, payload: Mapping[str, Any]) -> str:
    """Write ``payload`` for ``key`` atomically (temp file in the same folder, then ``os.replace``)."""
    os.makedirs(cache_dir, exist_ok=True)
    path = _entry_path(cache_dir, kind, key)
    fd, tmp_path = tempfile.mkstemp(dir=os.fspath(cache_dir), prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({**payload, "key": key}, handle, ensure_ascii=False, separators=(",", ":"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    return path
