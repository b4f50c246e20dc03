"""Reward modelling from preference pairs (InstructGPT stage two; Ouyang et al. 2022, sec. 3.5).

Loss: Bradley-Terry ``-log sigma(r(x, y_w) - r(x, y_l) - m)`` averaged over pairs
(:func:`~rlhf_lightning.losses.reward_model_loss`), with Llama-2's per-pair margin ``m`` when
``use_margin`` and the batch carries a ``margin`` column, plus Eisenstein et al.'s reward-centering
term when ``center_rewards_coef > 0``.

Where this departs from the papers, and why:

* InstructGPT puts all K-choose-2 comparisons of a prompt in one batch element; we take pairs as
  they come (the data's job), which is what TRL and DeepSpeed-Chat do.
* Chosen and rejected are scored in ONE forward
  (:func:`~rlhf_lightning.modules.pair_forward.reward_pair_scores`), by default packed without padding
  and with each pair's prompt computed once (the same rewards as the padded batch, fewer tokens).
* The score is read at the last real token found from the attention mask, not by comparing ids
  with the pad id (which may equal EOS).
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanMetric

from rlhf_lightning.losses import reward_centering_loss, reward_model_loss
from rlhf_lightning.models import ModelSpecArg, PeftArg, load_reward_model, prepare_trainable
from rlhf_lightning.modules.base import RLHFModuleBase
from rlhf_lightning.modules.metric_window import MetricWindow
from rlhf_lightning.modules.optim import Optimization
from rlhf_lightning.modules.pair_forward import reward_pair_scores

__all__ = ["RewardModelModule", "PairRewardMetrics", "pair_reward_stats"]


def pair_reward_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch statistics of pair rewards ``(B,)``: ``accuracy`` = fraction with ``r_c > r_r``, ``margin`` =
    mean ``r_c - r_r``, ``reward_mean`` / ``reward_std`` over all 2B rewards (population std)."""
    rewards = torch.cat([chosen_rewards, rejected_rewards]).detach().float()
    return {
        "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "margin": (chosen_rewards - rejected_rewards).detach().float().mean(),
        "reward_mean": rewards.mean(),
        "reward_std": rewards.std(unbiased=False),
    }


class PairRewardMetrics(nn.Module):
    """The statistics of :func:`pair_reward_stats` aggregated over an epoch with torchmetrics
    ``MeanMetric`` states, so ``compute()`` is synchronised across data-parallel ranks.

    The std is ``sqrt(E[r^2] - E[r]^2)`` from two running means (population std over all rewards).
    ``persistent=True`` keeps the running states in ``state_dict`` (checkpoints), so the epoch statistics
    of a run resumed mid-epoch cover the whole epoch, as an uninterrupted run's do.
    """

    def __init__(self, persistent: bool = False):
        super().__init__()
        self.accuracy = MeanMetric()
        self.margin = MeanMetric()
        self.reward = MeanMetric()
        self.reward_sq = MeanMetric()
        if persistent:
            for metric in (self.accuracy, self.margin, self.reward, self.reward_sq):
                metric.persistent(True)

    def update(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> None:
        chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
        rewards = torch.cat([chosen, rejected])
        self.accuracy.update((chosen > rejected).float())
        self.margin.update(chosen - rejected)
        self.reward.update(rewards)
        self.reward_sq.update(rewards * rewards)

    def compute(self) -> dict[str, torch.Tensor]:
        mean = self.reward.compute()
        var = (self.reward_sq.compute() - mean * mean).clamp(min=0.0)
        return {"accuracy": self.accuracy.compute(), "margin": self.margin.compute(), "reward_mean": mean, "reward_std": var.sqrt()}

    def reset(self) -> None:
        for metric in (self.accuracy, self.margin, self.reward, self.reward_sq):
            metric.reset()

    @property
    def has_updates(self) -> bool:
        return bool(self.accuracy.update_count)


class RewardModelModule(RLHFModuleBase):
    def __init__(
        self,
        model: ModelSpecArg,
        tokenizer: str | None = None,
        *,
        use_margin: bool = False,
        center_rewards_coef: float | None = 0.0,
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
        """Train a scalar reward model on preference pairs (Bradley-Terry).

        Args:
            model: an SFT export / causal LM directory or Hub name (its LM head is dropped and a new
                scalar score head initialised), an existing sequence classifier with one label, or an
                inline transformers config dict for a randomly initialised model.
            tokenizer: tokenizer name or directory; defaults to ``model`` when that is a path or name.
            use_margin: subtract the batch's per-pair ``margin`` column inside the sigmoid (Llama 2);
                the data must then carry a ``margin`` field.
            center_rewards_coef: weight of the reward-centering term ``mean (r_c + r_r)^2``
                (0.01 in Eisenstein et al. 2023); ``None`` or 0 turns it off.
            optim: optimizer and learning-rate schedule (see ``Optimization``).
            dtype: parameter dtype (``float32``, ``bfloat16``); ``None`` keeps the checkpoint's.
            gradient_checkpointing: recompute activations in backward to save memory.
            padding_free: pack each batch's sequences into rows without padding (position ids restart
                per sequence, attention stays within it); same rewards as the padded batch. Models
                that cannot take packed rows are run padded. ``False`` = the padded ``(2B, T)`` batch.
            shared_prompt: with ``padding_free``, each pair's prompt once, both completions attending
                to it and not to each other.
            max_row_tokens: token budget of a packed row; ``None`` = the longest unit of the batch.
            on_nonfinite: ``"error"`` (default) stops the run when a loss or gradient is NaN/inf, naming the
                step and the quantity; ``"skip"`` drops that optimizer step and warns.
            peft: LoRA adapters instead of full fine-tuning: a dict of ``peft.LoraConfig`` keyword
                arguments, e.g. ``{r: 16, lora_alpha: 32, target_modules: all-linear}`` (needs
                ``pip install 'rlhf-lightning[peft]'``). Only the adapters train (and the score head, fully); the export
                writes the adapter (``HFExport(merge_adapters=true)`` also writes merged weights).
            disable_dropout: set every dropout probability of the trained model to 0 (TRL's default):
                with dropout, the model in train mode differs from itself in eval mode, so a pair's scores depend on the dropout draw.

        Logged (``train/``, ``train/epoch_`` per epoch, ``val/`` per validation): ``loss``,
        ``accuracy`` (fraction of pairs with r_c > r_r), ``margin`` (mean r_c - r_r), ``reward_mean``,
        ``reward_std``. ``train/loss`` and ``train/accuracy`` are logged every step; ``train/margin``,
        ``train/reward_mean`` and ``train/reward_std`` on the steps the logger writes, as means over
        the steps since its previous write (:mod:`~rlhf_lightning.modules.metric_window`).
        """
        super().__init__()
        self.on_nonfinite = on_nonfinite
        if center_rewards_coef is not None and center_rewards_coef < 0:
            raise ValueError(f"center_rewards_coef must be >= 0 or None, got {center_rewards_coef}")
        self.save_hyperparameters(ignore=["model"] if not isinstance(model, (str, dict)) else None)
        self.optim = optim or Optimization()
        self.use_margin = use_margin
        self.center_rewards_coef = float(center_rewards_coef or 0.0)
        self.pair_layout = ("shared_prompt" if shared_prompt else "padding_free") if padding_free else "padded"
        self.max_row_tokens = max_row_tokens
        self._init_tokenizer(tokenizer, model)
        self.model = prepare_trainable(
            load_reward_model(model, tokenizer=self.tokenizer, dtype=dtype),
            peft=peft, no_dropout=disable_dropout, gradient_checkpointing=gradient_checkpointing, task_type="SEQ_CLS",
        )
        self.train_metrics = PairRewardMetrics(persistent=True)  # mid-epoch resume keeps the epoch's statistics
        self.val_metrics = PairRewardMetrics()
        self._train_window = MetricWindow()

    @property
    def policy(self) -> torch.nn.Module:
        """The trainable model (here the reward model; the hook name is shared by all modules)."""
        return self.model

    def export_model(self) -> torch.nn.Module:
        """The HF sequence classifier (one label), loadable with ``load_reward_model(path)``."""
        return self.model

    def _pad_token_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def _step(self, batch: dict[str, torch.Tensor]):
        chosen, rejected = reward_pair_scores(
            self.model, batch, pad_token_id=self._pad_token_id(), layout=self.pair_layout, max_row_tokens=self.max_row_tokens
        )  # (B,), (B,)
        margin = None
        if self.use_margin:
            if "margin" not in batch:
                raise KeyError("use_margin=True but the batch has no `margin` column; add `margin` to the records.")
            margin = batch["margin"].to(chosen.dtype)
        loss = reward_model_loss(chosen, rejected, margin=margin).mean()
        if self.center_rewards_coef > 0:
            loss = loss + reward_centering_loss(chosen, rejected, coef=self.center_rewards_coef)
        return loss, chosen, rejected

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, chosen, rejected = self._step(batch)
        self.train_metrics.update(chosen, rejected)
        batch_size = chosen.shape[0]
        stats = pair_reward_stats(chosen, rejected)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/accuracy", stats.pop("accuracy"), prog_bar=True, batch_size=batch_size)
        # margin / reward_mean / reward_std only when the logger writes, as window means (MetricWindow).
        self._train_window.log(self, stats, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, chosen, rejected = self._step(batch)
        self.val_metrics.update(chosen, rejected)
        self.log("val/loss", loss, prog_bar=True, batch_size=chosen.shape[0], sync_dist=True)

    def on_train_epoch_end(self) -> None:
        if self.train_metrics.has_updates:
            for name, value in self.train_metrics.compute().items():
                self.log(f"train/epoch_{name}", value)
        self.train_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        if self.val_metrics.has_updates:
            for name, value in self.val_metrics.compute().items():
                self.log(f"val/{name}", value, prog_bar=name == "accuracy")
        self.val_metrics.reset()
