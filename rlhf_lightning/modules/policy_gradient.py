"""The critic-free family: GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++ and ReMax, in one module.

:class:`PolicyGradientModule` is PPO without a value function: one Lightning training step = one rollout
of ``G = sampling.num_samples_per_prompt`` completions per prompt (the shared rollout of
:mod:`rlhf_lightning.rollout`), whose advantages come from the scores alone, then ``ppo_epochs`` x
minibatches of clipped policy-gradient steps (:func:`~rlhf_lightning.losses.policy_gradient_loss`). The
rollout, minibatch loop, logging, validation and checkpointing are PPO's
(:class:`~rlhf_lightning.modules.on_policy.OnPolicyModuleBase`). ``advantage`` picks the estimator:

================  =====================================================================  ================
``advantage``     advantage of completion i (token t)                                    paper
================  =====================================================================  ================
``grpo``          ``(s_i - mean_g s) / (std_g s + eps)`` per group, every token           Shao et al. 2024
``dr_grpo``       ``s_i - mean_g s`` (no std: no question-difficulty bias)               Liu et al. 2025
``rloo``          ``s_i - mean_{j != i} s_j`` (leave-one-out)                            Ahmadian et al. 2024
``reinforce_pp``  return-to-go of ``r_t = -beta kl_t + s 1[t = last]``, normalised over  Hu 2025
                  the global batch (all ranks)
``remax``         return-to-go of ``r_t = -beta kl_t + (s - s_greedy) 1[t = last]``      Li et al. 2024
================  =====================================================================  ================

DAPO (Yu et al. 2025) is ``grpo`` with ``clip_range_high > clip_range_low``, ``loss_aggregation:
token_mean`` and ``dynamic_sampling: true``; GSPO (Zheng et al. 2025) is ``ratio_level: sequence``.
:class:`GRPOModule`, :class:`RLOOModule` and :class:`ReinforcePPModule` are this module with another
default ``advantage``.

The KL to the reference goes either in the reward (``kl_placement: reward``: the ``kl_estimator``
estimate, k1 by default, times ``kl_coef``: subtracted per token for ``reinforce_pp``/``remax``, summed
per sequence and subtracted from the score before the group baseline for ``grpo``/``dr_grpo``/``rloo``,
as TRL's RLOO does) or in the loss (``kl_placement: loss``: GRPO's k3 term, eq. 4). Either way ``kl``
(logged, read by the KL controllers) is the ``kl_estimator`` sequence KL of the rollout and ``kl_coef`` is
the coefficient a controller sets.

Where this departs from the papers, and why:

* Group sampling draws the G completions of every prompt in one batched ``generate``. By default each
  prompt is repeated G times (``repeat_interleave``); ``sampling.share_prompt_prefill: true`` (set in the
  shipped configs) encodes each prompt once and repeats its KV cache G times instead — the same samples
  (tested), B rows of prompt prefill instead of B x G.
* DAPO's dynamic sampling refills dropped groups with groups of *new* prompts drawn from a second
  iterator over the training prompts (its own shuffled order), up to ``max_refill_rounds`` extra
  rollouts; if still short, all-equal groups fill the batch back to its size (they carry zero advantage,
  only the KL term), so every rank runs the same number of steps. Runs with it are not bit-exactly
  resumable (the second iterator's position is not checkpointed).
* ReMax's greedy completion is scored with the reward transform but does not update its running
  statistics. The paper's ReMax has no KL penalty; here ``kl_coef`` (0 allowed) applies as for REINFORCE++.
* ``rloo`` defaults to ``loss_aggregation: token_sum_norm`` (RLOO is REINFORCE on the summed sequence
  log-prob; dividing by a constant only scales the learning rate), ``grpo`` to ``sequence_mean`` (the
  paper's 1/|o_i|), ``dr_grpo`` to ``token_sum_norm`` with the generation budget ``max_new_tokens``,
  ``reinforce_pp``/``remax`` to ``token_mean``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from rlhf_lightning.generation import SamplingConfig
from rlhf_lightning.losses import (
    KL_KINDS,
    LOSS_AGGREGATIONS,
    RATIO_LEVELS,
    group_advantages,
    masked_sum,
    policy_gradient_loss,
    reinforce_pp_advantages,
    remax_advantages,
)
from rlhf_lightning.models import ModelSpecArg, PeftArg
from rlhf_lightning.modules.on_policy import OnPolicyModuleBase
from rlhf_lightning.modules.optim import Optimization
from rlhf_lightning.rewards import RewardTransform
from rlhf_lightning.rollout import PolicyForward, Rollout, concat_rollouts, greedy_scores

__all__ = ["PolicyGradientModule", "GRPOModule", "RLOOModule", "ReinforcePPModule", "ADVANTAGES"]

# advantage -> (group baseline, group scale) for the group estimators; None for the return-based ones.
ADVANTAGES: dict[str, tuple[str, str] | None] = {
    "grpo": ("mean", "std"),
    "dr_grpo": ("mean", "none"),
    "rloo": ("leave_one_out", "none"),
    "reinforce_pp": None,
    "remax": None,
}
_DEFAULT_AGGREGATION = {
    "grpo": "sequence_mean",
    "dr_grpo": "token_sum_norm",
    "rloo": "token_sum_norm",
    "reinforce_pp": "token_mean",
    "remax": "token_mean",
}
_DEFAULT_KL_PLACEMENT = {"grpo": "loss", "dr_grpo": "loss", "rloo": "reward", "reinforce_pp": "reward", "remax": "reward"}

torch.serialization.add_safe_globals([SamplingConfig, Optimization])


class PolicyGradientModule(OnPolicyModuleBase):
    default_advantage = "grpo"
    checkpoint_key = "policy_gradient"
    kl_coef: float

    def __init__(
        self,
        policy: ModelSpecArg,
        tokenizer: str | None = None,
        *,
        reference: ModelSpecArg | None = None,
        reward: Callable | dict[str, Callable] | None = None,
        advantage: str | None = None,
        sampling: SamplingConfig | None = None,
        ppo_epochs: int = 1,
        num_minibatches: int = 1,
        minibatch_size: int | None = None,
        clip_range_low: float = 0.2,
        clip_range_high: float | None = None,
        ratio_level: str = "token",
        loss_aggregation: str | None = None,
        kl_coef: float = 0.04,
        kl_placement: str | None = None,
        kl_estimator: str = "k1",
        gamma: float = 1.0,
        group_eps: float = 1e-6,
        dynamic_sampling: bool = False,
        max_refill_rounds: int = 2,
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
        disable_dropout: bool = True,
    ):
        """Fine-tune a causal LM against a reward with a critic-free policy gradient (no value model).

        Args:
            policy: the policy to train: Hub name, local directory (e.g. the SFT export), or an inline
                transformers config dict.
            tokenizer: tokenizer name or directory; defaults to ``policy`` when that is a path or name.
            reference: the frozen reference of the KL term; ``None`` uses a copy of the initial policy.
            reward: any ``RewardSource`` (learned RM, gold, function, verifiable rule), or a dict of
                them (averaged).
            advantage: ``grpo``, ``dr_grpo``, ``rloo``, ``reinforce_pp`` or ``remax`` (module docstring);
                ``None`` takes the class default (``grpo`` here, ``rloo`` for ``RLOOModule``, ...).
            sampling: rollout sampling; ``num_samples_per_prompt`` is the group size G (>= 2 for the
                group estimators, 1 is fine for ``reinforce_pp`` / ``remax``).
            ppo_epochs: passes over each rollout (1: the on-policy setting of the papers, ratio = 1).
            num_minibatches: optimizer steps per pass (ignored when ``minibatch_size`` is set).
            minibatch_size: episodes per minibatch.
            clip_range_low / clip_range_high: ratio clip ``[1 - low, 1 + high]``; ``high`` > ``low`` is
                DAPO's clip-higher (0.2 / 0.28); ``None`` is symmetric.
            ratio_level: ``token`` (PPO / GRPO) or ``sequence`` (GSPO's length-normalised sequence ratio).
            loss_aggregation: ``token_mean`` (DAPO), ``sequence_mean`` (GRPO), ``token_sum_norm``
                (Dr. GRPO: divided by ``max_new_tokens``); ``None``: the advantage's default.
            kl_coef: KL coefficient (a KL controller callback overrides it); 0 disables the KL term.
            kl_placement: ``reward`` or ``loss`` (k3 in the loss, GRPO); ``None``: ``loss`` for grpo /
                dr_grpo, ``reward`` for the others.
            kl_estimator: per-token estimator of the logged KL and of the in-reward penalty.
            gamma: discount of the return-to-go (``reinforce_pp`` / ``remax``).
            group_eps: added to the group std (``grpo``).
            dynamic_sampling: DAPO's dynamic sampling: drop groups whose scores are all equal and refill
                with new prompts' groups (group estimators only).
            max_refill_rounds: extra rollouts at most per step for ``dynamic_sampling``.
            kl_threshold: skip the rest of a rollout's epochs once an epoch's mean ``policy/approx_kl``
                exceeds this (``None``: never).
            entropy_coef: weight of an entropy bonus (0: entropy is only logged).
            ptx_coef: weight of an SFT NLL mixed into every update (InstructGPT's PPO-ptx); 0 disables.
            ptx_data: the SFT ``DemonstrationDataModule`` of ``ptx_coef``.
            max_grad_norm: clip the gradient norm of every step; ``None`` disables.
            reward_transform: post-processing of scores (running normalisation, missing-EOS penalty, clip).
            forward_batch_size: rows per no-grad forward pass while collecting the rollout.
            gold_objectives: gold objectives of the embedded world scored in validation.
            val_num_samples: completions per validation prompt.
            log_samples_every_n_steps: print / log a few rollout samples every this many rollouts (0: never).
            num_logged_samples: samples shown each time.
            seed: seed of rollout sampling and minibatch order (combined with rank and step).
            optim: optimizer and learning-rate schedule; one schedule step per rollout.
            dtype: parameter dtype of policy and reference.
            gradient_checkpointing: recompute activations in backward to save memory.
            padding_free: run the rollout's log-prob / reference forwards and the update forwards
                over the episodes packed into rows without padding (the same numbers as padded batches;
                attention implementations that take no packed rows fall back to padding with a warning).
            max_row_tokens: token budget of a packed row (None: the longest episode of the batch).
            on_nonfinite: ``"error"`` (default) stops the run when a loss or gradient is NaN/inf, naming the
                step and the quantity; ``"skip"`` drops that optimizer step and warns.
            peft: LoRA adapters on the policy (a dict of ``peft.LoraConfig`` keyword arguments); with
                ``reference: null`` the reference is the policy with its adapters disabled.
            disable_dropout: set every dropout probability of the policy to 0 (TRL's default).

        Logged per rollout: ``reward/raw``, ``reward/score``, ``kl``, ``kl_coef``, ``advantage/std``,
        ``groups/informative_fraction`` (groups whose scores are not all equal; group estimators),
        ``entropy``, ``policy/clipfrac``, ``policy/approx_kl``, ``loss/policy``, ``loss/kl`` (in-loss KL),
        ``response_length``, ``finished_fraction``. Validation: as PPO.
        """
        super().__init__()
        self.on_nonfinite = on_nonfinite
        advantage = advantage or self.default_advantage
        if advantage not in ADVANTAGES:
            raise ValueError(f"advantage must be one of {sorted(ADVANTAGES)}, got {advantage!r}")
        loss_aggregation = loss_aggregation or _DEFAULT_AGGREGATION[advantage]
        kl_placement = kl_placement or _DEFAULT_KL_PLACEMENT[advantage]
        if kl_estimator not in KL_KINDS:
            raise ValueError(f"kl_estimator must be one of {KL_KINDS}, got {kl_estimator!r}")
        if loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_aggregation must be one of {LOSS_AGGREGATIONS}, got {loss_aggregation!r}")
        if ratio_level not in RATIO_LEVELS:
            raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
        if kl_placement not in ("reward", "loss"):
            raise ValueError(f"kl_placement must be 'reward' or 'loss', got {kl_placement!r}")
        if ppo_epochs < 1:
            raise ValueError(f"ppo_epochs must be >= 1, got {ppo_epochs}")
        if num_minibatches < 1 or (minibatch_size is not None and minibatch_size < 1):
            raise ValueError("num_minibatches and minibatch_size must be >= 1")
        if clip_range_low <= 0 or (clip_range_high is not None and clip_range_high <= 0):
            raise ValueError("clip_range_low and clip_range_high must be > 0 (clip_range_high may be None)")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if kl_coef < 0 or entropy_coef < 0:
            raise ValueError("kl_coef and entropy_coef must be >= 0")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        sampling = sampling if isinstance(sampling, SamplingConfig) else SamplingConfig(**(sampling or {}))
        group = ADVANTAGES[advantage]
        if group is not None and sampling.num_samples_per_prompt < 2:
            raise ValueError(
                f"advantage {advantage!r} compares completions of the same prompt: set "
                f"sampling.num_samples_per_prompt >= 2 (got {sampling.num_samples_per_prompt})"
            )
        if dynamic_sampling and group is None:
            raise ValueError(f"dynamic_sampling needs a group advantage (grpo, dr_grpo, rloo), not {advantage!r}")
        if max_refill_rounds < 0:
            raise ValueError(f"max_refill_rounds must be >= 0, got {max_refill_rounds}")
        objects = {"policy": policy, "reference": reference}
        self.save_hyperparameters(
            ignore=["reward", "reward_transform", "ptx_data"]
            + [name for name, value in objects.items() if not isinstance(value, (str, dict, type(None)))]
        )
        self.model = self._init_on_policy(
            policy=policy, tokenizer=tokenizer, reference=reference, reward=reward, sampling=sampling,
            ppo_epochs=ppo_epochs, num_minibatches=num_minibatches, minibatch_size=minibatch_size, kl_coef=kl_coef,
            kl_estimator=kl_estimator, entropy_coef=entropy_coef, max_grad_norm=max_grad_norm,
            reward_transform=reward_transform, forward_batch_size=forward_batch_size, gold_objectives=gold_objectives,
            val_num_samples=val_num_samples, log_samples_every_n_steps=log_samples_every_n_steps,
            num_logged_samples=num_logged_samples, seed=seed, optim=optim, dtype=dtype, kl_threshold=kl_threshold,
            ptx_coef=ptx_coef, ptx_data=ptx_data, padding_free=padding_free, max_row_tokens=max_row_tokens,
            peft=peft, disable_dropout=disable_dropout, gradient_checkpointing=gradient_checkpointing,
        )
        self.advantage = advantage
        self.clip_range_low = clip_range_low
        self.clip_range_high = clip_range_high
        self.ratio_level = ratio_level
        self.loss_aggregation = loss_aggregation
        self.kl_placement = kl_placement
        self.gamma = gamma
        self.group_eps = group_eps
        self.dynamic_sampling = dynamic_sampling
        self.max_refill_rounds = max_refill_rounds
        self._refill_batches = None

    # ------------------------------------------------------------------------------------------ hooks

    @property
    def policy(self) -> torch.nn.Module:
        """The trainable HF causal LM (there is no value head)."""
        return self.model

    @property
    def group_size(self) -> int:
        return self.sampling.num_samples_per_prompt

    # ------------------------------------------------------------------------------ dynamic sampling

    def _next_refill_batch(self) -> Mapping[str, Any]:
        if self._refill_batches is None:
            self._refill_batches = self._cycle(self.trainer.train_dataloader)
        batch = next(self._refill_batches)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @staticmethod
    def _cycle(loader):
        while True:
            yield from loader

    def _informative(self, rollout: Rollout) -> torch.Tensor:
        """``(P,)`` bool: groups whose scores are not all equal."""
        grouped = rollout.scores.view(-1, self.group_size)
        return (grouped != grouped[:, :1]).any(dim=1)

    def _group_rows(self, groups: torch.Tensor) -> torch.Tensor:
        return (groups.unsqueeze(1) * self.group_size + torch.arange(self.group_size, device=groups.device)).reshape(-1)

    def dynamically_sample(self, rollout: Rollout) -> Rollout:
        """DAPO's dynamic sampling: keep groups with differing scores, refill from new prompts, keep the size."""
        num_groups = len(rollout) // self.group_size
        keep = self._informative(rollout)
        kept = [rollout.select(self._group_rows(keep.nonzero().squeeze(1)).cpu())]
        have = int(keep.sum())
        for round_ in range(self.max_refill_rounds):
            if have >= num_groups:
                break
            extra = self.collect(self._next_refill_batch(), seed_offset=round_ + 1)
            extra_keep = self._informative(extra).nonzero().squeeze(1)[: num_groups - have]
            kept.append(extra.select(self._group_rows(extra_keep).cpu()))
            have += len(extra_keep)
        if have < num_groups:  # fill back with all-equal groups: zero advantage, same step count on every rank
            filler = (~keep).nonzero().squeeze(1)[: num_groups - have]
            kept.append(rollout.select(self._group_rows(filler).cpu()))
        parts = [part for part in kept if len(part)]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return concat_rollouts(parts, pad_id) if len(parts) > 1 else parts[0]

    # ------------------------------------------------------------------------------------- advantages

    def compute_advantages(self, rollout: Rollout, kl: torch.Tensor) -> torch.Tensor:
        """``(N, T')`` advantages of a rollout (0 off-mask), per ``advantage`` (module docstring)."""
        mask = rollout.mask
        kl_in_reward = self.kl_coef if self.kl_placement == "reward" else 0.0
        group = ADVANTAGES[self.advantage]
        if group is not None:
            scores = rollout.scores - kl_in_reward * masked_sum(kl, mask, dim=1)
            advantages = group_advantages(scores, self.group_size, baseline=group[0], scale=group[1], eps=self.group_eps)
            return advantages.unsqueeze(1) * mask
        scores = rollout.scores
        if self.advantage == "remax":
            scores = remax_advantages(scores, self._greedy_baseline.to(scores.device), self.group_size)
        normalize = self.advantage == "reinforce_pp"
        mean = var = None
        if normalize:
            # The returns' global statistics: the returns are computed once here, then whitened with them.
            _, returns = reinforce_pp_advantages(scores, kl, mask, kl_coef=kl_in_reward, gamma=self.gamma, normalize=False)
            mean, var = self.global_mean_var(returns, mask)
        advantages, _ = reinforce_pp_advantages(
            scores, kl, mask, kl_coef=kl_in_reward, gamma=self.gamma, normalize=normalize, mean=mean, var=var
        )
        return advantages

    # -------------------------------------------------------------------------------------- the update

    def minibatch_loss(
        self, out: PolicyForward, rollout: Rollout, rows: torch.Tensor, width: int, targets: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The clipped policy-gradient loss (plus k3 KL with ``kl_placement: loss``) on one minibatch."""
        columns = slice(None, width - 1)
        mask = rollout.mask[rows, columns]
        kl_in_loss = self.kl_placement == "loss" and self.kl_coef > 0
        loss, stats = policy_gradient_loss(
            out.logprobs,
            rollout.logprobs[rows, columns],
            targets["advantages"][rows, columns],
            mask,
            clip_range_low=self.clip_range_low,
            clip_range_high=self.clip_range_high,
            ratio_level=self.ratio_level,
            loss_aggregation=self.loss_aggregation,
            token_norm=self.sampling.max_new_tokens,
            ref_logprobs=rollout.ref_logprobs[rows, columns] if kl_in_loss else None,
            kl_coef=self.kl_coef if kl_in_loss else 0.0,
        )
        result = {
            "loss/policy": loss.detach(),
            "policy/clipfrac": stats["clipfrac"],
            "policy/approx_kl": stats["approx_kl"],
        }
        if "kl_loss" in stats:
            result["loss/kl"] = stats["kl_loss"]
        return loss, result

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        if self.advantage == "remax":
            self._greedy_baseline = greedy_scores(
                self.model, self.tokenizer, batch, reward_fn=self.reward_fn, sampling=self.sampling,
                reward_transform=self.reward_transform,
            )
        rollout = self.collect(batch)
        if rollout.ref_logprobs is None:
            raise RuntimeError(f"{type(self).__name__} needs reference log-probs in the rollout")
        extra: dict[str, Any] = {}
        if ADVANTAGES[self.advantage] is not None:
            extra["groups/informative_fraction"] = self._informative(rollout).float().mean()
            if self.dynamic_sampling:
                rollout = self.dynamically_sample(rollout)
                extra["groups/informative_fraction_after_refill"] = self._informative(rollout).float().mean()
        mask = rollout.mask
        with torch.no_grad():
            kl = self.rollout_kl(rollout)  # (N, T')
            sequence_kl = masked_sum(kl, mask, dim=1)  # (N,)
            advantages = self.compute_advantages(rollout, kl)  # (N, T')
        kl_coef = self.kl_coef
        self.last_rollout_kl = sequence_kl.mean()
        self.last_rollout_size = len(rollout)

        stats = self.policy_update(rollout, {"advantages": advantages})
        valid = mask.bool()
        metrics: dict[str, Any] = {
            "reward/raw": rollout.raw_scores.mean(),
            "reward/score": rollout.scores.mean(),
            "kl": sequence_kl.mean(),
            "kl_coef": kl_coef,
            "advantage/std": advantages[valid].std() if valid.sum() > 1 else torch.zeros(()),
            "response_length": rollout.completion_lengths.float().mean(),
            "finished_fraction": rollout.finished.float().mean(),
            **stats,
            **extra,
        }
        if self.advantage == "remax":
            metrics["reward/greedy"] = self._greedy_baseline.mean()
        self.finish_rollout(rollout, metrics)


class GRPOModule(PolicyGradientModule):
    """:class:`PolicyGradientModule` with ``advantage: grpo`` by default (GRPO, Dr. GRPO, DAPO, GSPO by config)."""

    default_advantage = "grpo"


class RLOOModule(PolicyGradientModule):
    """:class:`PolicyGradientModule` with ``advantage: rloo`` by default (REINFORCE leave-one-out)."""

    default_advantage = "rloo"


class ReinforcePPModule(PolicyGradientModule):
    """:class:`PolicyGradientModule` with ``advantage: reinforce_pp`` by default (REINFORCE++; ``remax`` by config)."""

    default_advantage = "reinforce_pp"
