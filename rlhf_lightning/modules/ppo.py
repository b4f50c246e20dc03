"""Proximal Policy Optimization for language models (Ziegler et al. 2019; Ouyang et al. 2022; Schulman et al. 2017).

One Lightning training step = one rollout: sample completions for the prompt batch (KV-cached), score
them, shape per-token rewards ``r_t = -kl_coef * kl_t (+ score on the last action)``, compute GAE
advantages, then run ``ppo_epochs`` x minibatches of clipped policy + value updates with manual
optimization. ``Trainer(max_steps=...)`` therefore counts rollouts, and the LR schedule steps once per
rollout. Every formula comes from :mod:`rlhf_lightning.losses`; rollouts from :mod:`rlhf_lightning.rollout`;
the rollout / minibatch loop / logging / validation are shared with the critic-free family in
:class:`~rlhf_lightning.modules.on_policy.OnPolicyModuleBase` (which also documents ``kl_threshold`` and
``ptx_coef``).

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
  data-parallel PPO normalises as one large batch does; so are the per-token rewards with
  ``whiten_rewards`` (rescaled without shifting the mean, as the Fine-Grained RLHF reference code does
  before GAE: shifting would turn every token's KL penalty into a bonus or a cost unrelated to it).
* The frozen reference is not stored in checkpoints (it is rebuilt from ``reference`` / ``policy``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from rlhf_lightning.generation import SamplingConfig
from rlhf_lightning.losses import (
    KL_KINDS,
    dense_reward,
    gae,
    masked_sum,
    masked_var,
    ppo_policy_loss,
    ppo_value_loss,
)
from rlhf_lightning.models import CausalLMWithValueHead, ModelSpecArg, PeftArg, build_value_model
from rlhf_lightning.modules.on_policy import OnPolicyModuleBase
from rlhf_lightning.modules.optim import Optimization
from rlhf_lightning.rewards import RewardTransform
from rlhf_lightning.rollout import PolicyForward, Rollout

__all__ = ["PPOModule"]


# The hyperparameters hold these dataclasses; allow them in `torch.load(weights_only=True)`, which is how
# `Trainer.fit(ckpt_path=...)` (and so `rlhf-lightning fit --ckpt_path`) reads a checkpoint to resume.
torch.serialization.add_safe_globals([SamplingConfig, Optimization])


class PPOModule(OnPolicyModuleBase):
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
        whiten_rewards: bool = False,
        kl_threshold: float | None = None,
        entropy_coef: float = 0.0,
        ptx_coef: float = 0.0,
        ptx_data: Any = None,
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
        padding_free: bool = True,
        max_row_tokens: int | None = None,
        on_nonfinite: str = "error",
        peft: PeftArg = None,
        critic_peft: PeftArg = None,
        disable_dropout: bool = True,
        critic_warmup_steps: int = 0,
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
                spec builds a separate critic (a causal LM trunk + zero value head) instead; a reward
                model directory (e.g. the RM export) initialises the critic from the reward model's
                trunk and score head (OpenRLHF; "Secrets of RLHF I").
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
            whiten_rewards: rescale the per-token shaped rewards to std 1 over the rollout (all ranks, mean
                kept) before GAE, as the Fine-Grained RLHF reference code does.
            kl_threshold: skip the rest of a rollout's epochs once an epoch's mean ``policy/approx_kl``
                exceeds this (``None``: never); the epochs run are logged as ``policy/epochs``.
            entropy_coef: weight of an entropy bonus (0: entropy is only logged).
            ptx_coef: weight of the SFT negative log-likelihood mixed into every update (InstructGPT's
                PPO-ptx; 0 disables). Logged as ``loss/ptx``.
            ptx_data: the SFT data of ``ptx_coef``: a ``DemonstrationDataModule`` (its batches are cycled).
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
            padding_free: run the rollout's log-prob / value / reference forwards and the update forwards
                over the episodes packed into rows without padding (the same numbers as padded batches;
                attention implementations that take no packed rows fall back to padding with a warning).
            max_row_tokens: token budget of a packed row (None: the longest episode of the batch).
            on_nonfinite: ``"error"`` (default) stops the run when a loss or gradient is NaN/inf, naming the
                step and the quantity; ``"skip"`` drops that optimizer step and warns.
            peft: LoRA adapters on the policy (a dict of ``peft.LoraConfig`` keyword arguments); only
                the adapters and the value head train, and with ``reference: null`` the reference is
                the policy with its adapters disabled (no second copy of the weights).
            critic_peft: LoRA adapters on a separate ``critic``'s trunk (its value head trains fully).
            disable_dropout: set every dropout probability of policy and critic to 0 (TRL's default):
                with dropout the first PPO ratio is not 1 (old log-probs are computed in eval mode).
            critic_warmup_steps: for the first N rollouts update only the critic (value loss), not the
                policy; needs a separate ``critic`` (with a shared trunk the value loss moves the policy).

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
        if critic_warmup_steps < 0 or (critic_warmup_steps > 0 and critic is None):
            raise ValueError(
                f"critic_warmup_steps must be >= 0 and needs a separate `critic` (got {critic_warmup_steps}, critic={critic!r}): "
                "with the value head on the policy's trunk, critic-only updates would change the policy too."
            )
        if critic_peft and critic is None:
            raise ValueError("critic_peft needs a separate `critic`; the shared-trunk value head uses the policy's `peft`.")
        objects = {"policy": policy, "reference": reference, "critic": critic}
        self.save_hyperparameters(
            ignore=["reward", "reward_transform", "ptx_data"]
            + [name for name, value in objects.items() if not isinstance(value, (str, dict, type(None)))]
        )
        lm = self._init_on_policy(
            policy=policy, tokenizer=tokenizer, reference=reference, reward=reward, sampling=sampling,
            ppo_epochs=ppo_epochs, num_minibatches=num_minibatches, minibatch_size=minibatch_size, kl_coef=kl_coef,
            kl_estimator=kl_estimator, entropy_coef=entropy_coef, max_grad_norm=max_grad_norm,
            reward_transform=reward_transform, forward_batch_size=forward_batch_size, gold_objectives=gold_objectives,
            val_num_samples=val_num_samples, log_samples_every_n_steps=log_samples_every_n_steps,
            num_logged_samples=num_logged_samples, seed=seed, optim=optim, dtype=dtype, kl_threshold=kl_threshold,
            ptx_coef=ptx_coef, ptx_data=ptx_data, padding_free=padding_free, max_row_tokens=max_row_tokens,
            peft=peft, disable_dropout=disable_dropout, gradient_checkpointing=gradient_checkpointing,
        )
        self.clip_range = clip_range
        self.value_clip_range = value_clip_range
        self.vf_coef = vf_coef
        self.gamma = gamma
        self.lam = lam
        self.whiten_advantages = whiten_advantages
        self.whiten_rewards = whiten_rewards
        self.critic_warmup_steps = critic_warmup_steps
        if critic is None:
            self.model: torch.nn.Module = CausalLMWithValueHead(lm, dtype=dtype)
        else:
            self.model = lm
            self.critic = build_value_model(
                critic, tokenizer=self.tokenizer, dtype=dtype, peft=critic_peft, no_dropout=disable_dropout,
                gradient_checkpointing=gradient_checkpointing,
            )

    # ------------------------------------------------------------------------------------------ hooks

    @property
    def policy(self) -> torch.nn.Module:
        """The trainable HF causal LM (without the value head)."""
        return self.model.pretrained_model if self.critic is None else self.model

    @property
    def value_model(self) -> torch.nn.Module:
        """The value head on the policy's trunk, or the separate critic."""
        return self.model.v_head if self.critic is None else self.critic

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

    # -------------------------------------------------------------------------------------- the update

    def minibatch_loss(
        self, out: PolicyForward, rollout: Rollout, rows: torch.Tensor, width: int, targets: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped policy loss + ``vf_coef`` x clipped value loss on one minibatch."""
        mask = rollout.mask[rows, : width - 1]
        advantages, returns = targets["advantages"], targets["returns"]
        policy_loss, policy_stats = ppo_policy_loss(
            out.logprobs, rollout.logprobs[rows, : width - 1], advantages[rows, : width - 1], mask, clip_range=self.clip_range
        )
        value_loss, value_stats = ppo_value_loss(
            out.values, rollout.values[rows, : width - 1], returns[rows, : width - 1], mask, clip_range=self.value_clip_range
        )
        stats = {
            "loss/policy": policy_loss.detach(),
            "loss/value": value_loss.detach(),
            "policy/clipfrac": policy_stats["clipfrac"],
            "policy/approx_kl": policy_stats["approx_kl"],
            "value/clipfrac": value_stats["vf_clipfrac"],
        }
        if not self.updates_policy():  # critic warm-up: the (separate) critic trains alone
            return self.vf_coef * value_loss, stats
        return policy_loss + self.vf_coef * value_loss, stats

    def updates_policy(self) -> bool:
        """False for the first ``critic_warmup_steps`` rollouts."""
        return self.global_step >= self.critic_warmup_steps

    def ppo_update(self, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, torch.Tensor]:
        """``ppo_epochs`` x minibatches of clipped policy + value steps; returns mean statistics."""
        return self.policy_update(rollout, {"advantages": advantages, "returns": returns})

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        rollout = self.collect(batch)
        if rollout.values is None or rollout.ref_logprobs is None:
            raise RuntimeError("PPO needs values and reference log-probs in the rollout")
        mask = rollout.mask
        with torch.no_grad():
            kl = self.rollout_kl(rollout)  # (N, T')
            sequence_kl = masked_sum(kl, mask, dim=1)  # (N,)
            rewards, extra = self.shape_rewards(rollout, kl)  # (N, T')
            shaped = masked_sum(rewards, mask, dim=1).mean()  # logged before whitening
            if self.whiten_rewards:
                rewards = self._whiten(rewards, mask, shift_mean=False)
            advantages, returns = gae(rewards, rollout.values, mask, gamma=self.gamma, lam=self.lam)
            if self.whiten_advantages:
                advantages = self._whiten(advantages, mask)
            residual_var = masked_var(returns - rollout.values, mask)
            explained_variance = 1.0 - residual_var / masked_var(returns, mask).clamp(min=1e-8)
        kl_coef = self.kl_coef  # the coefficient in force for this rollout
        self.last_rollout_kl = sequence_kl.mean()
        self.last_rollout_size = len(rollout)

        stats = self.ppo_update(rollout, advantages, returns)
        metrics: dict[str, Any] = {
            "reward/raw": rollout.raw_scores.mean(),
            "reward/score": rollout.scores.mean(),
            "reward/shaped": shaped,
            "kl": sequence_kl.mean(),
            "kl_coef": kl_coef,
            "value/explained_variance": explained_variance,
            "response_length": rollout.completion_lengths.float().mean(),
            "finished_fraction": rollout.finished.float().mean(),
            **stats,
            **extra,
        }
        self.finish_rollout(rollout, metrics)
