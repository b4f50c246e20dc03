"""Chat models: the end-of-turn token of a tokenizer's chat template, a default stop token for generation.

Conversational records (``messages`` lists; ``{"prompt": [messages], "chosen": [messages], ...}``) are
rendered to text with the tokenizer's chat template by :mod:`rlhf_lightning.data.records`. A chat model
ends its reply with the template's end-of-turn token (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``,
Gemma's ``<end_of_turn>``), which is often not the tokenizer's EOS: sampling would then run on past the
reply into a made-up next turn. :func:`end_of_turn_token_ids` finds that token from the template itself,
and :func:`~rlhf_lightning.generation.generate` stops at it by default (with EOS and any
``stop_token_ids`` given).
"""

from __future__ import annotations

from typing import Any

__all__ = ["end_of_turn_token_ids", "has_chat_template"]

_PROBE_REPLY = "Zq7 reply Xk9"  # unlikely to be merged with template text around it


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def end_of_turn_token_ids(tokenizer: Any) -> list[int]:
    """The special token(s) the chat template writes right after an assistant reply; ``[]`` without a
    template, or when the template writes no special token there (e.g. it ends the turn with text only).

    Found by rendering a one-turn conversation and reading the first special token after the reply —
    no table of model families to keep up to date.
    """
    if not has_chat_template(tokenizer):
        return []
    return list(_end_of_turn(tokenizer))


def _end_of_turn(tokenizer: Any) -> tuple[int, ...]:
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _PROBE_REPLY}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that needs other roles / fields: no default stop token
        return ()
    position = text.rfind(_PROBE_REPLY)
    found: tuple[int, ...] = ()
    if position >= 0:
        after = text[position + len(_PROBE_REPLY):]
        ids = tokenizer(after, add_special_tokens=False)["input_ids"]
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        special.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        for token_id in ids:
            if token_id in special:
                found = (int(token_id),)
                break
    return found
