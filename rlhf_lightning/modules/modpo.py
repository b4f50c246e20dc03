"""Multi-Objective DPO (Zhou et al. 2024, "Beyond One-Preference-Fits-All Alignment").

MODPO trains the preferences of ONE objective (index 0) with a DPO-style loss while the other K-1
objectives enter as fixed *margins*: scores of the chosen and rejected completions under frozen
per-objective reward models, weighted by ``weights[1:]`` (:func:`~rlhf_lightning.losses.modpo_loss`).
Sweeping the weight vector traces a Pareto front of policies, one DPO-cost run per point.

The module is :class:`~rlhf_lightning.modules.DPOModule` with another pair loss: the pair forward, the
frozen / precomputed reference, the reference cache, logging and checkpoint handling are DPO's
(``DPOModule._pair_loss`` is the one hook overridden). What is added is where margins come from:

* ``margin_sources``: reward sources, e.g. a trained reward model
  (:class:`~rlhf_lightning.rewards.RewardModelSource`), the implicit reward of a DPO checkpoint
  (:class:`~rlhf_lightning.rewards.ImplicitRewardSource`, scored token-level from the pair batch when it
  shares the policy's tokenizer) or a Python function (:class:`~rlhf_lightning.rewards.FunctionRewardSource`);
  other sources score texts decoded from the pair batch;
* ``margin_score_columns``: per-objective scores already in the data (``chosen_scores`` /
  ``rejected_scores`` columns, picked by name from ``datamodule.score_names``).

Where this departs from the paper, and why:

* Margins of the train / validation data are computed once before training (``precompute_margins``),
  keyed by the batch's ``index`` and cached on disk under a fingerprint of the tokenized data and of
  every margin source — the margin models are frozen, so per-step recomputation only costs forwards.
  A sweep over weightings then scores the data once, not once per weighting.
* Margins are used raw (no normalisation of the margin reward models): the weights carry the scale,
  exactly as in the loss. ``weights`` need not sum to one; only ``weights[0] > 0`` is required.
* Only the sigmoid (DPO) form of the loss exists; ``beta`` means what it means in DPO.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from rlhf_lightning.generation import decode_completions
from rlhf_lightning.losses import modpo_loss
from rlhf_lightning.models import ModelSpecArg, PeftArg
from rlhf_lightning.modules.dpo import DPOModule, _stage_dataloader
from rlhf_lightning.modules.optim import Optimization
from rlhf_lightning.modules.pair_forward import PairLogps, concatenate_pair
from rlhf_lightning.reference_cache import (
    PerIndexValues,
    cached_per_index,
    combine_fingerprints,
    dataset_fingerprint,
    model_fingerprint,
)

__all__ = ["MODPOModule", "pair_texts", "margin_source_fingerprint"]

log = logging.getLogger(__name__)

_PLAIN = (str, int, float, bool, type(None))


def pair_texts(batch: Mapping[str, torch.Tensor], tokenizer: Any) -> tuple[list[str], list[str], list[str]]:
    """``(prompts, chosen, rejected)`` texts of a preference batch, decoded with special tokens skipped
    (so EOS and BOS are dropped) — what a text-level reward source scores."""
    prompt_mask = batch["chosen_attention_mask"] * (1 - batch["chosen_completion_mask"])  # (B, Tc)
    prompts = decode_completions(tokenizer, batch["chosen_input_ids"], prompt_mask)
    chosen = decode_completions(tokenizer, batch["chosen_input_ids"], batch["chosen_completion_mask"])
    rejected = decode_completions(tokenizer, batch["rejected_input_ids"], batch["rejected_completion_mask"])
    return prompts, chosen, rejected


def margin_source_fingerprint(source: Any) -> str:
    """What a margin source's scores depend on, for the margin cache key.

    A source's own ``fingerprint()`` wins; otherwise: its class, its plain settings (numbers, strings,
    flags), the weights of an ``nn.Module`` it holds as ``model``, and the code of a function it wraps
    as ``fn`` (a changed reward function must not hit a stale cache).
    """
    own = getattr(source, "fingerprint", None)
    if callable(own):
        return str(own())
    parts: dict[str, Any] = {"class": f"{type(source).__module__}.{type(source).__qualname__}"}
    for key, value in sorted(vars(source).items()) if hasattr(source, "__dict__") else ():
        if isinstance(value, _PLAIN) and key not in ("batch_size", "device"):
            parts[key] = value
    model = getattr(source, "model", None)
    if isinstance(model, nn.Module):
        parts["model"] = model_fingerprint(model)
    fn = getattr(source, "fn", source if inspect.isfunction(source) else None)
    if fn is not None:
        parts["fn"] = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
        try:
            parts["fn_source"] = hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()
        except (OSError, TypeError):  # builtins, lambdas typed in a REPL: the name has to do
            pass
    return combine_fingerprints(**parts)


def _source_name(source: Any, position: int) -> str:
    return str(getattr(source, "name", None) or getattr(source, "__name__", None) or f"margin_{position}")


def _same_vocab(a: Any, b: Any) -> bool:
    try:
        return a is b or a.get_vocab() == b.get_vocab()
    except AttributeError:
        return False


class MODPOModule(DPOModule):
    def __init__(
        self,
        model: ModelSpecArg,
        tokenizer: str | None = None,
        *,
        reference: ModelSpecArg | None = None,
        margin_sources: list[Callable] | None = None,
        margin_score_columns: list[str] | None = None,
        weights: list[float],
        beta: float = 0.1,
        precompute_reference: bool = False,
        reference_cache_dir: str | None = None,
        precompute_margins: bool = True,
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
        """Fine-tune a causal LM on one objective's preference pairs with MODPO, the other objectives
        entering as weighted margins.

        Args:
            model: the policy to train: Hub name, local directory (e.g. the SFT export), or an inline
                transformers config dict for a randomly initialised model.
            tokenizer: tokenizer name or directory; defaults to ``model`` when that is a path or name.
            reference: the frozen reference policy; ``None`` uses a copy of the initial ``model``.
            margin_sources: reward sources of the other objectives (``RewardModelSource``,
                ``ImplicitRewardSource``, ``FunctionRewardSource``, ... in YAML as ``class_path`` /
                ``init_args``); each one's ``name`` labels its ``margins/<name>`` metric.
            margin_score_columns: objectives whose margins are score columns of the data
                (``chosen_scores`` / ``rejected_scores``, by name in ``datamodule.score_names``);
                they come after ``margin_sources`` in the objective order.
            weights: K = 1 + (number of margin objectives) preference weights; ``weights[0] > 0``
                belongs to the objective whose pairs are trained, ``weights[1:]`` to the margins in order.
            beta: inverse strength of the implicit KL constraint, as in DPO (0.1 in the paper).
            precompute_reference: compute the reference log-probs once before training and free the
                reference (see ``DPOModule``).
            reference_cache_dir: folder caching precomputed reference log-probs and margins across runs
                (keyed by fingerprints, so a weight sweep over the same data scores it once); ``None``
                keeps them in memory for this run only.
            precompute_margins: score the train / validation data with ``margin_sources`` once before
                training; False scores every batch live (still without gradient).
            optim: optimizer and learning-rate schedule (see ``Optimization``).
            dtype: parameter dtype of policy and reference (``float32``, ``bfloat16``).
            gradient_checkpointing: recompute the policy's activations in backward to save memory.
            padding_free / shared_prompt / max_row_tokens: how pair batches are packed, as in ``DPOModule``.
            on_nonfinite: ``"error"`` (default) stops the run when a loss or gradient is NaN/inf, naming the
                step and the quantity; ``"skip"`` drops that optimizer step and warns.
            peft: LoRA adapters (a dict of ``peft.LoraConfig`` keyword arguments); the reference is then
                the policy with its adapters disabled unless ``reference`` is named (see ``DPOModule``).
            disable_dropout: set every dropout probability of the policy to 0 (see ``DPOModule``).

        Logged (``train/`` per step, ``val/`` per validation epoch): DPO's metrics, where
        ``rewards/*`` are the margin-adjusted implicit rewards of ``modpo_loss``, plus
        ``margins/<name>``: the mean chosen-minus-rejected margin of each margin objective.
        """
        sources = list(margin_sources or [])
        columns = list(margin_score_columns or [])
        names = [_source_name(source, i) for i, source in enumerate(sources)] + columns
        if len(set(names)) != len(names):
            raise ValueError(f"margin objective names must be unique, got {names}; set each source's `name`")
        for source in sources:
            if not callable(source):
                raise TypeError(f"margin source {source!r} is not callable (a RewardSource maps prompts, completions -> scores)")
        weights = [float(w) for w in weights]
        if len(weights) != 1 + len(names):
            raise ValueError(
                f"weights must have K = 1 + {len(names)} entries (the trained objective, then margins {names}), got {weights}"
            )
        if not weights[0] > 0:
            raise ValueError(f"weights[0] (the trained objective) must be > 0, got {weights[0]}")
        super().__init__(
            model,
            tokenizer,
            reference=reference,
            beta=beta,
            loss_type="sigmoid",
            precompute_reference=precompute_reference,
            reference_cache_dir=reference_cache_dir if precompute_reference else None,
            optim=optim,
            dtype=dtype,
            gradient_checkpointing=gradient_checkpointing,
            padding_free=padding_free,
            shared_prompt=shared_prompt,
            max_row_tokens=max_row_tokens,
            on_nonfinite=on_nonfinite,
            peft=peft,
            disable_dropout=disable_dropout,
        )
        # DPOModule saved this __init__'s arguments too; store them again without the margin sources
        # (objects holding models: rebuilt from the config, never pickled into checkpoints).
        self.save_hyperparameters(
            ignore=["margin_sources"]
            + [name for name, value in (("model", model), ("reference", reference)) if not isinstance(value, (str, dict, type(None)))]
        )
        self.margin_sources = sources
        self.margin_score_columns = columns
        self.margin_names = names
        self.weights = weights
        self.cache_dir = reference_cache_dir
        self.precompute_margins = precompute_margins
        self.score_names: list[str] | None = None  # set from the datamodule in `setup`
        self._token_level = [hasattr(s, "score_pairs") and _same_vocab(getattr(s, "tokenizer", None), self.tokenizer) for s in sources]
        self._margin_values: dict[str, PerIndexValues] = {}
        self.margin_cache_hits: dict[str, bool] = {}

    # ------------------------------------------------------------------------------------------ margins

    def setup(self, stage: str) -> None:
        super().setup(stage)  # DPO: precomputed reference
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.margin_score_columns and self.score_names is None:
            self.score_names = list(getattr(datamodule, "score_names", None) or [])
        if not (self.precompute_margins and self.margin_sources):
            return
        loaders = {"train": _stage_dataloader(self.trainer, "train", stage) if stage == "fit" else None}
        if stage in ("fit", "validate") and self.trainer.limit_val_batches != 0:
            loaders["val"] = _stage_dataloader(self.trainer, "val", stage)
        self.precompute_source_margins({split: loader for split, loader in loaders.items() if loader is not None})

    def precompute_source_margins(self, loaders: dict[str, DataLoader]) -> None:
        """Score every example of each loader with the margin sources (or load the scores from the cache).

        Under data parallelism each rank computes a share of the batches and the shares are gathered
        (:func:`~rlhf_lightning.reference_cache.cached_per_index`); only global rank zero writes the cache.
        """
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        sources = [margin_source_fingerprint(source) for source in self.margin_sources]
        for split, loader in loaders.items():
            fingerprint = combine_fingerprints(
                kind="modpo-margins", data=dataset_fingerprint(loader.dataset), sources=sources, names=self.margin_names,
                precision=self.step_precision_name(),
            )
            values, hit = cached_per_index(
                loader, self._score_sources_under_step_precision, fingerprint=fingerprint, cache_dir=self.cache_dir, name=f"modpo-margins-{split}",
                device=device, write=trainer is None or trainer.is_global_zero,
            )
            self._margin_values[split] = values
            self.margin_cache_hits[split] = hit
            log.info("MODPO margins for %s: %s (%d rows)", split, "cache hit" if hit else "computed", len(values))
        if trainer is not None:
            trainer.strategy.barrier("modpo_margin_cache")

    def _score_sources_under_step_precision(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """:meth:`_score_sources` under the training step's autocast, so precomputed margins equal live ones."""
        with self.step_precision_context():
            return self._score_sources(batch)

    @torch.no_grad()
    def _score_sources(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``{"chosen/<name>": (B,), "rejected/<name>": (B,)}`` from every margin source, live."""
        out: dict[str, torch.Tensor] = {}
        texts = None
        for k, (source, token_level) in enumerate(zip(self.margin_sources, self._token_level)):
            name = self.margin_names[k]
            if token_level:
                chosen, rejected = source.score_pairs(batch)
            else:
                if texts is None:  # decode once for all text-level sources
                    prompts, chosen_text, rejected_text = pair_texts(batch, self.tokenizer)
                    pair = concatenate_pair(batch, pad_token_id=self._pad_token_id())
                    texts = (prompts + prompts, chosen_text + rejected_text, pair)
                scores = source(texts[0], texts[1], input_ids=texts[2].input_ids, attention_mask=texts[2].attention_mask)
                b = batch["chosen_input_ids"].shape[0]
                chosen, rejected = scores[:b], scores[b:]
            out[f"chosen/{name}"] = chosen.detach().float()
            out[f"rejected/{name}"] = rejected.detach().float()
        return out

    def _column_indices(self) -> list[int]:
        known = self.score_names or []
        missing = [name for name in self.margin_score_columns if name not in known]
        if missing:
            raise KeyError(
                f"MODPOModule: margin_score_columns {missing} are not score columns of the data (score_names = {known}); "
                "records need `chosen_scores`/`rejected_scores` dicts with these keys, loaded by a PreferenceDataModule"
            )
        return [known.index(name) for name in self.margin_score_columns]

    def margins(self, batch: Mapping[str, torch.Tensor], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(margin_chosen, margin_rejected)``, each ``(B, K-1)``: sources first, then score columns."""
        b = batch["chosen_input_ids"].shape[0]
        device = batch["chosen_input_ids"].device
        chosen: list[torch.Tensor] = []
        rejected: list[torch.Tensor] = []
        if self.margin_sources:
            values = self._margin_values.get(split)
            scored = values.lookup(batch["index"]) if values is not None else self._score_sources(batch)
            chosen += [scored[f"chosen/{name}"] for name in self.margin_names[: len(self.margin_sources)]]
            rejected += [scored[f"rejected/{name}"] for name in self.margin_names[: len(self.margin_sources)]]
        if self.margin_score_columns:
            if "chosen_scores" not in batch:
                raise KeyError("MODPOModule: margin_score_columns needs `chosen_scores`/`rejected_scores` in the batch")
            columns = torch.tensor(self._column_indices(), device=device)
            chosen += list(batch["chosen_scores"].index_select(1, columns).unbind(dim=1))
            rejected += list(batch["rejected_scores"].index_select(1, columns).unbind(dim=1))
        if not chosen:
            empty = torch.zeros(b, 0, device=device)
            return empty, empty
        return torch.stack(chosen, dim=1).float(), torch.stack(rejected, dim=1).float()

    # --------------------------------------------------------------------------------------------- loss

    def _pair_loss(
        self, policy_out: PairLogps, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, batch: dict[str, torch.Tensor], split: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        margin_chosen, margin_rejected = self.margins(batch, split)  # (B, K-1) each
        losses, chosen_rewards, rejected_rewards = modpo_loss(
            policy_out.chosen_logps,
            policy_out.rejected_logps,
            ref_chosen,
            ref_rejected,
            margin_chosen.to(policy_out.chosen_logps.dtype),
            margin_rejected.to(policy_out.chosen_logps.dtype),
            weights=self.weights,
            beta=self.beta,
        )
        per_objective = (margin_chosen - margin_rejected).mean(dim=0)  # (K-1,)
        extra = {f"margins/{name}": per_objective[k] for k, name in enumerate(self.margin_names)}
        return losses, chosen_rewards, rejected_rewards, extra
