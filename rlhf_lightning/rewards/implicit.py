"""The implicit reward of a DPO-trained policy, ``beta * (log pi(y|x) - log pi_ref(y|x))``, as a reward source.

A DPO policy *is* a reward model (Rafailov et al. 2023, Sec. 5): its log-ratio to the reference it was
trained against scores completions up to a per-prompt constant, which cancels in any chosen-minus-rejected
difference. MODPO (Zhou et al. 2024) uses exactly this to turn an objective learned with DPO into a margin
for the next objective, without training a separate reward model.

Two ways in:

* text, like every :class:`~rlhf_lightning.rewards.RewardSource`: ``source(prompts, completions)``
  re-tokenizes with the source's own tokenizer (library convention: prompt with special tokens,
  completion without, then EOS);
* token level, :meth:`ImplicitRewardSource.score_pairs`: straight from a preference batch with one
  forward per model over the concatenated ``(2B, T)`` pair (:mod:`~rlhf_lightning.modules.pair_forward`).
  Valid only when the batch was tokenized with this source's tokenizer; exact (no decode/re-encode).

Like :class:`~rlhf_lightning.rewards.RewardModelSource` it is a plain object, not an ``nn.Module``:
assigned to a LightningModule it is neither moved nor checkpointed; it follows the device of the tensors
it is given.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch
from torch import nn

from rlhf_lightning.data.collators import DemonstrationCollator
from rlhf_lightning.logprobs import causal_lm_logprobs
from rlhf_lightning.models import ModelSpec, freeze, load_causal_lm, load_tokenizer
from rlhf_lightning.reference_cache import combine_fingerprints, model_fingerprint

__all__ = ["ImplicitRewardSource"]


class ImplicitRewardSource:
    """``beta * (log pi(y|x) - log pi_ref(y|x))`` of a frozen (DPO-trained) policy and its reference.

    Args:
        policy: the DPO-trained policy (HF directory, Hub name, inline config or built module).
        reference: the reference that policy was trained against (usually the SFT model); the implicit
            reward is only meaningful relative to it.
        beta: the ``beta`` the policy was trained with (it sets the reward's scale).
        average: use length-averaged log-probs (for a policy trained with IPO's averaged log-probs).
        tokenizer: tokenizer object or path; None loads it from ``policy`` (which must then be a path).
        batch_size: sequences per forward pass when scoring text.
        device: where to run both models; None follows the tensors given to the call (else CPU).
        dtype: parameter dtype when loading (e.g. ``"bfloat16"``).
        name: label in logs.
    """

    def __init__(
        self,
        policy: ModelSpec,
        reference: ModelSpec,
        beta: float = 0.1,
        average: bool = False,
        *,
        tokenizer=None,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        name: str = "implicit",
    ) -> None:
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            source = tokenizer if tokenizer is not None else policy
            if not isinstance(source, (str, os.PathLike)):
                raise ValueError("ImplicitRewardSource needs a tokenizer when the policy is not given as a path or Hub name.")
            tokenizer = load_tokenizer(source, padding_side="right")
        if tokenizer.eos_token_id is None:
            raise ValueError("ImplicitRewardSource needs a tokenizer with an EOS token (completions end with EOS).")
        self.tokenizer = tokenizer
        self.policy: nn.Module = freeze(load_causal_lm(policy, tokenizer=tokenizer, dtype=dtype))
        self.reference: nn.Module = freeze(load_causal_lm(reference, tokenizer=tokenizer, dtype=dtype))
        self.beta = beta
        self.average = average
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else None
        self.name = name
        if self.device is not None:
            self.to(self.device)

    def to(self, device: str | torch.device) -> "ImplicitRewardSource":
        """Pin both models to ``device``."""
        self.device = torch.device(device)
        self.policy.to(self.device)
        self.reference.to(self.device)
        return self

    def fingerprint(self) -> str:
        """What the scores depend on (both models' weights, beta, averaging): the margin-cache key."""
        return combine_fingerprints(
            kind="implicit-reward", policy=model_fingerprint(self.policy), reference=model_fingerprint(self.reference),
            beta=self.beta, average=self.average,
        )

    def _place(self, device: torch.device) -> torch.device:
        device = self.device or device
        if next(self.policy.parameters()).device != device:
            self.policy.to(device)
            self.reference.to(device)
        return device

    def _pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    @torch.no_grad()
    def score_pairs(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Implicit rewards ``(chosen (B,), rejected (B,))`` of a preference batch tokenized with this
        source's tokenizer, from one forward per model."""
        # Imported here: rlhf_lightning.modules imports rlhf_lightning.rewards (PPO), not the reverse.
        from rlhf_lightning.modules.pair_forward import reference_pair_logps

        out_device = batch["chosen_input_ids"].device
        device = self._place(out_device)
        if device != out_device:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        pad = self._pad_token_id()
        pol = reference_pair_logps(self.policy, batch, average=self.average, pad_token_id=pad)
        ref = reference_pair_logps(self.reference, batch, average=self.average, pad_token_id=pad)
        chosen = self.beta * (pol.chosen_logps - ref.chosen_logps)
        rejected = self.beta * (pol.rejected_logps - ref.rejected_logps)
        return chosen.float().to(out_device), rejected.float().to(out_device)

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
        device = self._place(out_device)
        collate = DemonstrationCollator(pad_token_id=self._pad_token_id())
        eos = [self.tokenizer.eos_token_id]
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(prompts)))
            features = [
                {
                    "prompt_ids": self.tokenizer(prompts[i], add_special_tokens=True)["input_ids"],
                    "completion_ids": self.tokenizer(completions[i], add_special_tokens=False)["input_ids"] + eos,
                    "index": i,
                }
                for i in chunk
            ]
            batch = {k: v.to(device) for k, v in collate(features).items()}
            args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            pol = causal_lm_logprobs(self.policy, *args, average=self.average).sequence
            ref = causal_lm_logprobs(self.reference, *args, average=self.average).sequence
            scores.append(self.beta * (pol - ref))
        if not scores:
            return torch.zeros(0, dtype=torch.float32, device=out_device)
        return torch.cat(scores).float().to(out_device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, beta={self.beta}, average={self.average})"
