"""What every module shares: tokenizer loading, the ``policy``/``reference``/``export_model`` hooks that
callbacks use, and the optimizer. Kept deliberately thin — methods compose helpers, they do not
inherit behaviour from deep chains."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from rlhf_lightning.models import ModelSpec, load_tokenizer
from rlhf_lightning.modules.optim import Optimization, build_optimizer

__all__ = ["RLHFModuleBase", "resolve_tokenizer_path"]


def resolve_tokenizer_path(tokenizer: str | None, model: ModelSpec) -> str:
    """The tokenizer path: explicit, else the model's own name/path (an inline config needs one)."""
    if tokenizer is not None:
        return str(tokenizer)
    if isinstance(model, str):
        return model
    raise ValueError("An inline model config needs an explicit `tokenizer` (a name or a local directory).")


class RLHFModuleBase(L.LightningModule):
    """Base for all rlhf-lightning modules.

    Subclasses set ``self.tokenizer`` (via :meth:`_init_tokenizer`) and implement ``policy`` (the trainable
    model callbacks act on) and, where there is one, ``reference``.
    """

    tokenizer: Any
    optim: Optimization

    def _init_tokenizer(self, tokenizer: str | None, model: ModelSpec, padding_side: str = "right") -> None:
        self.tokenizer_path = resolve_tokenizer_path(tokenizer, model)
        self.tokenizer = load_tokenizer(self.tokenizer_path, padding_side=padding_side)

    @property
    def policy(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def reference(self) -> torch.nn.Module | None:
        return None

    def export_model(self) -> torch.nn.Module:
        """The Hugging Face model written by the export callback (``save_pretrained``-able)."""
        return self.policy

    def trainable_named_parameters(self):
        return [(name, p) for name, p in self.named_parameters() if p.requires_grad]

    def configure_optimizers(self):
        total_steps = self.trainer.estimated_stepping_batches if self._trainer is not None else None
        return build_optimizer(self.trainable_named_parameters(), self.optim, total_steps)

    def on_fit_start(self) -> None:
        # transformers 5 returns from_pretrained models in eval mode and Lightning keeps module modes as
        # they are: put the trainable policy in train mode, frozen models stay in eval.
        policy = self.policy
        if policy is not None:
            policy.train()
        reference = self.reference
        if reference is not None:
            reference.eval()
