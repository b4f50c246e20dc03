"""Supervised fine-tuning (stage one of InstructGPT / DeepSpeed-Chat / TRL pipelines).

Loss: token-mean negative log-likelihood of the completion tokens given the prompt
(``completion_only_loss=True``, the default), or of every non-padding token after the first.
Validation reports the same loss and the perplexity ``exp(mean NLL)`` over all scored tokens.

Training batches are packed padding-free by default (:mod:`rlhf_lightning.data.packing`): the same
loss from fewer tokens computed. Validation runs the padded batch (the perplexity metric reads the
padded logits).
"""

from __future__ import annotations

import torch
from torchmetrics.text import Perplexity

from rlhf_lightning.data.packing import pack_sequences
from rlhf_lightning.logprobs import causal_lm_logprobs
from rlhf_lightning.models import ModelSpecArg, PeftArg, load_causal_lm, prepare_trainable
from rlhf_lightning.modules.base import RLHFModuleBase
from rlhf_lightning.modules.optim import Optimization
from rlhf_lightning.modules.packed_forward import packed_logprobs, packing_mode

__all__ = ["SFTModule"]

IGNORE_INDEX = -100


class SFTModule(RLHFModuleBase):
    def __init__(
        self,
        model: ModelSpecArg,
        tokenizer: str | None = None,
        *,
        completion_only_loss: bool = True,
        optim: Optimization | None = None,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        padding_free: bool = True,
        max_row_tokens: int | None = None,
        on_nonfinite: str = "error",
        peft: PeftArg = None,
        disable_dropout: bool = True,
    ):
        """Supervised fine-tuning of a causal LM on prompt/completion demonstrations.

        Args:
            model: Hub name, local directory, or an inline transformers config dict
                (``{"model_type": "llama", "hidden_size": 64, ...}``) for a randomly initialised model.
            tokenizer: tokenizer name or directory; defaults to ``model`` when that is a path or name.
            completion_only_loss: score only completion tokens (True) or the whole sequence (False).
            optim: optimizer and learning-rate schedule (see ``Optimization``).
            dtype: parameter dtype (``float32``, ``bfloat16``); ``None`` keeps the checkpoint's.
            gradient_checkpointing: recompute activations in backward to save memory.
            padding_free: pack each training batch's sequences into rows without padding (position ids
                restart per sequence, attention stays within it): the same loss, fewer tokens computed.
                Models whose attention implementation cannot take packed rows run padded.
            max_row_tokens: token budget of a packed row; ``None`` = the batch's longest sequence.
            on_nonfinite: ``"error"`` (default) stops the run when a loss or gradient is NaN/inf, naming the
                step and the quantity; ``"skip"`` drops that optimizer step and warns.
            peft: LoRA adapters instead of full fine-tuning: a dict of ``peft.LoraConfig`` keyword
                arguments, e.g. ``{r: 16, lora_alpha: 32, target_modules: all-linear}`` (needs
                ``pip install 'rlhf-lightning[peft]'``). Only the adapters train; the export
                writes the adapter (``HFExport(merge_adapters=true)`` also writes merged weights).
            disable_dropout: set every dropout probability of the trained model to 0 (TRL's default):
                with dropout, the model in train mode differs from itself in eval mode.
        """
        super().__init__()
        self.on_nonfinite = on_nonfinite
        self.save_hyperparameters(ignore=["model"] if not isinstance(model, (str, dict)) else None)
        self.optim = optim or Optimization()
        self.completion_only_loss = completion_only_loss
        self.padding_free = padding_free
        self.max_row_tokens = max_row_tokens
        self._init_tokenizer(tokenizer, model)
        self.model = prepare_trainable(
            load_causal_lm(model, tokenizer=self.tokenizer, dtype=dtype),
            peft=peft, no_dropout=disable_dropout, gradient_checkpointing=gradient_checkpointing,
        )
        self.val_perplexity = Perplexity(ignore_index=IGNORE_INDEX)

    @property
    def policy(self) -> torch.nn.Module:
        return self.model

    def _score_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.completion_only_loss:
            return batch["completion_mask"] * batch["attention_mask"]
        return batch["attention_mask"]

    def _nll(self, batch: dict[str, torch.Tensor], return_logits: bool = False):
        if self.padding_free and not return_logits and packing_mode(self.model) is not None:
            packed = pack_sequences(
                batch["input_ids"], batch["attention_mask"], self._score_mask(batch), max_tokens=self.max_row_tokens,
                pad_token_id=self._pad_token_id(),
            )
            out = packed_logprobs(self.model, packed)
            num_tokens = out.tokens.sum().clamp(min=1.0)
            return -out.token_logps.sum() / num_tokens, out, num_tokens
        out = causal_lm_logprobs(
            self.model, batch["input_ids"], batch["attention_mask"], self._score_mask(batch), return_logits=return_logits
        )
        num_tokens = out.mask.sum().clamp(min=1.0)
        loss = -out.tokens.sum() / num_tokens
        return loss, out, num_tokens

    def _pad_token_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _, num_tokens = self._nll(batch)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/tokens", num_tokens, reduce_fx="sum", batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, out, _ = self._nll(batch, return_logits=True)
        labels = batch["input_ids"][:, 1:].masked_fill(out.mask == 0, IGNORE_INDEX)
        self.val_perplexity.update(out.logits.float(), labels)
        batch_size = batch["input_ids"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.log("val/perplexity", self.val_perplexity, prog_bar=True, batch_size=batch_size)
