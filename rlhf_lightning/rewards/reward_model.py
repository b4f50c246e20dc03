"""A learned reward model (our RM export or any HF sequence classifier) as a reward source.

The source re-tokenizes each (prompt, completion) text pair with the reward model's *own* tokenizer,
following the library's tokenization convention (docs/CONTRACTS_INTERNAL.md): prompt ids with special
tokens, completion ids without, then EOS appended — the same layout the reward model was trained on.
The score is read at the last real token by :func:`~rlhf_lightning.models.reward_model_scores`.

It is a plain object, not an ``nn.Module``: assigned to a LightningModule it is neither moved by
Lightning nor saved in checkpoints (the RM is frozen, its weights already live in its directory). It
follows the device of the ``input_ids`` it is given (or ``device``).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from rlhf_lightning.models import ModelSpec, freeze, load_reward_model, load_tokenizer, reward_model_scores

__all__ = ["RewardModelSource"]


class RewardModelSource:
    """Scores from a frozen scalar reward model.

    Args:
        model: a model spec (local directory or Hub name of a sequence classifier with one label, an
            inline config dict, or a built module).
        tokenizer: the RM's tokenizer, or a path to load it from; None loads it from ``model`` (which
            must then be a path or Hub name).
        batch_size: sequences per forward pass.
        device: where to run the RM; None follows the ``input_ids`` passed to ``__call__`` (else CPU).
        dtype: parameter dtype when loading (e.g. ``"bfloat16"``).
        max_length: keep at most the last ``max_length`` tokens of prompt + completion (the end is
            where the score is read); None keeps everything.
        append_eos: append EOS to every completion, as in the RM's training data (truncated
            completions too; penalise those with ``RewardTransform(missing_eos_penalty=...)``).
        name: label in logs.
    """

    def __init__(
        self,
        model: ModelSpec,
        tokenizer=None,
        *,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_length: int | None = None,
        append_eos: bool = True,
        name: str = "reward_model",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            source = tokenizer if tokenizer is not None else model
            if not isinstance(source, (str, os.PathLike)):
                raise ValueError("RewardModelSource needs a tokenizer when the model is not given as a path or Hub name.")
            tokenizer = load_tokenizer(source, padding_side="right")
        if append_eos and tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True needs a reward-model tokenizer with an EOS token.")
        self.tokenizer = tokenizer
        self.model: nn.Module = freeze(load_reward_model(model, tokenizer=tokenizer, dtype=dtype))
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else None
        self.max_length = max_length
        self.append_eos = append_eos
        self.name = name
        if self.device is not None:
            self.model.to(self.device)

    def to(self, device: str | torch.device) -> "RewardModelSource":
        """Pin the reward model to ``device``."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def tokenize(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt + completion with the RM's tokenizer (tokenization convention)."""
        sequences = []
        for prompt, completion in zip(prompts, completions):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            ids = ids + self.tokenizer(completion, add_special_tokens=False)["input_ids"]
            if self.append_eos:
                ids = ids + [self.tokenizer.eos_token_id]
            if self.max_length is not None:
                ids = ids[-self.max_length :]
            sequences.append(ids)
        return sequences

    @torch.no_grad()
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
        out_device = input_ids.device if input_ids is not None else torch.device("cpu")
        device = self.device or out_device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        sequences = self.tokenize(prompts, completions)
        scores = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            width = max(len(ids) for ids in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[row, : len(seq)] = 1
            scores.append(reward_model_scores(self.model, ids.to(device), mask.to(device)))
        if not scores:
            return torch.zeros(0, dtype=torch.float32, device=out_device)
        return torch.cat(scores).float().to(out_device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, model={type(self.model).__name__})"
