"""Write a Hugging Face ``save_pretrained`` directory (model + tokenizer) at the end of fit and whenever
the checkpoint callback records a new best model."""

from __future__ import annotations

import os
import shutil
import tempfile

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from rlhf_lightning.models import is_peft_model, merged_copy

__all__ = ["HFExport", "save_hf_directory", "NonFiniteWeightsError"]


class NonFiniteWeightsError(RuntimeError):
    """An export was refused because the weights hold NaN or inf."""


def save_hf_directory(model: torch.nn.Module, tokenizer, dirpath: str, *, state_dict: dict | None = None) -> str:
    """``save_pretrained`` into ``dirpath`` atomically: a crash never leaves a half-written export.

    The export is written to a sibling temporary directory and renamed into place; a previous export
    at ``dirpath`` is replaced only once the new one is complete. Weights holding NaN or inf are never
    written (:class:`NonFiniteWeightsError`; a previous export stays as it was). The folder gets the
    permissions the process umask gives, like any folder the user creates.
    """
    dirpath = os.path.abspath(dirpath)
    tensors = state_dict if state_dict is not None else model.state_dict()
    bad = next((name for name, t in tensors.items() if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        kept = f"the previous export at {dirpath} is kept" if os.path.isdir(dirpath) else f"nothing was written to {dirpath}"
        raise NonFiniteWeightsError(f"Refusing to export non-finite weights (NaN/inf in {bad!r}): {kept}.")
    parent = os.path.dirname(dirpath)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    # mkdtemp creates the folder 0o700; an export is a normal folder: the permissions the umask gives.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        model.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if os.path.isdir(dirpath):
            retired = dirpath + ".old"
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(dirpath, retired)
            os.replace(staging, dirpath)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, dirpath)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dirpath


class HFExport(Callback):
    def __init__(
        self, dirpath: str | None = None, *, on_fit_end: bool = True, on_best: bool = True, merge_adapters: bool = False
    ):
        """Export the module's model as a Hugging Face directory.

        Args:
            dirpath: where to write; defaults to ``<trainer.default_root_dir>/hf``. The final model goes to
                ``<dirpath>/final`` and the best one (per the ModelCheckpoint monitor) to ``<dirpath>/best``.
            on_fit_end: export when fit ends.
            on_best: export each time the checkpoint callback's best model path changes.
            merge_adapters: for a LoRA model (``peft:``), also write ``<dirpath>/<name>-merged``: the base
                weights with the adapters merged in, loadable with plain ``from_pretrained`` (built on
                CPU from a copy, so it costs one extra copy of the weights while it is written).
                ``<dirpath>/<name>`` always holds the adapter (``peft.AutoPeftModelForCausalLM`` /
                ``AutoPeftModelForSequenceClassification``; ``rlhf_lightning.models.load_causal_lm``
                loads it merged).

        The module must provide ``export_model()`` (a ``PreTrainedModel``) and ``tokenizer``; sharded
        strategies gather a full state dict first (``export_state_dict()`` when the module defines it).
        """
        super().__init__()
        self.dirpath = dirpath
        self.on_fit_end_enabled = on_fit_end
        self.on_best_enabled = on_best
        self.merge_adapters = merge_adapters
        self._last_best_path: str | None = None

    def _root(self, trainer: L.Trainer) -> str:
        return self.dirpath or os.path.join(trainer.default_root_dir, "hf")

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> str | None:
        """Write ``<root>/<name>``; collective under sharding, writes on rank zero only."""
        state_dict = pl_module.export_state_dict() if hasattr(pl_module, "export_state_dict") else None
        path = None
        if trainer.is_global_zero:
            model, tokenizer = pl_module.export_model(), getattr(pl_module, "tokenizer", None)
            path = save_hf_directory(model, tokenizer, os.path.join(self._root(trainer), name), state_dict=state_dict)
            if self.merge_adapters and is_peft_model(model):
                merged = merged_copy(model, state_dict)
                save_hf_directory(merged, tokenizer, os.path.join(self._root(trainer), f"{name}-merged"))
                del merged
        trainer.strategy.barrier("hf_export")
        return path

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Called when validation ends: export if the best checkpoint changed."""
        if not self.on_best_enabled or trainer.sanity_checking:
            return
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        # The checkpoint callback runs its own on_validation_end; it may come after us, so also look
        # again at train-epoch end (below).
        if best and best != self._last_best_path:
            self._last_best_path = best
            self.export(trainer, pl_module, "best")

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Called when the train epoch ends: catch a best checkpoint written after validation."""
        self.on_validation_end(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Called when fit ends: write the final model."""
        if self.on_fit_end_enabled:
            self.export(trainer, pl_module, "final")

    @override
    def state_dict(self) -> dict:
        return {"last_best_path": self._last_best_path}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self._last_best_path = state_dict.get("last_best_path")
