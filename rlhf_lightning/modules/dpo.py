"""Direct Preference Optimization (Rafailov et al. 2023) and its IPO / SLiC-hinge / robust variants.

The loss is :func:`~rlhf_lightning.losses.dpo_loss` on sequence log-probs of the chosen and rejected
completions under the trainable policy and a frozen reference. Both sides go through ONE forward per
model (:mod:`~rlhf_lightning.modules.pair_forward`), by default packed without padding and with each
pair's prompt computed once (``padding_free`` / ``shared_prompt``): the same log-probs as the padded
batch to float rounding, fewer tokens computed (docs/results/benchmark.md).

Where this departs from the paper, and why:

* ``loss_type="ipo"`` feeds *length-averaged* log-probs (as TRL does): with summed log-probs the
  IPO target ``1/(2 beta)`` is negligible next to the log-ratios of long completions. The reported
  ``logps/*`` and ``rewards/*`` are then per-token too.
* ``precompute_reference=True`` computes the reference log-probs once before training (keyed by the
  batch's ``index`` column, cached on disk by a fingerprint of the tokenized data, the reference
  weights, the averaging flag and the trainer's precision) and then deletes the reference: training holds
  one model. The numbers are those of the live reference in eval mode (no dropout), computed under the
  autocast of the training step, so both modes give the same loss in every precision.
* The reference's weights are not written into checkpoints, plain or sharded (the module's state dict
  leaves them out, :class:`~rlhf_lightning.modules.base.RLHFModuleBase`); they are rebuilt from
  ``reference`` / ``model`` at load time, and loading stays strict for every other key.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import DataLoader

from rlhf_lightning.losses import DPO_LOSS_TYPES, dpo_loss
from rlhf_lightning.models import ModelSpecArg, PeftArg, build_reference, load_causal_lm, prepare_trainable
from rlhf_lightning.modules.base import RLHFModuleBase
from rlhf_lightning.modules.metric_window import MetricWindow
from rlhf_lightning.modules.optim import Optimization
from rlhf_lightning.modules.pair_forward import PairLogps, pair_logps, reference_pair_logps
from rlhf_lightning.reference_cache import (
    PerIndexValues,
    cached_per_index,
    combine_fingerprints,
    dataset_fingerprint,
    model_fingerprint,
)

__all__ = ["DPOModule"]

log = logging.getLogger(__name__)

_PROGRESS_BAR_METRICS = ("loss", "rewards/accuracies")


class DPOModule(RLHFModuleBase):
    def __init__(
        self,
        model: ModelSpecArg,
        tokenizer: str | None = None,
        *,
        reference: ModelSpecArg | None = None,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        precompute_reference: bool = False,
        reference_cache_dir: str | None = None,
        optim: Optimization | None = None,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        padding_free: bool = True,
        shared_prompt: bool = True,
        max_row_tokens: int | None = None,
        on_nonfinite: str = "error",
        peft: PeftArg = None,
        disable_dropout: bool = True,
    ):
        """Fine-tune a causal LM on preference pairs with DPO (or IPO / hinge / robust DPO).

        Args:
            model: the policy to train: Hub name, local directory (e.g. the SFT export), or an inline
                transformers config dict for a randomly initialised model.
            tokenizer: tokenizer name or directory; defaults to ``model`` when that is a path or name.
            reference: the frozen reference policy; ``None`` uses a copy of the initial ``model``
                (the usual choice: the SFT model).
            beta: inverse strength of the implicit KL constraint (0.1 in the paper).
            loss_type: ``"sigmoid"`` (DPO), ``"ipo"`` (on length-averaged log-probs), ``"hinge"``
                (SLiC-HF) or ``"robust"`` (rDPO).
            label_smoothing: assumed label-flip rate: conservative DPO for ``"sigmoid"``, the rDPO
                correction for ``"robust"``; must be 0 for the others.
            precompute_reference: compute the reference log-probs once over the train and validation
                data before training, then delete the reference model (saves its memory and forward).
            reference_cache_dir: folder to cache precomputed reference log-probs across runs; ``None``
                recomputes them each run. Only used with ``precompute_reference``.
            optim: optimizer and learning-rate schedule (see ``Optimization``).
            dtype: parameter dtype of policy and reference (``float32``, ``bfloat16``).
            gradient_checkpointing: recompute the policy's activations in backward to save memory.
            padding_free: pack each batch's sequences into rows without padding (position ids restart
                per sequence, attention stays within it); same log-probs as the padded batch, fewer
                tokens computed. Models whose attention implementation cannot take packed rows are run
                padded (with a warning). ``False`` = the padded ``(2B, T)`` batch.
            shared_prompt: with ``padding_free``, lay each pair out as a tree: its prompt once, then
                both completions attending to it and not to each other (the prompt computed once).
            max_row_tokens: token budget of a packed row; ``None`` = the longest sequence (or pair tree)
                of the batch, so rows are never longer than the batch's longest unit.
            on_nonfinite: ``"error"`` (default) stops the run when a loss or gradient is NaN/inf, naming the
                step and the quantity; ``"skip"`` drops that optimizer step and warns.
            peft: LoRA adapters instead of full fine-tuning: a dict of ``peft.LoraConfig`` keyword
                arguments, e.g. ``{r: 16, lora_alpha: 32, target_modules: all-linear}`` (needs
                ``pip install 'rlhf-lightning[peft]'``). Only the adapters train; with ``reference: null`` the reference is the same model with its adapters
                disabled (no second copy of the weights); the export
                writes the adapter (``HFExport(merge_adapters=true)`` also writes merged weights).
            disable_dropout: set every dropout probability of the trained model to 0 (TRL's default):
                with dropout, the model in train mode differs from itself in eval mode,
                so the implicit reward is not 0 at initialisation.

        Logged (names as in TRL): ``loss``, ``rewards/chosen``, ``rewards/rejected``,
        ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``,
        ``logits/chosen``, ``logits/rejected``. ``val/``: means over the validation set. ``train/``:
        ``loss`` and ``rewards/accuracies`` every step (progress bar); the others on the steps the
        logger writes (every ``trainer.log_every_n_steps``, and the last step), as means over the steps
        since the previous write — logging them every step would cost ~5 ms of Lightning bookkeeping
        per step for values the logger never sees (:mod:`~rlhf_lightning.modules.metric_window`).
        """
        super().__init__()
        self.on_nonfinite = on_nonfinite
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if reference_cache_dir is not None and not precompute_reference:
            raise ValueError("reference_cache_dir is only used with precompute_reference=True.")
        self.save_hyperparameters(
            ignore=[name for name, value in (("model", model), ("reference", reference)) if not isinstance(value, (str, dict, type(None)))]
        )
        self.optim = optim or Optimization()
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.average_logps = loss_type == "ipo"
        self.precompute_reference = precompute_reference
        self.pair_layout = ("shared_prompt" if shared_prompt else "padding_free") if padding_free else "padded"
        self.max_row_tokens = max_row_tokens
        self.reference_cache_dir = reference_cache_dir
        self._init_tokenizer(tokenizer, model)
        self.model = prepare_trainable(
            load_causal_lm(model, tokenizer=self.tokenizer, dtype=dtype),
            peft=peft, no_dropout=disable_dropout, gradient_checkpointing=gradient_checkpointing,
        )
        # A named reference, else the LoRA policy with adapters off, else a frozen copy of the policy.
        self.ref_model: torch.nn.Module | None = build_reference(self.model, reference, tokenizer=self.tokenizer, dtype=dtype)
        self._ref_values: dict[str, PerIndexValues] = {}
        self.reference_cache_hits: dict[str, bool] = {}
        self._train_window = MetricWindow()

    # ------------------------------------------------------------------------------------------ hooks

    @property
    def policy(self) -> torch.nn.Module:
        return self.model

    @property
    def reference(self) -> torch.nn.Module | None:
        """The frozen reference, or None once precomputed log-probs have replaced it."""
        return self.ref_model

    def _pad_token_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def _layout_kwargs(self) -> dict[str, Any]:
        """How pair batches reach the models (:func:`~rlhf_lightning.modules.pair_forward.pair_logps`)."""
        return {"layout": self.pair_layout, "max_row_tokens": self.max_row_tokens}

    # ------------------------------------------------------------------------------ precomputed reference

    def setup(self, stage: str) -> None:
        if not self.precompute_reference or self.ref_model is None:
            return
        splits: dict[str, DataLoader | None] = {}
        if stage == "fit":
            splits["train"] = _stage_dataloader(self.trainer, "train", stage)
        if stage in ("fit", "validate") and self.trainer.limit_val_batches != 0:  # 0 = validation disabled: nothing to precompute
            splits["val"] = _stage_dataloader(self.trainer, "val", stage)
        if stage == "test":
            splits["test"] = _stage_dataloader(self.trainer, "test", stage)
        if not any(loader is not None for loader in splits.values()):
            return  # nothing to precompute for this stage; keep the live reference
        self.precompute_reference_logps({name: loader for name, loader in splits.items() if loader is not None})

    def precompute_reference_logps(self, loaders: dict[str, DataLoader]) -> None:
        """Compute (or load from ``reference_cache_dir``) the reference log-probs of every example of
        each loader, then delete the reference model.

        Runs before the strategy moves the module, so the reference is moved to the run's device here.
        Under data parallelism each rank computes a share of the batches and the shares are gathered
        (:func:`~rlhf_lightning.reference_cache.cached_per_index`); only global rank zero writes the cache.
        """
        ref = self.ref_model
        assert ref is not None
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else next(ref.parameters()).device
        is_writer = trainer is None or trainer.is_global_zero
        weights = model_fingerprint(ref)
        ref.to(device)
        pad = self._pad_token_id()

        def fn(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            # Under the same autocast as the training step: precomputed and live reference give the same
            # numbers in every precision (bf16-mixed included).
            with self.step_precision_context():
                out = reference_pair_logps(ref, batch, average=self.average_logps, pad_token_id=pad, **self._layout_kwargs())
            return {"ref_chosen_logps": out.chosen_logps, "ref_rejected_logps": out.rejected_logps}

        for split, loader in loaders.items():
            fingerprint = combine_fingerprints(
                kind="dpo-reference-logps", data=dataset_fingerprint(loader.dataset), reference=weights, average=self.average_logps,
                precision=self.step_precision_name(),
            )
            values, hit = cached_per_index(
                loader, fn, fingerprint=fingerprint, cache_dir=self.reference_cache_dir, name=f"ref-logps-{split}",
                device=device, write=is_writer,
            )
            self._ref_values[split] = values
            self.reference_cache_hits[split] = hit
            log.info("reference log-probs for %s: %s (%d rows)", split, "cache hit" if hit else "computed", len(values))
        if trainer is not None:
            trainer.strategy.barrier("dpo_reference_cache")
        # Drop the reference: from here on training holds one model.
        self.ref_model = None
        del ref
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def _reference_logps(self, batch: dict[str, torch.Tensor], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ref_model is not None:
            out = reference_pair_logps(
                self.ref_model, batch, average=self.average_logps, pad_token_id=self._pad_token_id(), **self._layout_kwargs()
            )
            return out.chosen_logps, out.rejected_logps
        values = self._ref_values.get(split)
        if values is None:
            raise RuntimeError(
                f"DPOModule: the reference was replaced by precomputed log-probs, but none exist for the {split!r} data. "
                "Precomputation covers the train and val dataloaders of `fit`/`validate`."
            )
        found = values.lookup(batch["index"])
        return found["ref_chosen_logps"], found["ref_rejected_logps"]

    # ------------------------------------------------------------------------------------------- steps

    def _step(self, batch: dict[str, torch.Tensor], split: str):
        policy_out: PairLogps = pair_logps(
            self.model, batch, average=self.average_logps, return_logits_mean=True, pad_token_id=self._pad_token_id(),
            **self._layout_kwargs(),
        )
        ref_chosen, ref_rejected = self._reference_logps(batch, split)
        losses, chosen_rewards, rejected_rewards, extra_metrics = self._pair_loss(policy_out, ref_chosen, ref_rejected, batch, split)
        loss = losses.mean()
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy_out.chosen_logps.detach().mean(),
            "logps/rejected": policy_out.rejected_logps.detach().mean(),
            "logits/chosen": policy_out.chosen_logits_mean,
            "logits/rejected": policy_out.rejected_logits_mean,
            **extra_metrics,
        }
        return loss, metrics

    def _pair_loss(
        self, policy_out: PairLogps, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, batch: dict[str, torch.Tensor], split: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(losses, chosen_rewards, rejected_rewards)`` each ``(B,)``, plus extra metrics; MODPO overrides it."""
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_out.chosen_logps,
            policy_out.rejected_logps,
            ref_chosen,
            ref_rejected,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
        )
        return losses, chosen_rewards, rejected_rewards, {}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self._step(batch, "train")
        batch_size = batch["chosen_input_ids"].shape[0]
        for name in _PROGRESS_BAR_METRICS:  # every step: the progress bar shows them
            self.log(f"train/{name}", metrics[name], prog_bar=True, batch_size=batch_size)
        # The other statistics only when the logger writes, as means over the window (see MetricWindow).
        self._train_window.log(
            self, {name: value for name, value in metrics.items() if name not in _PROGRESS_BAR_METRICS}, batch_size=batch_size
        )
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        _, metrics = self._step(batch, self.eval_split())
        batch_size = batch["chosen_input_ids"].shape[0]
        for name, value in metrics.items():
            self.log(f"val/{name}", value, prog_bar=name in ("loss", "rewards/accuracies"), batch_size=batch_size, sync_dist=True)
        return metrics  # detached scalars, for callbacks (``on_validation_batch_end``)


def _stage_dataloader(trainer, split: str, stage: str) -> DataLoader | None:
    """The train / val / test dataloader the trainer is about to use (datamodule or loaders passed to ``fit`` / ``test``)."""
    if trainer is None:
        return None
    datamodule = getattr(trainer, "datamodule", None)
    loader = None
    try:
        if datamodule is not None:
            loader = {"train": datamodule.train_dataloader, "val": datamodule.val_dataloader, "test": datamodule.test_dataloader}[split]()
        else:  # loaders passed straight to trainer.fit(...)
            if split == "train":
                source = trainer.fit_loop._data_source
            elif split == "test":
                source = trainer.test_loop._data_source
            elif stage == "validate":
                source = trainer.validate_loop._data_source
            else:
                source = trainer.fit_loop.epoch_loop.val_loop._data_source
            loader = source.dataloader() if source.is_defined() else None
    except NotImplementedError:
        loader = None
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if len(loader) == 1 else None
    if isinstance(loader, DataLoader) and len(loader.dataset) > 0:
        return loader
    return None
