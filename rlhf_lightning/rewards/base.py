"""The reward-source protocol and the programmatic (Python function) source.

A reward source maps N (prompt, completion) texts to ``(N,)`` float32 scores. Working on text, not on
policy token ids, lets a reward model use its own tokenizer and lets any Python function be a reward.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol, Sequence, Union, runtime_checkable

import torch

__all__ = ["RewardSource", "FunctionRewardSource", "import_object", "CallableSpec"]

CallableSpec = Union[Callable[..., Any], str]


@runtime_checkable
class RewardSource(Protocol):
    """What PPO-style modules call to score completions.

    ``__call__(prompts, completions, *, input_ids=None, attention_mask=None) -> (N,) float32 tensor``:
    ``prompts`` and ``completions`` are N strings (completions decoded without special tokens);
    ``input_ids``/``attention_mask`` are the policy's ``(N, T)`` token batch, which a source may use
    (e.g. for its device) or ignore. ``name`` labels the score in logs.
    """

    name: str

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def import_object(path: str) -> Any:
    """Resolve ``"package.module:attr"`` (or ``"package.module.attr"``) to the object it names."""
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path:
        raise ValueError(f"Expected an import path like 'package.module:function', got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"Cannot import module {module_name!r} (from {path!r}): {error}") from error
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as error:
            raise AttributeError(f"{module_name!r} has no attribute {attr_path!r} (from {path!r})") from error
    return obj


def resolve_callable(fn: CallableSpec) -> Callable[..., Any]:
    """A callable, or the callable named by a ``"module:attr"`` string."""
    resolved = import_object(fn) if isinstance(fn, str) else fn
    if not callable(resolved):
        raise TypeError(f"{fn!r} does not name a callable (got {type(resolved).__name__})")
    return resolved


def _default_name(fn: CallableSpec) -> str:
    if isinstance(fn, str):
        return fn.replace(":", ".").rsplit(".", 1)[-1]
    return getattr(fn, "__name__", type(fn).__name__)


def _device_of(input_ids: torch.Tensor | None) -> torch.device:
    return input_ids.device if input_ids is not None else torch.device("cpu")


class FunctionRewardSource:
    """A reward computed by a Python function.

    Args:
        fn: ``fn(prompt, completion) -> float`` (or, with ``batched=True``,
            ``fn(prompts, completions) -> sequence of N floats``); a callable or a ``"module:attr"``
            import path, so it can be named in YAML (e.g. ``"my_package.rewards:length_bonus"``).
        name: label in logs; defaults to the function's name.
        batched: call ``fn`` once on the whole batch instead of once per sample.
    """

    def __init__(self, fn: CallableSpec, name: str | None = None, *, batched: bool = False) -> None:
        self.fn = resolve_callable(fn)
        self.name = name or _default_name(fn)
        self.batched = batched

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise ValueError(f"Got {len(prompts)} prompts but {len(completions)} completions")
        if self.batched:
            values = list(self.fn(list(prompts), list(completions)))
        else:
            values = [self.fn(prompt, completion) for prompt, completion in zip(prompts, completions)]
        if len(values) != len(prompts):
            raise ValueError(f"Reward function {self.name!r} returned {len(values)} scores for {len(prompts)} samples")
        return torch.tensor([float(v) for v in values], dtype=torch.float32, device=_device_of(input_ids))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
