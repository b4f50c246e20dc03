"""Loading and validating records: JSONL files, lists of dicts, or a ``datasets.Dataset``.

Three record kinds share one loader (schema in ``docs/CONTRACTS_INTERNAL.md``):

* ``"demonstration"`` — ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content"}, ...]}``;
* ``"pair"`` — ``{"prompt": str, "chosen": str, "rejected": str}`` plus optional ``"margin": float`` and
  optional ``"chosen_scores"`` / ``"rejected_scores"``: ``{objective: float}``;
* ``"prompt"`` — ``{"prompt": str}`` or ``{"messages": [...]}``, plus any extra fields (passed through).

Every problem raises :class:`RecordError` whose message starts with the location (``<file>, line <n>`` for
files, ``<name>, row <i>`` for in-memory data) and names the offending field, so a user can open the file
at the right line. Validation is all-or-nothing: the first bad record stops loading.

Chat records are rendered to text with ``tokenizer.apply_chat_template`` at load time, so tokenization
sees the same ``prompt`` / ``completion`` strings whatever the input format.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Iterator, Literal, Mapping, Sequence, Union

__all__ = [
    "RecordError",
    "RecordKind",
    "RECORD_KINDS",
    "Location",
    "LoadedRecords",
    "RecordSource",
    "load_records",
    "iter_raw_records",
    "source_name",
    "CHAT_ROLES",
    "check_prompt_turns",
    "is_messages",
]

RecordKind = Literal["demonstration", "pair", "prompt"]
RECORD_KINDS: tuple[str, ...] = ("demonstration", "pair", "prompt")

#: A path to a JSONL file, a list of dicts, or a ``datasets.Dataset`` (any iterable of mappings).
RecordSource = Union[str, os.PathLike, Sequence[Mapping[str, Any]], Any]

#: Message roles a conversation may use (what chat templates know).
CHAT_ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool", "function", "ipython")

# Keys the prompt batch already uses; extra prompt fields may not shadow them.
_RESERVED_PROMPT_KEYS = frozenset({"prompt_input_ids", "prompt_attention_mask", "index", "prompt_text"})


@dataclass(frozen=True)
class Location:
    """Where a record came from: a file and 1-based line, or an in-memory source and 0-based row."""

    source: str
    line: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.source}, line {self.line}"
        return f"{self.source}, row {self.row}"


class RecordError(ValueError):
    """A record that does not match its schema (or cannot be tokenized under ``truncation="error"``).

    Attributes:
        location: where the record is (file and line, or in-memory row); ``None`` if unknown.
        field: the offending field (e.g. ``"chosen"``, ``"messages[1].content"``), or ``None`` when the
            whole record is at fault (bad JSON, not an object).
    """

    def __init__(self, message: str, *, location: Location | None = None, field: str | None = None):
        self.location = location
        self.field = field
        self.reason = message
        prefix = f"{location}: " if location is not None else ""
        where = f"field '{field}': " if field is not None else ""
        super().__init__(f"{prefix}{where}{message}")


@dataclass
class LoadedRecords:
    """Validated records in canonical text form, with their locations.

    ``records[i]`` has ``prompt`` (str) and, by kind, ``completion``; ``chosen``/``rejected`` (+ ``margin``,
    ``chosen_scores``/``rejected_scores`` as lists ordered like ``score_names``); or extra prompt fields.
    """

    kind: str
    records: list[dict[str, Any]]
    locations: list[Location]
    score_names: list[str] = field(default_factory=list)
    has_margin: bool = False

    def __len__(self) -> int:
        return len(self.records)


def source_name(source: RecordSource) -> str:
    """A short human-readable name for a source, used in error messages."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if is_hf_dataset(source):
        return f"<datasets.Dataset {getattr(source, '_fingerprint', '')}>".replace(" >", ">")
    return "<records>"


def is_hf_dataset(obj: Any) -> bool:
    return type(obj).__module__.startswith("datasets.") and hasattr(obj, "_fingerprint")


def iter_raw_records(source: RecordSource) -> Iterator[tuple[Any, Location]]:
    """Yield ``(raw_record, location)``; JSON is parsed here (bad JSON raises), blank lines are skipped."""
    name = source_name(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Record file not found: {path}")
        with open(path, "rb") as handle:
            for line_number, raw_line in enumerate(handle, start=1):
                location = Location(name, line=line_number)
                try:
                    line = raw_line.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise RecordError(
                        f"not valid UTF-8 (byte 0x{raw_line[error.start]:02x} at column {error.start + 1}); "
                        "re-encode the file as UTF-8",
                        location=location,
                    ) from None
                if not line.strip():
                    continue
                try:
                    yield json.loads(line), location
                except json.JSONDecodeError as error:
                    raise RecordError(
                        f"invalid JSON ({error.msg} at column {error.colno})", location=location
                    ) from None
        return
    if isinstance(source, Mapping):
        raise TypeError("Expected a file path, a list of records or a datasets.Dataset, got a single dict.")
    for row, record in enumerate(source):
        yield record, Location(name, row=row)


def load_records(source: RecordSource, kind: RecordKind, *, tokenizer: Any = None) -> LoadedRecords:
    """Read and validate every record of ``source``.

    Args:
        source: a JSONL path, a list of dicts, or a ``datasets.Dataset``.
        kind: ``"demonstration"``, ``"pair"`` or ``"prompt"``.
        tokenizer: needed only for chat (``messages``) records, rendered with its chat template.

    Returns:
        :class:`LoadedRecords` with canonical text records.

    Raises:
        RecordError: naming location and field, for bad JSON, a missing field, a wrong type or an empty
            required string; also when only some pair records carry ``margin`` / scores (the batch keys
            must be the same for every batch), or score objectives differ between records.
        FileNotFoundError: when a path does not exist.
    """
    if kind not in RECORD_KINDS:
        raise ValueError(f"Unknown record kind {kind!r}; expected one of {RECORD_KINDS}.")
    validator = _VALIDATORS[kind]
    records: list[dict[str, Any]] = []
    locations: list[Location] = []
    for raw, location in iter_raw_records(source):
        if not isinstance(raw, Mapping):
            raise RecordError(f"expected a JSON object, got {_type_name(raw)}", location=location)
        records.append(validator(raw, location, tokenizer))
        locations.append(location)
    if not records:
        what = "file is empty (nothing but blank lines)" if isinstance(source, (str, os.PathLike)) else "source holds no records"
        raise RecordError(f"{source_name(source)}: the {what}; expected one JSON object ({kind} record) per line")
    loaded = LoadedRecords(kind=kind, records=records, locations=locations)
    if kind == "pair":
        _check_pair_columns(loaded)
    return loaded


# ---------------------------------------------------------------------------------------------- fields


def is_messages(value: Any) -> bool:
    """True for a conversation: a non-empty list whose items are all mappings (``{role, content}``)."""
    return isinstance(value, list) and bool(value) and all(isinstance(item, Mapping) for item in value)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _absent(record: Mapping[str, Any], key: str) -> bool:
    # A ``datasets`` table fills columns missing from a row with None: treat None as "not given".
    return record.get(key) is None


def _string(record: Mapping[str, Any], key: str, location: Location, *, allow_empty: bool) -> str:
    if key not in record:
        raise RecordError("missing required field", location=location, field=key)
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(f"expected a string, got {_type_name(value)}", location=location, field=key)
    if not allow_empty and not value.strip():
        raise RecordError("must be a non-empty string", location=location, field=key)
    return value


def _number(value: Any, location: Location, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise RecordError(f"expected a number, got {_type_name(value)}", location=location, field=key)
    if not math.isfinite(value):
        raise RecordError(f"expected a finite number, got {value}", location=location, field=key)
    return float(value)


def _scores(value: Any, location: Location, key: str) -> dict[str, float]:
    if not isinstance(value, Mapping) or not value:
        raise RecordError(
            f"expected a non-empty object {{objective: number}}, got {_type_name(value)}", location=location, field=key
        )
    return {str(name): _number(score, location, f"{key}.{name}") for name, score in value.items()}


def _messages(value: Any, location: Location, key: str = "messages") -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RecordError(f"expected a non-empty list of messages, got {_type_name(value)}", location=location, field=key)
    messages = []
    for i, message in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(message, Mapping):
            raise RecordError(f"expected an object with role and content, got {_type_name(message)}", location=location, field=where)
        for part in ("role", "content"):
            if part not in message:
                raise RecordError("missing required field", location=location, field=f"{where}.{part}")
            if not isinstance(message[part], str):
                raise RecordError(
                    f"expected a string, got {_type_name(message[part])}", location=location, field=f"{where}.{part}"
                )
        if message["role"] not in CHAT_ROLES:
            hint = " (ShareGPT-style names: map 'human' to 'user' and 'gpt' to 'assistant')" if message["role"] in ("human", "gpt") else ""
            raise RecordError(
                f"unknown role {message['role']!r}; expected one of {list(CHAT_ROLES)}{hint}", location=location, field=f"{where}.role"
            )
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def check_prompt_turns(messages: Sequence[Mapping[str, str]], location: Location, key: str = "messages") -> None:
    """A conversation's prompt part (every turn the model answers) must hold at least one non-assistant
    turn: a reply with nothing to reply to is not a training example."""
    if not any(message["role"] != "assistant" for message in messages):
        raise RecordError(
            "the conversation has no prompt turns (no system/user message before the assistant's reply); "
            "add the user turn the reply answers",
            location=location,
            field=key,
        )


# ------------------------------------------------------------------------------------------- chat text


def _render(tokenizer: Any, messages: list[dict[str, str]], location: Location, *, generation_prompt: bool) -> str:
    if tokenizer is None:
        raise RecordError("chat records need a tokenizer to render them", location=location, field="messages")
    if not getattr(tokenizer, "chat_template", None):
        raise RecordError(
            "chat (messages) records need a tokenizer with a chat template, and this tokenizer has none; "
            "set tokenizer.chat_template or convert the data to prompt/completion text",
            location=location,
            field="messages",
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return text


def _strip_bos(tokenizer: Any, text: str) -> str:
    # Templates such as Llama's write BOS as text; prompts are encoded with add_special_tokens=True, which
    # adds BOS again for such tokenizers. Dropping the textual copy avoids a doubled BOS.
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return text[len(bos):]
    return text


def _chat_prompt(tokenizer: Any, messages: list[dict[str, str]], location: Location) -> str:
    return _strip_bos(tokenizer, _render(tokenizer, messages, location, generation_prompt=True))


def _chat_split(tokenizer: Any, messages: list[dict[str, str]], location: Location, key: str = "messages") -> tuple[str, str]:
    """``(prompt, completion)`` texts: the prompt is every message but the last (an assistant turn) with the
    generation prompt; the completion is what the template writes for that last turn, minus a trailing EOS
    (the data layer appends ``eos_token_id`` itself)."""
    if messages[-1]["role"] != "assistant":
        raise RecordError(
            f"the last message must be the assistant's reply, got role {messages[-1]['role']!r}",
            location=location,
            field=f"{key}[{len(messages) - 1}].role",
        )
    if not messages[-1]["content"].strip():
        raise RecordError("must be a non-empty string", location=location, field=f"{key}[{len(messages) - 1}].content")
    check_prompt_turns(messages[:-1], location, key)
    prompt = _render(tokenizer, messages[:-1], location, generation_prompt=True)
    full = _render(tokenizer, messages, location, generation_prompt=False)
    if full.startswith(prompt):
        completion = full[len(prompt):].rstrip()
        eos = getattr(tokenizer, "eos_token", None)
        if eos and completion.endswith(eos):
            completion = completion[: -len(eos)]
    else:  # templates that rewrite earlier turns: fall back to the raw reply
        completion = messages[-1]["content"]
    return _strip_bos(tokenizer, prompt), completion


# ------------------------------------------------------------------------------------------ validators


def _demonstration(raw: Mapping[str, Any], location: Location, tokenizer: Any) -> dict[str, Any]:
    if not _absent(raw, "messages"):
        prompt, completion = _chat_split(tokenizer, _messages(raw["messages"], location), location)
        return {"prompt": prompt, "completion": completion}
    if isinstance(raw.get("prompt"), list) or isinstance(raw.get("completion"), list):
        # Conversational prompt-completion (TRL's layout): prompt messages + the assistant reply message(s).
        messages = _messages(raw.get("prompt"), location, "prompt") + _messages(raw.get("completion"), location, "completion")
        prompt, completion = _chat_split(tokenizer, messages, location, "completion")
        return {"prompt": prompt, "completion": completion}
    return {
        # An empty prompt is allowed: unconditional language modelling of the completion.
        "prompt": _string(raw, "prompt", location, allow_empty=True),
        "completion": _string(raw, "completion", location, allow_empty=False),
    }


def _pair(raw: Mapping[str, Any], location: Location, tokenizer: Any) -> dict[str, Any]:
    chat = any(is_messages(raw.get(key)) for key in ("prompt", "chosen", "rejected"))
    if not chat:
        for key in ("prompt", "chosen", "rejected"):
            if isinstance(raw.get(key), list):  # a list of strings, numbers, ...: not a conversation either
                raise RecordError(
                    f"expected a string (or a list of {{role, content}} messages), got a list of {_type_name(raw[key][0]) if raw[key] else 'nothing'}",
                    location=location,
                    field=key,
                )
    if chat:
        prompt, chosen, rejected = _chat_pair(raw, location, tokenizer)
    else:
        prompt = _string(raw, "prompt", location, allow_empty=True)
        chosen = _string(raw, "chosen", location, allow_empty=False)
        rejected = _string(raw, "rejected", location, allow_empty=False)
    record: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if not _absent(raw, "margin"):
        record["margin"] = _number(raw["margin"], location, "margin")
    for key in ("chosen_scores", "rejected_scores"):
        if not _absent(raw, key):
            record[key] = _scores(raw[key], location, key)
    return record


def _chat_pair(raw: Mapping[str, Any], location: Location, tokenizer: Any) -> tuple[str, str, str]:
    """Two conversational pair layouts: ``prompt`` messages + ``chosen``/``rejected`` assistant messages, or
    (no ``prompt``) full ``chosen``/``rejected`` conversations that share every turn but the last."""
    if _absent(raw, "prompt"):
        chosen_msgs = _messages(raw.get("chosen"), location, "chosen")
        rejected_msgs = _messages(raw.get("rejected"), location, "rejected")
        if chosen_msgs[:-1] != rejected_msgs[:-1]:
            raise RecordError("chosen and rejected conversations must share every turn but the last", location=location, field="rejected")
        prompt_c, chosen = _chat_split(tokenizer, chosen_msgs, location, "chosen")
        _, rejected = _chat_split(tokenizer, rejected_msgs, location, "rejected")
        return prompt_c, chosen, rejected
    prompt_msgs = _messages(raw["prompt"], location, "prompt")
    texts = []
    for key in ("chosen", "rejected"):
        if key not in raw:
            raise RecordError("missing required field", location=location, field=key)
        reply = raw[key]
        reply_msgs = _messages(reply, location, key) if isinstance(reply, list) else None
        if reply_msgs is None:
            raise RecordError(f"expected a list of messages like 'prompt', got {_type_name(reply)}", location=location, field=key)
        _, completion = _chat_split(tokenizer, prompt_msgs + reply_msgs, location, key)
        texts.append(completion)
    return _chat_prompt(tokenizer, prompt_msgs, location), texts[0], texts[1]


def _prompt(raw: Mapping[str, Any], location: Location, tokenizer: Any) -> dict[str, Any]:
    if not _absent(raw, "messages"):
        messages = _messages(raw["messages"], location)
        if messages[-1]["role"] == "assistant":  # a demonstration file reused as prompts: drop the reply
            messages = messages[:-1]
        if not messages:
            raise RecordError("no messages left once the final assistant reply is removed", location=location, field="messages")
        check_prompt_turns(messages, location)
        prompt = _chat_prompt(tokenizer, messages, location)
    elif isinstance(raw.get("prompt"), list):  # conversational prompt: {"prompt": [messages]}
        prompt = _chat_prompt(tokenizer, _messages(raw["prompt"], location, "prompt"), location)
    else:
        # Generation needs at least one prompt token, so the prompt may not be empty here.
        prompt = _string(raw, "prompt", location, allow_empty=False)
    record: dict[str, Any] = {"prompt": prompt}
    for key, value in raw.items():
        if key in ("prompt", "messages"):
            continue
        if key in _RESERVED_PROMPT_KEYS:
            raise RecordError("this name is reserved for the prompt batch; rename the field", location=location, field=key)
        record[key] = value
    return record


_VALIDATORS = {"demonstration": _demonstration, "pair": _pair, "prompt": _prompt}


def _check_pair_columns(loaded: LoadedRecords) -> None:
    """Every pair must carry the same optional columns, and score dicts the same objectives; objective
    names are fixed here in sorted order and scores become lists in that order."""
    records, locations = loaded.records, loaded.locations
    if not records:
        return
    first = records[0]
    loaded.has_margin = "margin" in first
    names = sorted(first.get("chosen_scores") or first.get("rejected_scores") or [])
    for record, location in zip(records, locations):
        if ("margin" in record) != loaded.has_margin:
            raise RecordError(
                "present in some records but not in others; give it for every pair or for none",
                location=location,
                field="margin",
            )
        for key in ("chosen_scores", "rejected_scores"):
            if not names:
                if key in record:
                    raise RecordError(
                        "present in some records but not in others; give scores for every pair or for none",
                        location=location,
                        field=key,
                    )
            elif key not in record:
                raise RecordError("missing required field (other records carry scores)", location=location, field=key)
            elif sorted(record[key]) != names:
                raise RecordError(
                    f"objectives {sorted(record[key])} differ from {names} (fixed by the first record)",
                    location=location,
                    field=key,
                )
    loaded.score_names = names
    for record in records:
        for key in ("chosen_scores", "rejected_scores"):
            if key in record:
                record[key] = [record[key][name] for name in names]
