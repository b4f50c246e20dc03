"""Fine-Grained RLHF (Wu et al., 2023): PPO with rewards paid at the end of every segment, from several sources.

:class:`FineGrainedPPOModule` is :class:`~rlhf_lightning.modules.ppo.PPOModule` with one step replaced:
:meth:`~FineGrainedPPOModule.shape_rewards`. Rollouts, GAE, the clipped updates, KL control and
checkpointing are PPO's. Each :class:`~rlhf_lightning.rewards.SegmentRewardSpec` segments the completion
at its granularity, scores every segment, and its weighted score is added on the segment's last token
(:mod:`rlhf_lightning.segments` maps text offsets to the policy's tokens); every token also pays
``-kl_coef * kl_t``: ``r_t = sum_k sum_j 1[t = T_j^k] w_k R_k(x, y, j) - kl_coef * kl_t`` (paper, Sec. 2.1).

How it plugs into PPO: the module gives PPO a sequence-level reward source returning each episode's
*total* segment reward (so ``reward/raw`` keeps its meaning and validation's ``val/reward`` is the
total); that call scores the text once and keeps the per-segment result, which
:meth:`shape_rewards` then places on tokens (re-scoring only if the rollout's texts differ).

Departures from the paper, and why:

* Sources may be any scorer at any granularity (the paper has one reward model per granularity), so
  the same sources can also be run as a single sequence-level reward for comparison.
* A ``reward_transform`` (e.g. a missing-EOS penalty) acts on the episode total; its change to the
  total (``scores - raw_scores``) is paid on the last action, like PPO pays the score. A normalising
  transform therefore rescales only that correction, not the segment rewards: prefer penalties.
* ``sequence``-granularity segments are paid on the last generated token (EOS when finished), exactly
  where PPO pays: one sequence source with weight 1 reproduces PPO's shaped rewards.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlhf_lightning.losses import dense_reward_from_segments
from rlhf_lightning.models import ModelSpecArg
from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.rewards.base import _device_of
from rlhf_lightning.rewards.fine_grained import FineGrainedReward, ScoredSegments, SegmentRewardSpec
from rlhf_lightning.rollout import Rollout
from rlhf_lightning.segments import completion_to_shifted_grid

__all__ = ["FineGrainedPPOModule", "EpisodeTotalReward"]

_RESERVED = {"raw", "score", "shaped", "segments", "transform"}


class EpisodeTotalReward:
    """A sequence-level :class:`~rlhf_lightning.rewards.RewardSource` over a fine-grained reward.

    Returns each episode's total weighted segment reward and keeps the last :class:`ScoredSegments`
    (``last``) so the module places them on tokens without scoring twice.
    """

    name = "fine_grained_total"

    def __init__(self, reward: FineGrainedReward) -> None:
        self.reward = reward
        self.last: tuple[list[str], ScoredSegments] | None = None

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        scored = self.reward.score(prompts, completions)
        self.last = (list(prompts), scored)
        return scored.totals.to(_device_of(input_ids))

    def scored_for(self, prompts: Sequence[str], completions: Sequence[str]) -> ScoredSegments:
        """The scores of exactly these texts: the cached ones when they match, else freshly computed."""
        if self.last is not None and self.last[0] == list(prompts) and self.last[1].completions == list(completions):
            return self.last[1]
        self(prompts, completions)
        return self.last[1]


class FineGrainedPPOModule(PPOModule):
    def __init__(
        self,
        policy: ModelSpecArg,
        tokenizer: str | None = None,
        *,
        segment_rewards: list[SegmentRewardSpec],
        **ppo_kwargs: Any,
    ):
        """Fine-Grained RLHF: PPO with segment-level rewards from several sources.

        Args:
            policy: the policy to train (as for ``PPOModule``).
            tokenizer: tokenizer name or directory (as for ``PPOModule``); segment ends are mapped to
                this tokenizer's tokens.
            segment_rewards: the reward sources, each a ``SegmentRewardSpec`` (``source``,
                ``granularity`` in ``sentence`` / ``sub_sentence`` / ``sequence`` / ``native``,
                ``weight``, ``name``, ``normalize``, ``segmenter_kwargs``); in YAML a list of mappings
                whose ``source`` has ``class_path``/``init_args``. Names must be unique; each is logged
                as ``reward/<name>`` (mean per-episode sum of its weighted rewards).
            **ppo_kwargs: every other ``PPOModule`` argument (``reference``, ``critic``, ``sampling``,
                ``ppo_epochs``, ``kl_coef``, ``optim``, ...), except ``reward``, which this module builds.

        Logged per rollout, besides PPO's metrics: ``reward/<name>`` per source and
        ``reward/segments`` (mean number of rewarded segments per episode); ``reward/raw`` is the
        mean per-episode total of all segment rewards.
        """
        if ppo_kwargs.get("reward") is not None:
            raise ValueError("FineGrainedPPOModule takes `segment_rewards` instead of `reward`.")
        ppo_kwargs.pop("reward", None)
        fine_grained = FineGrainedReward(segment_rewards)
        clashes = _RESERVED.intersection(fine_grained.names)
        if clashes:
            raise ValueError(f"Segment reward names {sorted(clashes)} clash with PPO's reward/* metrics; rename them.")
        super().__init__(policy, tokenizer, reward=None, **ppo_kwargs)
        # Store the arguments again without the segment reward specs (they hold scorer objects: rebuilt from
        # the config, never pickled into checkpoints, which must load with torch.load(weights_only=True)).
        objects = {"policy": policy, "reference": ppo_kwargs.get("reference"), "critic": ppo_kwargs.get("critic")}
        self.save_hyperparameters(
            ignore=["segment_rewards", "reward", "reward_transform"]
            + [name for name, value in objects.items() if not isinstance(value, (str, dict, type(None)))]
        )
        self.fine_grained = fine_grained
        self.reward_fn = EpisodeTotalReward(fine_grained)

    def shape_rewards(self, rollout: Rollout, kl: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Segment rewards on their last tokens plus ``-kl_coef * kl`` on every token.

        Args:
            rollout: the scored rollout (its ``completion_text`` is what the sources scored).
            kl: ``(N, T')`` per-token KL on the shifted grid (0 off-mask).

        Returns:
            ``(rewards (N, T'), metrics)`` with ``reward/<name>`` per source and ``reward/segments``.
        """
        reward_fn = self.reward_fn
        scored = (
            reward_fn.scored_for(rollout.prompt_text, rollout.completion_text)
            if isinstance(reward_fn, EpisodeTotalReward)
            else self.fine_grained.score(rollout.prompt_text, rollout.completion_text)
        )
        p = rollout.prompt_length
        completion_ids = [
            row[m.bool()].tolist() for row, m in zip(rollout.input_ids[:, p:], rollout.completion_mask[:, p:])
        ]
        placed = self.fine_grained.place(scored, completion_ids, self.tokenizer)
        device = kl.device
        rewards = placed.rewards.to(device)  # (N, S)
        positions = completion_to_shifted_grid(placed.positions.to(device), p)  # (N, S) columns of (N, T')
        segment_mask = placed.mask.to(device)
        # A reward transform changes the episode total (e.g. a missing-EOS penalty): pay the change on the
        # last action, where PPO pays its score.
        correction = (rollout.scores - rollout.raw_scores).to(device=device, dtype=rewards.dtype)  # (N,)
        if bool(correction.ne(0).any()):
            rewards = torch.cat([rewards, correction[:, None]], dim=1)
            positions = torch.cat([positions, rollout.last_action_index()[:, None].to(device)], dim=1)
            segment_mask = torch.cat([segment_mask, rollout.mask.bool().any(1, keepdim=True)], dim=1)
        shaped = dense_reward_from_segments(
            kl, rewards, positions, rollout.mask, kl_coef=self.kl_coef, segment_mask=segment_mask
        )
        metrics = {f"reward/{name}": float(value.mean()) for name, value in placed.per_source.items()}
        metrics["reward/segments"] = float(placed.mask.sum(1).float().mean())
        return shaped, metrics
