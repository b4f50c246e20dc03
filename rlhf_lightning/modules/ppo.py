"""Proximal Policy Optimization for language models (Ziegler et al. 2019; Ouyang et al. 2022; Schulman et al. 2017).

One Lightning training step = one rollout: sample completions for the prompt batch (KV-cached), score
them, shape per-token rewards ``r_t = -kl_coef * kl_t (+ score on the last action)``, compute GAE
advantages, then run ``ppo_epochs`` x minibatches of clipped policy + value updates with manual
optimization. ``Trainer(max_steps=...)`` therefore counts rollouts, and the LR schedule steps once per
rollout. Every formula comes from :mod:`rlhf_lightning.losses`; rollouts from :mod:`rlhf_lightning.rollout`.

Hooks (docs/CONTRACTS_INTERNAL.md): ``policy`` (the HF causal LM, without value head), ``reference``,
``kl_coef`` (set by ``FixedKLController`` / ``AdaptiveKLController``), ``last_rollout_kl`` /
``last_rollout_size`` (read by those callbacks), ``export_model()``. Subclasses (Fine-Grained RLHF)
override :meth:`PPOModule.shape_rewards` and may replace ``reward_fn`` or :meth:`PPOModule.collect`.

Where this departs from the papers / common implementations, and why:

* Only the last inner optimizer step of a rollout goes through ``LightningOptimizer.step`` (the others
  go straight to ``strategy.optimizer_step``, the same precision path): Lightning counts every
  ``LightningOptimizer.step`` as a global step, and here ``global_step`` must count rollouts.
* Old log-probs are recomputed in eval mode (see :mod:`rlhf_lightning.rollout`), while updates run in
  train mode: give the policy no dropout (the usual PPO-for-LM setting), or the first ratio is not 1.
* Sampling and minibatch order are seeded from ``(seed, rank, global_step)``, so a run resumed from a
  checkpoint draws exactly the rollouts an uninterrupted run would.
* Advantages are whitened with statistics over *all* ranks' rollouts (all-reduced moment sums), so
  data-parallel PPO normalises as one large batch does.
* The frozen reference is not stored in checkpoints (it is rebuilt from ``reference`` / ``policy``).
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import asdict
from typing import Any, Callable, Mapping

import torch
from lightning.pytorch.utilities import rank_zero_info

from rlhf_lightning.evaluation import evaluate_policy
from rlhf_lightning.generation import SamplingConfig
from rlhf_lightning.losses import (
    KL_KINDS,
    dense_reward,
    gae,
    kl_penalty,
    masked_mean,
    masked_moment_sums,
    masked_sum,
    masked_var,
    mean_var_from_moment_sums,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from rlhf_lightning.models import CausalLMWithValueHead, ModelSpecArg, freeze, load_causal_lm
from rlhf_lightning.modules.base import RLHFModuleBase
from rlhf_lightning.modules.optim import Optimization
from rlhf_lightning.rewards import EnsembleRewardSource, GoldRewardSource, RewardTransform
from rlhf_lightning.rollout import Rollout, collect_rollout, policy_forward
from rlhf_lightning.strategies import clip_gradient_norm, set_deepspeed_gradient_clipping

__all__ = ["PPOModule"]


# The hyperparameters hold these dataclasses; allow them in `torch.load(weights_only=True)`, which is how
# `Trainer.fit(ckpt_path=...)` (and so `rlhf-lightning fit --ckpt_path`) reads a checkpoint to resume.
torch.serialization.add_safe_globals([SamplingConfig, Optimization])


def _no_closure() -> None:
    return None


class PPOModule(RLHFModuleBase):
    kl_coef: float

    def __init__(
        self,
        policy: ModelSpecArg,
        tokenizer: str | None = None,
        *,
        reference: ModelSpecArg | None = None,
        reward: Callable | dict[str, Callable] | None = None,
        critic: ModelSpecArg | None = None,
        sampling: SamplingConfig | None = None,
        ppo_epochs: int = 4,
        num_minibatches: int = 4,
        minibatch_size: int | None = None,
        clip_range: float = 0.2,
        value_clip_range: float | None = 0.2,
        vf_coef: float = 0.1,
        gamma: float = 1.0,
        lam: float = 0.95,
        kl_coef: float = 0.05,
        kl_estimator: str = "k1",
        whiten_advantages: bool = True,
        entropy_coef: float = 0.0,
        max_grad_norm: float | None = 1.0,
        reward_transform: RewardTransform | None = None,
        forward_batch_size: int | None = None,
        gold_objectives: list[str] | None = None,
        val_num_samples: int = 1,
        log_samples_every_n_steps: int = 50,
        num_logged_samples: int = 4,
        seed: int = 0,
        optim: Optimization | None = None,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        on_nonfinite: str = "error",
    ):
        """Fine-tune a causal LM against a reward with PPO.

        Args:
            policy: the policy to train: Hub name, local directory (e.g. the SFT export), or an inline
                transformers config dict for a randomly initialised model.
            tokenizer: tokenizer name or directory; defaults to ``policy`` when that is a path or name.
            reference: the frozen reference of the KL penalty; ``None`` uses a copy of the initial policy.
            reward: the reward source scoring ``(prompts, completions) -> (N,)`` — any ``RewardSource``
                (``RewardModelSource``, ``GoldRewardSource``, ``FunctionRewardSource``, ...), in YAML as
                ``class_path``/``init_args``; a dict ``{name: source}`` is averaged (a mean ensemble).
                May be None when a subclass assigns ``self.reward_fn`` itself.
            critic: ``None`` puts a value head on the policy's trunk (one forward gives both); a model
                spec builds a separate critic (a causal LM trunk + value head) instead.
            sampling: rollout sampling parameters (``max_new_tokens``, ``temperature``, ...); keep
                ``top_k=0`` / ``top_p=1.0``: the PPO log-probs assume the full tempered distribution.
            ppo_epochs: passes over each rollout (4, as in Ziegler et al. 2019).
            num_minibatches: minibatches per pass (ignored when ``minibatch_size`` is set).
            minibatch_size: episodes per minibatch; overrides ``num_minibatches``.
            clip_range: PPO ratio clip eps.
            value_clip_range: clip of the value update around the old values; ``None`` disables.
            vf_coef: weight of the value loss in the joint loss (matters with a shared trunk).
            gamma: discount factor (1: an episode is one short completion).
            lam: GAE lambda.
            kl_coef: initial KL penalty coefficient (a KL controller callback overrides it).
            kl_estimator: per-token KL estimator of the penalty: ``k1``, ``k2``, ``k3`` or ``abs``.
            whiten_advantages: normalise advantages to mean 0 / std 1 over the rollout (all ranks).
            entropy_coef: weight of an entropy bonus (0: entropy is only logged).
            max_grad_norm: clip the gradient norm of every inner step; ``None`` disables.
            reward_transform: post-processing of scores (running normalisation, missing-EOS penalty,
                clipping); its running statistics are part of the module's ``state_dict``.
            forward_batch_size: rows per no-grad forward pass while collecting the rollout (None: all).
            gold_objectives: gold objectives of the embedded world scored in validation
                (``val/gold/<name>``), e.g. ``[sentiment]``.
            val_num_samples: completions per validation prompt.
            log_samples_every_n_steps: print / log a few rollout samples every this many rollouts (0: never).
            num_logged_samples: samples shown each time.
            seed: seed of rollout sampling and minibatch order (combined with rank and step).
            optim: optimizer and learning-rate schedule (see ``Optimization``); one schedule step per rollout.
            dtype: parameter dtype of policy, critic and reference (``float32``, ``bfloat16``).
            gradient_checkpointing: recompute activations in backward to save memory.
            on_nonfinite: ``"error"`` (default) stops the run when a loss or gradient is NaN/inf, naming the
                step and the quantity; ``"skip"`` drops that optimizer step and warns.

        Logged per rollout: ``reward/raw``, ``reward/score`` (after the transform), ``reward/shaped``
        (per-token rewards summed per episode), ``kl`` (mean sequence KL), ``kl_coef``, ``entropy``,
        ``policy/clipfrac``, ``policy/approx_kl``, ``value/explained_variance``, ``value/clipfrac``,
        ``loss/policy``, ``loss/value``, ``response_length``, ``finished_fraction``, plus the extra
        metrics of :meth:`shape_rewards`. Validation: ``val/reward``, ``val/gold/<name>``,
        ``val/kl_to_reference``, ``val/response_length``.
        """
        super().__init__()
        self.on_nonfinite = on_nonfinite
        if kl_estimator not in KL_KINDS:
            raise ValueError(f"kl_estimator must be one of {KL_KINDS}, got {kl_estimator!r}")
        if ppo_epochs < 1:
            raise ValueError(f"ppo_epochs must be >= 1, got {ppo_epochs}")
        if num_minibatches < 1 or (minibatch_size is not None and minibatch_size < 1):
            raise ValueError("num_minibatches and minibatch_size must be >= 1")
        if clip_range <= 0 or (value_clip_range is not None and value_clip_range <= 0):
            raise ValueError("clip_range and value_clip_range must be > 0 (value_clip_range may be None)")
        if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
            raise ValueError(f"gamma and lam must be in [0, 1], got {gamma}, {lam}")
        if kl_coef < 0 or vf_coef < 0 or entropy_coef < 0:
            raise ValueError("kl_coef, vf_coef and entropy_coef must be >= 0")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        objects = {"policy": policy, "reference": reference, "critic": critic}
        self.save_hyperparameters(
            ignore=["reward", "reward_transform"]
            + [name for name, value in objects.items() if not isinstance(value, (str, dict, type(None)))]
        )
        # Many optimizer steps per rollout (ppo_epochs x minibatches): manual optimization.
        self.automatic_optimization = False
        self.optim = optim or Optimization()
        self.sampling = sampling if isinstance(sampling, SamplingConfig) else SamplingConfig(**(sampling or {}))
        self.ppo_epochs = ppo_epochs
        self.num_minibatches = num_minibatches
        self.minibatch_size = minibatch_size
        self.clip_range = clip_range
        self.value_clip_range = value_clip_range
        self.vf_coef = vf_coef
        self.gamma = gamma
        self.lam = lam
        self.kl_coef = float(kl_coef)
        self.kl_estimator = kl_estimator
        self.whiten_advantages = whiten_advantages
        self.entropy_coef = entropy_coef
        self.max_grad_norm = max_grad_norm
        self.forward_batch_size = forward_batch_size
        self.gold_objectives = list(gold_objectives or [])
        self.val_num_samples = val_num_samples
        self.log_samples_every_n_steps = log_samples_every_n_steps
        self.num_logged_samples = num_logged_samples
        self.seed = seed
        # Read by the KL controller callbacks after each training step (see callbacks/kl_control.py).
        self.last_rollout_kl: torch.Tensor | float | None = None
        self.last_rollout_size = 0

        self.reward_fn = EnsembleRewardSource(list(reward.values()), "mean") if isinstance(reward, Mapping) else reward
        self.reward_transform = reward_transform  # an nn.Module: its running stats are checkpointed

        self._init_tokenizer(tokenizer, policy)
        lm = load_causal_lm(policy, tokenizer=self.tokenizer, dtype=dtype)
        # A copy, not a second load: an inline config would otherwise draw different random weights.
        ref = copy.deepcopy(lm) if reference is None else load_causal_lm(reference, tokenizer=self.tokenizer, dtype=dtype)
        self.ref_model = freeze(ref)
        self.critic: CausalLMWithValueHead | None = None
        if critic is None:
            self.model: torch.nn.Module = CausalLMWithValueHead(lm, dtype=dtype)
        else:
            self.model = lm
            self.critic = CausalLMWithValueHead(critic, tokenizer=self.tokenizer, dtype=dtype)
            head = self.critic.pretrained_model.get_output_embeddings()
            if head.weight is not self.critic.pretrained_model.get_input_embeddings().weight:
                # The critic never uses its LM head: keep it out of the optimizer (and DDP's unused-param check).
                head.requires_grad_(False)
        if gradient_checkpointing:
            for model in (self.policy, self.critic.pretrained_model if self.critic is not None else None):
                if model is not None:
                    model.gradient_checkpointing_enable()

    # ------------------------------------------------------------------------------------------ hooks

    @property
    def policy(self) -> torch.nn.Module:
        """The trainable HF causal LM (without the value head)."""
        return self.model.pretrained_model if self.critic is None else self.model

    @property
    def reference(self) -> torch.nn.Module | None:
        return self.ref_model

    @property
    def sampling_temperature(self) -> float:
        """Temperature of the rollout log-probs (greedy decoding has none: 1)."""
        return self.sampling.temperature if self.sampling.do_sample else 1.0

    def on_fit_start(self) -> None:
        # from_pretrained returns eval-mode models and Lightning keeps module modes as they are.
        self.train()
        super().on_fit_start()  # puts the reference back in eval mode

    def configure_model(self) -> None:
        super().configure_model()
        # Manual optimization: under DeepSpeed only the engine can clip (see strategies.clip_gradient_norm).
        set_deepspeed_gradient_clipping(self, self.max_grad_norm)

    # ------------------------------------------------------------------------------------- the rollout

    def _step_seed(self) -> int:
        return ((self.seed * 1_000_003 + self.global_rank) * 1_000_003 + self.global_step) % (2**63)

    def collect(self, prompt_batch: Mapping[str, Any]) -> Rollout:
        """Sample, score and record old log-probs / ref log-probs / values for one prompt batch (no grad)."""
        if self.reward_fn is None:
            raise ValueError(f"{type(self).__name__} has no reward: pass `reward=` or assign `self.reward_fn`.")
        return collect_rollout(
            self.model,
            self.ref_model,
            self.tokenizer,
            prompt_batch,
            reward_fn=self.reward_fn,
            sampling=self.sampling,
            value_model=self.critic,
            reward_transform=self.reward_transform,
            forward_batch_size=self.forward_batch_size,
            seed=self._step_seed(),
        )

    def rollout_kl(self, rollout: Rollout) -> torch.Tensor:
        """``(N, T')`` per-token KL estimate (``kl_estimator``) on the shifted grid, 0 off-mask."""
        kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, kind=self.kl_estimator)
        return torch.where(rollout.mask.bool(), kl, torch.zeros_like(kl))

    def shape_rewards(self, rollout: Rollout, kl: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-token rewards of a rollout; override for other reward shapes (e.g. Fine-Grained RLHF).

        Args:
            rollout: the scored rollout.
            kl: ``(N, T')`` per-token KL estimate on the shifted grid (0 off-mask).

        Returns:
            ``(rewards (N, T'), extra metrics)``; default: ``-kl_coef * kl`` per token plus the
            sequence score on the last action (:func:`~rlhf_lightning.losses.dense_reward`).
        """
        return dense_reward(kl, rollout.scores, rollout.mask, kl_coef=self.kl_coef), {}

    def _whiten(self, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(masked_moment_sums(advantages, mask), reduce_op="sum")
            mean, var = mean_var_from_moment_sums(sums)
            return whiten(advantages, mask, mean=mean, var=var)
        return whiten(advantages, mask)

    # -------------------------------------------------------------------------------------- the update

    def _minibatches(self, n: int, generator: torch.Generator):
        size = self.minibatch_size or math.ceil(n / self.num_minibatches)
        for _ in range(self.ppo_epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, size):
                yield order[start : start + size]

    def _optimizer_step(self, optimizer, *, last: bool) -> None:
        if last:
            optimizer.step()  # counted: one global step per rollout
        else:
            self.trainer.strategy.optimizer_step(optimizer.optimizer, _no_closure, model=self)

    def ppo_update(self, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, torch.Tensor]:
        """``ppo_epochs`` x minibatches of clipped policy + value steps; returns mean statistics."""
        optimizer = self.optimizers()
        generator = torch.Generator().manual_seed(self._step_seed())
        batches = list(self._minibatches(len(rollout), generator))
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        entropy_batches = 0
        for i, rows in enumerate(batches):
            rows = rows.to(rollout.input_ids.device)
            attention_mask = rollout.attention_mask[rows]
            # Drop columns that are padding in every row of the minibatch (prompts are left padded,
            # completions right padded, so only trailing columns can go).
            width = int(attention_mask.sum(0).nonzero().max()) + 1
            mask = rollout.mask[rows, : width - 1]
            want_entropy = self.entropy_coef > 0 or i * self.ppo_epochs < len(batches)  # first epoch only
            out = policy_forward(
                self.model,
                rollout.input_ids[rows, :width],
                attention_mask[:, :width],
                rollout.completion_mask[rows, :width],
                temperature=self.sampling_temperature,
                value_model=self.critic,
                return_entropy=want_entropy,
            )
            policy_loss, policy_stats = ppo_policy_loss(
                out.logprobs, rollout.logprobs[rows, : width - 1], advantages[rows, : width - 1], mask, clip_range=self.clip_range
            )
            value_loss, value_stats = ppo_value_loss(
                out.values, rollout.values[rows, : width - 1], returns[rows, : width - 1], mask, clip_range=self.value_clip_range
            )
            loss = policy_loss + self.vf_coef * value_loss
            if out.entropy is not None:
                entropy = masked_mean(out.entropy, mask)
                if self.entropy_coef > 0:
                    loss = loss - self.entropy_coef * entropy
                sums["entropy"] += entropy.detach()
                entropy_batches += 1
            self.manual_backward(loss)
            if self.max_grad_norm is not None:
                clip_gradient_norm(self, optimizer, self.max_grad_norm)
            self._optimizer_step(optimizer, last=i == len(batches) - 1)
            optimizer.zero_grad(set_to_none=True)
            sums["loss/policy"] += policy_loss.detach()
            sums["loss/value"] += value_loss.detach()
            sums["policy/clipfrac"] += policy_stats["clipfrac"]
            sums["policy/approx_kl"] += policy_stats["approx_kl"]
            sums["value/clipfrac"] += value_stats["vf_clipfrac"]
        stats = {name: value / len(batches) for name, value in sums.items() if name != "entropy"}
        if entropy_batches:
            stats["entropy"] = sums["entropy"] / entropy_batches
        return stats

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        rollout = self.collect(batch)
        if rollout.values is None or rollout.ref_logprobs is None:
            raise RuntimeError("PPO needs values and reference log-probs in the rollout")
        mask = rollout.mask
        with torch.no_grad():
            kl = self.rollout_kl(rollout)  # (N, T')
            sequence_kl = masked_sum(kl, mask, dim=1)  # (N,)
            rewards, extra = self.shape_rewards(rollout, kl)  # (N, T')
            advantages, returns = gae(rewards, rollout.values, mask, gamma=self.gamma, lam=self.lam)
            if self.whiten_advantages:
                advantages = self._whiten(advantages, mask)
            residual_var = masked_var(returns - rollout.values, mask)
            explained_variance = 1.0 - residual_var / masked_var(returns, mask).clamp(min=1e-8)
        kl_coef = self.kl_coef  # the coefficient in force for this rollout
        self.last_rollout_kl = sequence_kl.mean()
        self.last_rollout_size = len(rollout)

        stats = self.ppo_update(rollout, advantages, returns)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

        metrics: dict[str, Any] = {
            "reward/raw": rollout.raw_scores.mean(),
            "reward/score": rollout.scores.mean(),
            "reward/shaped": masked_sum(rewards, mask, dim=1).mean(),
            "kl": sequence_kl.mean(),
            "kl_coef": kl_coef,
            "value/explained_variance": explained_variance,
            "response_length": rollout.completion_lengths.float().mean(),
            "finished_fraction": rollout.finished.float().mean(),
            **stats,
            **extra,
        }
        for name, value in metrics.items():
            self.log(
                name, value, on_step=True, on_epoch=False, batch_size=len(rollout), sync_dist=True,
                prog_bar=name in ("reward/raw", "kl"),
            )
        if self.log_samples_every_n_steps and (self.global_step - 1) % self.log_samples_every_n_steps == 0:
            self.log_samples(rollout)

    # ------------------------------------------------------------------------------------------ logging

    def log_samples(self, rollout: Rollout) -> None:
        """A few prompt / completion / score rows: a text table where the logger has one, else printed."""
        if not self.trainer.is_global_zero:
            return
        n = min(self.num_logged_samples, len(rollout))
        rows = [[rollout.prompt_text[i], rollout.completion_text[i], float(rollout.raw_scores[i])] for i in range(n)]
        columns = ["prompt", "completion", "score"]
        logged = False
        for logger in self.loggers:
            if hasattr(logger, "log_text"):  # e.g. WandbLogger
                logger.log_text(key="samples", columns=columns, data=rows, step=self.global_step)
                logged = True
            elif hasattr(getattr(logger, "experiment", None), "add_text"):  # TensorBoard
                table = "| prompt | completion | score |\n|---|---|---|\n" + "\n".join(
                    f"| {p} | {c} | {s:.3f} |" for p, c, s in rows
                )
                logger.experiment.add_text("samples", table, self.global_step)
                logged = True
        if not logged:
            lines = "\n".join(f"  [{s:+.3f}] {p!r} -> {c!r}" for p, c, s in rows)
            rank_zero_info(f"PPO samples at step {self.global_step}:\n{lines}")

    # --------------------------------------------------------------------------------------- validation

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        scorers: dict[str, Any] = {f"gold/{name}": GoldRewardSource(name) for name in self.gold_objectives}
        if self.reward_fn is not None:
            scorers["reward"] = self.reward_fn
        sampling = asdict(self.sampling)
        result = evaluate_policy(
            self.policy,
            self.tokenizer,
            list(batch["prompt_text"]),
            scorers=scorers,
            reference=self.ref_model,
            num_samples=self.val_num_samples,
            max_new_tokens=sampling["max_new_tokens"],
            temperature=sampling["temperature"],
            top_k=sampling["top_k"],
            top_p=sampling["top_p"],
            do_sample=sampling["do_sample"],
            batch_size=len(batch["prompt_text"]),
            seed=self.seed + batch_idx,
        )
        names = {f"score/{key}": key for key in scorers} | {"kl_to_reference": "kl_to_reference", "response_length": "response_length"}
        for metric, name in names.items():
            if metric in result.metrics:
                self.log(f"val/{name}", result.metrics[metric], batch_size=len(result.samples), sync_dist=True)

    # ------------------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ppo"] = {"kl_coef": self.kl_coef}  # the state dict leaves the frozen reference out (base)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "ppo" in checkpoint:  # a KL controller callback, if any, re-applies its own restored value
            self.kl_coef = float(checkpoint["ppo"]["kl_coef"])
