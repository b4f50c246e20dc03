"""Model averaging between the initial and the trained policy (Lin et al. 2024, "Mitigating the Alignment
Tax of RLHF"): ``theta = (1 - alpha) * theta_init + alpha * theta_trained``, with one alpha or per-layer
alphas (heterogeneous model averaging). The arithmetic is ``rlhf_lightning.weights.interpolate_state_dicts``.

Departure from the paper: HMA *searches* the per-layer ratios; this callback applies given ratios (run
it several times, e.g. one instance per candidate spec with its own ``dirpath``, and pick on validation).
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from rlhf_lightning.callbacks._hooks import check_state_key, get_policy
from rlhf_lightning.weights import AlphaSpec, interpolate_state_dicts, validate_alpha_spec

__all__ = ["ModelAveraging"]


class ModelAveraging(Callback):
    def __init__(
        self,
        alpha: AlphaSpec = 0.5,
        dirpath: str | None = None,
        apply_to_model: bool = False,
        state_key: str | None = None,
    ):
        """At the end of fit, interpolate the policy between its fit-start and trained weights.

        Args:
            alpha: weight of the trained model: a float (0 = initial, 1 = trained), a list with one value per
                decoder layer, or layer ranges ``{"0-3": 0.2, "4-7": 0.8, "default": 0.5}`` (see
                ``rlhf_lightning.weights.resolve_alpha``).
            dirpath: where to write the averaged model as a Hugging Face ``save_pretrained`` directory (with
                ``pl_module.tokenizer`` when present); defaults to ``<trainer.default_root_dir>/hf/averaged``.
            apply_to_model: also load the averaged weights into ``pl_module.policy`` in place.
            state_key: checkpoint key of this callback's state, when several instances coexist.

        Module hook used: ``pl_module.policy`` (a ``save_pretrained``-able model) and, optionally,
        ``pl_module.tokenizer``. The initial weights (the policy's full state dict at fit start, kept on CPU)
        are saved in checkpoints, so a resumed run averages with the true initialisation.
        """
        super().__init__()
        validate_alpha_spec(alpha)
        self.alpha = alpha
        self.dirpath = dirpath
        self.apply_to_model = bool(apply_to_model)
        self._state_key = check_state_key(state_key, "ModelAveraging")
        self._init: dict[str, torch.Tensor] | None = None
        self._restored = False

    @property
    @override
    def state_key(self) -> str:
        if self._state_key is not None:
            return self._state_key
        return self._generate_state_key(alpha=self.alpha, dirpath=self.dirpath)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Called when fit begins: remember the policy's initial weights (unless restored from a checkpoint)."""
        if not self._restored:
            state = get_policy(pl_module, "ModelAveraging").state_dict()
            self._init = {name: t.detach().to("cpu", copy=True) for name, t in state.items()}

    def init_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's state dict at fit start (on CPU)."""
        if self._init is None:
            raise RuntimeError("ModelAveraging has no initial weights yet: they are captured when fit starts")
        return self._init

    @torch.no_grad()
    def interpolate(self, pl_module: L.LightningModule | torch.nn.Module, alpha: AlphaSpec | None = None) -> dict[str, torch.Tensor]:
        """The averaged state dict for the policy's current weights (``alpha`` defaults to the callback's).

        ``pl_module`` may be the LightningModule or the policy model itself.
        """
        model = pl_module if not isinstance(pl_module, L.LightningModule) else get_policy(pl_module, "ModelAveraging")
        return interpolate_state_dicts(self.init_state_dict(), model.state_dict(), self.alpha if alpha is None else alpha)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Called when fit ends: write the averaged model (rank zero) and optionally apply it in place."""
        policy = get_policy(pl_module, "ModelAveraging")
        averaged = self.interpolate(policy)
        if trainer.is_global_zero:
            from rlhf_lightning.callbacks.hf_export import save_hf_directory

            dirpath = self.dirpath or os.path.join(trainer.default_root_dir, "hf", "averaged")
            # a shallow copy: transformers' save_pretrained consumes the state dict it is given
            save_hf_directory(policy, getattr(pl_module, "tokenizer", None), dirpath, state_dict=dict(averaged))
        trainer.strategy.barrier("model_averaging")
        if self.apply_to_model:
            policy.load_state_dict(averaged)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"init": self._init}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("init") is not None:
            self._init = dict(state_dict["init"])
            self._restored = True
