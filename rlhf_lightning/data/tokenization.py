"""Tokenizing validated records, with an explicit truncation policy, once per dataset.

Convention (``docs/CONTRACTS_INTERNAL.md``): prompt ids = ``tokenizer(prompt, add_special_tokens=True)``
(BOS when the tokenizer adds one); completion ids = ``tokenizer(completion, add_special_tokens=False)``
followed by ``eos_token_id``. Prompt and completion are encoded separately and joined at token level.

Truncation (``max_length`` is the prompt + completion total, ``max_prompt_length`` the prompt alone):

* ``"keep_end"`` — an over-long prompt loses its *start* (the text nearest the completion matters most),
  keeping a leading BOS; then the completion loses its *end* to fit ``max_length`` (a cut completion has
  no EOS, so the model is not taught to stop there). Without ``max_prompt_length`` the prompt may use
  ``max_length - 1`` tokens, so every completion keeps at least one token.
* ``"error"`` — any record that would need truncating raises :class:`RecordError` naming it.
* ``"drop"`` — such records are skipped; the count is logged and kept in ``num_dropped``.

Prompt datasets (for generation) only apply the prompt limit: ``max_prompt_length``, else ``max_length``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import torch

from rlhf_lightning.data.cache import cache_key, read_cache, source_fingerprint, tokenizer_fingerprint, write_cache
from rlhf_lightning.data.records import LoadedRecords, RecordError, RecordSource, is_hf_dataset, load_records, source_name

__all__ = ["Truncation", "TRUNCATION_POLICIES", "TokenizeConfig", "TokenizedData", "TokenizedDataset", "tokenize_records", "load_tokenized", "warn_about_data"]

log = logging.getLogger(__name__)

Truncation = Literal["keep_end", "error", "drop"]
TRUNCATION_POLICIES: tuple[str, ...] = ("keep_end", "error", "drop")

# Fields that hold completions, by record kind.
_COMPLETION_FIELDS = {"demonstration": ("completion",), "pair": ("chosen", "rejected"), "prompt": ()}
_ENCODE_CHUNK = 1024


@dataclass(frozen=True)
class TokenizeConfig:
    """Length limits and what to do with records that exceed them (see module docstring)."""

    max_length: int | None = None
    max_prompt_length: int | None = None
    truncation: Truncation = "keep_end"
    #: A completion cut to fewer tokens than this by truncation is counted and warned about (it teaches
    #: little, and a pair whose sides are both cut that short is often identical).
    min_completion_tokens: int = 4
    #: Drop such records instead of keeping them.
    drop_short_completions: bool = False
    #: Drop preference pairs whose chosen and rejected token ids are identical (always counted and warned).
    drop_identical_pairs: bool = False
    #: Warn when more than this share of all tokens is the tokenizer's unknown token.
    max_unknown_rate: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.min_completion_tokens, int) or self.min_completion_tokens < 0:
            raise ValueError(f"min_completion_tokens must be an int >= 0, got {self.min_completion_tokens!r}")
        if not 0.0 <= self.max_unknown_rate <= 1.0:
            raise ValueError(f"max_unknown_rate must be in [0, 1], got {self.max_unknown_rate!r}")
        if self.truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {self.truncation!r}")
        for name in ("max_length", "max_prompt_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if self.max_length is not None and self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length}) "
                "to leave room for the completion"
            )

    def prompt_limit(self, kind: str) -> int | None:
        if kind == "prompt":
            return self.max_prompt_length if self.max_prompt_length is not None else self.max_length
        if self.max_prompt_length is not None:
            return self.max_prompt_length
        return None if self.max_length is None else self.max_length - 1


@dataclass
class TokenizedData:
    """Token ids of a whole record source, after the truncation policy.

    ``features[i]`` holds ``prompt_ids`` plus, by kind: ``completion_ids`` (demonstration);
    ``chosen_ids``, ``rejected_ids``, optional ``margin``, optional ``chosen_scores``/``rejected_scores``
    (lists of K floats ordered like ``score_names``) (pair); ``prompt_text`` and any extra fields (prompt).
    ``rows[i]`` is the record's position in the source (0-based, blank lines excluded) — it differs from
    ``i`` once records are dropped.
    """

    kind: str
    features: list[dict[str, Any]]
    rows: list[int]
    score_names: list[str] = field(default_factory=list)
    has_margin: bool = False
    num_dropped: int = 0
    num_truncated: int = 0
    num_short_completions: int = 0
    num_identical_pairs: int = 0
    num_unknown_tokens: int = 0
    num_tokens: int = 0

    def __len__(self) -> int:
        return len(self.features)

    def select(self, positions: Sequence[int]) -> "TokenizedData":
        """A subset (e.g. a validation split) sharing the feature dicts."""
        return TokenizedData(
            kind=self.kind,
            features=[self.features[i] for i in positions],
            rows=[self.rows[i] for i in positions],
            score_names=list(self.score_names),
            has_margin=self.has_margin,
            num_dropped=self.num_dropped,
            num_truncated=self.num_truncated,
            num_short_completions=self.num_short_completions,
            num_identical_pairs=self.num_identical_pairs,
            num_unknown_tokens=self.num_unknown_tokens,
            num_tokens=self.num_tokens,
        )


class TokenizedDataset(torch.utils.data.Dataset):
    """Map-style dataset over :class:`TokenizedData`; each item carries its ``index`` (position in this
    dataset, 0..len-1, stable across epochs — what modules key per-example caches on)."""

    def __init__(self, data: TokenizedData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.data.features[index], "index": index}


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), _ENCODE_CHUNK):
        chunk = texts[start : start + _ENCODE_CHUNK]
        encoded = tokenizer(chunk, add_special_tokens=add_special_tokens, return_attention_mask=False)
        ids.extend(list(map(list, encoded["input_ids"])))
    return ids


def _cut_prompt_start(ids: list[int], limit: int, bos_id: int | None) -> list[int]:
    if bos_id is not None and ids and ids[0] == bos_id and limit > 1:
        return ids[:1] + ids[len(ids) - (limit - 1):]
    return ids[len(ids) - limit:]


def tokenize_records(loaded: LoadedRecords, tokenizer: Any, config: TokenizeConfig = TokenizeConfig()) -> TokenizedData:
    """Tokenize validated records (batched tokenizer calls) and apply ``config``'s truncation policy.

    Raises:
        RecordError: under ``truncation="error"``, naming the first record that does not fit.
        ValueError: when the tokenizer has no EOS token (completions must end with one).
    """
    kind = loaded.kind
    completion_fields = _COMPLETION_FIELDS[kind]
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if completion_fields and eos_id is None:
        raise ValueError("The tokenizer has no eos_token_id; completions are terminated with EOS, so set one.")
    bos_id = getattr(tokenizer, "bos_token_id", None)

    prompts = _encode(tokenizer, [r["prompt"] for r in loaded.records], add_special_tokens=True)
    completions = {
        name: [ids + [eos_id] for ids in _encode(tokenizer, [r[name] for r in loaded.records], add_special_tokens=False)]
        for name in completion_fields
    }

    prompt_limit = config.prompt_limit(kind)
    features: list[dict[str, Any]] = []
    rows: list[int] = []
    dropped = truncated = short = identical = 0
    unk_id = getattr(tokenizer, "unk_token_id", None)
    unknown = total = 0
    for row, (record, location) in enumerate(zip(loaded.records, loaded.locations)):
        # Unknown tokens, counted over the text as written (before truncation, EOS not included).
        pieces = [prompts[row]] + [completions[name][row][:-1] for name in completion_fields]
        total += sum(len(ids) for ids in pieces)
        if unk_id is not None:
            unknown += sum(ids.count(unk_id) for ids in pieces)
        prompt_ids = prompts[row]
        problems: list[tuple[str, str]] = []  # (field, reason)
        if prompt_limit is not None and len(prompt_ids) > prompt_limit:
            problems.append(("prompt", f"prompt has {len(prompt_ids)} tokens, more than the limit of {prompt_limit}"))
            prompt_ids = _cut_prompt_start(prompt_ids, prompt_limit, bos_id)
        feature: dict[str, Any] = {"prompt_ids": prompt_ids}
        for name in completion_fields:
            ids = completions[name][row]
            if config.max_length is not None and len(prompt_ids) + len(ids) > config.max_length:
                problems.append(
                    (name, f"prompt + {name} have {len(prompt_ids) + len(ids)} tokens, more than max_length={config.max_length}")
                )
                ids = ids[: config.max_length - len(prompt_ids)]
            feature[f"{name}_ids"] = ids
        if problems:
            if config.truncation == "error":
                field_name, reason = problems[0]
                raise RecordError(f"{reason} (truncation='error')", location=location, field=field_name)
            if config.truncation == "drop":
                dropped += 1
                continue
            truncated += 1
            cut_short = any(
                len(feature[f"{name}_ids"]) < min(config.min_completion_tokens, len(completions[name][row]))
                for name in completion_fields
            )
            if cut_short:
                short += 1
                if config.drop_short_completions:
                    dropped += 1
                    continue
        if kind == "pair" and feature["chosen_ids"] == feature["rejected_ids"]:
            identical += 1
            if config.drop_identical_pairs:
                dropped += 1
                continue
        _add_passthrough(feature, record, kind)
        features.append(feature)
        rows.append(row)

    if dropped and config.truncation == "drop":
        log.warning("Dropped %d of %d %s records longer than the length limits (truncation='drop').", dropped, len(loaded), kind)
    if truncated:
        log.info("Truncated %d of %d %s records to fit the length limits (truncation='keep_end').", truncated, len(loaded), kind)
    return TokenizedData(
        kind=kind,
        features=features,
        rows=rows,
        score_names=list(loaded.score_names),
        has_margin=loaded.has_margin,
        num_dropped=dropped,
        num_truncated=truncated,
        num_short_completions=short,
        num_identical_pairs=identical,
        num_unknown_tokens=unknown,
        num_tokens=total,
    )


def warn_about_data(data: TokenizedData, config: TokenizeConfig, source_label: str) -> list[str]:
    """Log (at WARNING, once per dataset, with counts) what tokenization found wrong with ``data``; returns
    the messages. Called on every load, a cache hit included."""
    messages = []
    n = len(data) + data.num_dropped
    if data.num_short_completions:
        action = "dropped (drop_short_completions=True)" if config.drop_short_completions else "kept; set drop_short_completions=True to drop them"
        messages.append(
            f"{source_label}: truncation left {data.num_short_completions} of {n} {data.kind} records with a completion "
            f"shorter than {config.min_completion_tokens} tokens (max_length={config.max_length}, "
            f"max_prompt_length={config.max_prompt_length}): {action}. Raise max_length or set max_prompt_length."
        )
    if data.num_identical_pairs:
        action = "dropped (drop_identical_pairs=True)" if config.drop_identical_pairs else "kept (they carry no preference signal); set drop_identical_pairs=True to drop them"
        messages.append(
            f"{source_label}: {data.num_identical_pairs} of {n} preference pairs have identical chosen and rejected "
            f"tokens (after truncation): {action}."
        )
    if data.num_tokens and data.num_unknown_tokens / data.num_tokens > config.max_unknown_rate:
        messages.append(
            f"{source_label}: {data.num_unknown_tokens} of {data.num_tokens} tokens "
            f"({100.0 * data.num_unknown_tokens / data.num_tokens:.1f}%) are the tokenizer's unknown token "
            f"(more than max_unknown_rate={config.max_unknown_rate:g}): the text does not match the tokenizer's vocabulary."
        )
    for message in messages:
        log.warning(message)
    return messages


def _add_passthrough(feature: dict[str, Any], record: dict[str, Any], kind: str) -> None:
    if kind == "pair":
        for key in ("margin", "chosen_scores", "rejected_scores"):
            if key in record:
                feature[key] = record[key]
    elif kind == "prompt":
        feature["prompt_text"] = record["prompt"]
        for key, value in record.items():
            if key != "prompt":
                feature[key] = value


def load_tokenized(
    source: RecordSource,
    kind: str,
    tokenizer: Any,
    config: TokenizeConfig = TokenizeConfig(),
    *,
    cache_dir: str | os.PathLike | None = None,
) -> TokenizedData:
    """Load, validate and tokenize ``source``, or read the result from ``cache_dir``.

    A cache hit neither reads the records' schema again nor calls the tokenizer; the key covers the
    source's content, the tokenizer's definition, ``kind`` and ``config``.
    """
    if not isinstance(source, (str, os.PathLike, Sequence)) and not is_hf_dataset(source):
        source = list(source)  # an iterator would be consumed by the fingerprint before it is read
    key = None
    if cache_dir is not None:
        key = cache_key(
            source=source_fingerprint(source), tokenizer=tokenizer_fingerprint(tokenizer), kind=kind, config=asdict(config)
        )
        payload = read_cache(cache_dir, kind, key)
        if payload is not None:
            log.info("Loaded tokenized %s records from the cache in %s.", kind, cache_dir)
            payload.pop("key", None)
            data = TokenizedData(**payload)
            warn_about_data(data, config, source_name(source))
            return data
    data = tokenize_records(load_records(source, kind, tokenizer=tokenizer), tokenizer, config)
    if cache_dir is not None and key is not None:
        write_cache(cache_dir, kind, key, asdict(data))
    warn_about_data(data, config, source_name(source))
    return data

