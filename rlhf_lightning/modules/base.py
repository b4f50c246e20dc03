"""What every module shares: tokenizer loading, the ``policy``/``reference``/``export_model`` hooks that
callbacks use, the optimizer, and placement under sharded strategies (``configure_model``: FSDP2 when
the strategy is ``ModelParallelStrategy``, see :mod:`rlhf_lightning.strategies`). Kept deliberately
thin — methods compose helpers, they do not inherit behaviour from deep chains."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from rlhf_lightning.models import AdapterDisabledReference, ModelSpec, check_local_path, load_tokenizer
from rlhf_lightning.modules.optim import Optimization, build_optimizer
from rlhf_lightning.strategies import apply_fsdp2, export_state_dict

__all__ = ["RLHFModuleBase", "resolve_tokenizer_path", "NonFiniteError", "ON_NONFINITE"]

log = logging.getLogger(__name__)

ON_NONFINITE = ("error", "skip")


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient was about to reach the weights (``on_nonfinite: error``)."""


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
    _on_nonfinite: str = "error"
    nonfinite_skipped_steps: int = 0

    # ---- non-finite guard: a NaN/inf loss or gradient never reaches the weights silently ----------------

    @property
    def on_nonfinite(self) -> str:
        """``"error"`` (default): stop with :class:`NonFiniteError` naming the step and the quantity;
        ``"skip"``: drop that optimizer step (no parameter or optimizer-state update) and warn."""
        return self._on_nonfinite

    @on_nonfinite.setter
    def on_nonfinite(self, value: str) -> None:
        if value not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {value!r}")
        self._on_nonfinite = value

    def _nonfinite_where(self) -> str:
        trainer = self._trainer
        if trainer is None:
            return f"in {type(self).__name__}"
        return f"at global step {trainer.global_step} (epoch {trainer.current_epoch}) in {type(self).__name__}"

    def _nonfinite(self, quantity: str) -> None:
        message = f"Non-finite {quantity} {self._nonfinite_where()}"
        if self.on_nonfinite == "error":
            raise NonFiniteError(
                f"{message}: stopping before it reaches the weights. Usual causes: a learning rate far too high, "
                "a NaN/inf in the data, or overflow in low precision. Set the module's `on_nonfinite: skip` to "
                "drop such steps instead."
            )
        self.nonfinite_skipped_steps += 1
        log.warning("%s: optimizer step skipped (%d skipped so far, on_nonfinite=skip).", message, self.nonfinite_skipped_steps)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Called before every backward (automatic and manual optimization): the loss must be finite."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        # OR over the micro-batches of one optimizer step (gradient accumulation); reset at the step.
        self._loss_nonfinite = getattr(self, "_loss_nonfinite", False) or bad
        if bad and self.on_nonfinite == "error":
            self._nonfinite(f"loss ({loss.detach().float().mean().item()})")

    def on_before_optimizer_step(self, optimizer) -> None:
        """Called before every optimizer step: every gradient must be finite (checked with one fused
        norm per step and agreed across ranks). ``skip`` drops the gradients, so the optimizer leaves
        the parameters and its own state unchanged."""
        if isinstance(self.trainer.strategy, DeepSpeedStrategy):  # its engine owns the gradients
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
        finite = True
        if grads:
            norms = torch._foreach_norm(grads)
            finite = bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())
        loss_bad = getattr(self, "_loss_nonfinite", False)
        self._loss_nonfinite = False
        finite = self.trainer.strategy.reduce_boolean_decision(finite and not loss_bad, all=True)
        if finite:
            return
        if loss_bad:
            quantity = "loss"
        else:
            names = {id(p): name for name, p in self.named_parameters()}
            bad = next((names.get(id(p), "?") for p, g in zip(params, grads) if not torch.isfinite(g).all()), "?")
            quantity = f"gradient (first: {bad})"
        self._nonfinite(quantity)
        for p in params:  # skip: the optimizer ignores parameters without a gradient
            p.grad = None

    def _init_tokenizer(self, tokenizer: str | None, model: ModelSpec, padding_side: str = "right") -> None:
        check_local_path(model, "model")  # before the tokenizer, which defaults to the model's path
        self.tokenizer_path = resolve_tokenizer_path(tokenizer, model)
        try:
            self.tokenizer = load_tokenizer(self.tokenizer_path, padding_side=padding_side)
        except FileNotFoundError as error:
            if tokenizer is None and str(error).startswith("tokenizer path does not exist"):  # it follows the model
                raise FileNotFoundError("model" + str(error)[len("tokenizer"):]) from error
            raise

    def step_precision_context(self) -> contextlib.AbstractContextManager:
        """The autocast the trainer's precision plugin wraps around every training/validation step
        (``bf16-mixed``: ``torch.autocast(..., dtype=bfloat16)``); a no-op without a trainer. Values
        computed outside a step but compared with values computed inside one (precomputed reference
        log-probs, MODPO margins) must be computed under it, or the two differ by the bf16 rounding."""
        trainer = self._trainer
        if trainer is None:
            return contextlib.nullcontext()
        return trainer.precision_plugin.forward_context()

    def step_precision_name(self) -> str:
        """The trainer's precision setting (``"32-true"``, ``"bf16-mixed"``, ...), for cache fingerprints."""
        trainer = self._trainer
        return str(getattr(getattr(trainer, "precision_plugin", None), "precision", "32-true")) if trainer is not None else "32-true"

    @property
    def policy(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def reference(self) -> torch.nn.Module | None:
        return None

    def export_model(self) -> torch.nn.Module:
        """The Hugging Face model written by the export callback (``save_pretrained``-able)."""
        return self.policy

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full state dict of :meth:`export_model` when its weights are sharded (FSDP2, FSDP1, ZeRO-3),
        gathered on global rank 0 (``None`` on the others); ``None`` when they are whole (one device, DDP,
        ZeRO-1/2). A collective under sharding: the export callback calls it on every rank.
        """
        return export_state_dict(self, self.export_model())

    def models_to_shard(self) -> dict[str, torch.nn.Module]:
        """``{name: model}`` that :meth:`configure_model` places under FSDP2: every child module with
        parameters (policy, value head or critic, reference, ...). Trainable ones are sharded, frozen
        ones sharded or replicated per the strategy's ``frozen_models``. Override to change the set."""
        return {
            name: child
            for name, child in self.named_children()
            # The adapter-disabled reference of a LoRA policy is the policy itself: nothing of its own.
            if next(child.parameters(), None) is not None and not isinstance(child, AdapterDisabledReference)
        }

    def configure_model(self) -> None:
        """Shard the models with FSDP2 when the strategy is ``ModelParallelStrategy`` (configs/strategy/
        fsdp2.yaml); a no-op under every other strategy (DDP replicates, FSDP1 and DeepSpeed wrap the
        module themselves)."""
        apply_fsdp2(self, self.models_to_shard())

    def trainable_named_parameters(self):
        return [(name, p) for name, p in self.named_parameters() if p.requires_grad]

    def configure_optimizers(self):
        total_steps = self.trainer.estimated_stepping_batches if self._trainer is not None else None
        return build_optimizer(self.trainable_named_parameters(), self.optim, total_steps)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Called when the optimizer steps (automatic optimization); then frees the gradients it consumed.

        Lightning zeroes gradients inside the *next* step's closure, after that step's forward, so one
        gradient-sized buffer per parameter would stay alive through every forward: measured +15% peak
        memory over the bare loop (docs/results/dpo.md). DeepSpeed zeroes them in its own step.
        """
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if not isinstance(self.trainer.strategy, DeepSpeedStrategy):
            optimizer.zero_grad(set_to_none=True)

    # ---- frozen reference: rebuilt from its spec, never stored in checkpoints -------------------------

    _REFERENCE_PREFIX = "ref_model."

    def state_dict(self, *args, **kwargs):
        """The module's state without the frozen reference (``ref_model.*``): it is rebuilt from its spec
        at load time, so checkpoints (plain, or sharded through torch.distributed.checkpoint, which reads
        this state dict to plan what it stores and loads) hold one copy of the model, not two."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for key in [k for k in state if k.startswith(prefix + self._REFERENCE_PREFIX)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load everything but the reference (its keys may be absent; present ones are loaded too), with
        ``strict`` checking every other key."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith(self._REFERENCE_PREFIX)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing}, "
                f"unexpected keys {result.unexpected_keys}"
            )
        return type(result)(missing, result.unexpected_keys)

    # ---- test: the validation step on the test data (``rlhf-lightning test``) -------------------------

    def eval_split(self) -> str:
        """``"test"`` while the trainer tests, else ``"val"``: which precomputed values an eval step reads."""
        return "test" if self._trainer is not None and self.trainer.testing else "val"

    def test_step(self, batch: Any, batch_idx: int) -> Any:
        """Called for each test batch (``rlhf-lightning test``, the DataModule's ``test_file``): the
        validation step, with its ``val/`` metrics logged as ``test/``."""
        return self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        """Called when the test epoch ends: the validation epoch-end metrics, as ``test/``."""
        self.on_validation_epoch_end()

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log``; while testing, the validation step's ``val/<name>`` becomes ``test/<name>``."""
        if name.startswith("val/") and self.eval_split() == "test":
            name = "test/" + name[len("val/"):]
        super().log(name, value, *args, **kwargs)

    # ---- checkpoints: atomic writes, a checkpoint at SIGTERM, clear errors on resume ------------------

    def configure_callbacks(self):
        """Every module saves a checkpoint when the run is stopped by SIGTERM and exits with status 143
        (:class:`~rlhf_lightning.checkpointing.PreemptionCheckpoint`)."""
        from rlhf_lightning.checkpointing import PreemptionCheckpoint

        return [PreemptionCheckpoint()]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rlhf_lightning"] = {"module": f"{type(self).__module__}.{type(self).__qualname__}"}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming: a checkpoint of another module class is an error; hyperparameters that differ from
        the checkpoint's are listed at WARNING with the value that is used."""
        from rlhf_lightning.checkpointing import CheckpointError, describe_hparam_changes

        trainer = self._trainer
        path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        saved_module = (checkpoint.get("rlhf_lightning") or {}).get("module")
        this_module = f"{type(self).__module__}.{type(self).__qualname__}"
        if saved_module is not None and saved_module != this_module:
            raise CheckpointError(
                f"Checkpoint {path or ''} was written by {saved_module.rsplit('.', 1)[-1]} ({saved_module}), but this run "
                f"trains a {type(self).__name__}; resume with the same model class_path, or start a new run "
                "(load its exported weights with `model: <export folder>`)."
            )
        saved = checkpoint.get("hyper_parameters") or {}
        if saved:
            changes = describe_hparam_changes(saved, dict(self.hparams))
            if changes:
                log.warning(
                    "Resuming from %s with %d hyperparameter(s) different from the checkpoint's:\n%s",
                    path or "a checkpoint", len(changes), "\n".join(changes),
                )

    def on_fit_start(self) -> None:
        from rlhf_lightning.checkpointing import install_atomic_checkpoint_io

        install_atomic_checkpoint_io(self.trainer)
        # transformers 5 returns from_pretrained models in eval mode and Lightning keeps module modes as
        # they are: put the trainable policy in train mode, frozen models stay in eval.
        policy = self.policy
        if policy is not None:
            policy.train()
        reference = self.reference
        if reference is not None:
            reference.eval()
