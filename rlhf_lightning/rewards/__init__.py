"""Reward sources: learned reward models, programmatic functions, gold scorers, verifiable rules, ensembles,
segment rewards.

Every sequence-level source follows :class:`RewardSource`: ``source(prompts, completions, *,
input_ids=None, attention_mask=None) -> (N,) float32``. :class:`RewardTransform` post-processes scores
(running normalisation, missing-EOS penalty, clipping) and checkpoints its statistics.
"""

from rlhf_lightning.rewards.base import FunctionRewardSource, RewardSource, import_object
from rlhf_lightning.rewards.ensemble import EnsembleRewardSource, aggregate_ensemble
from rlhf_lightning.rewards.gold import GoldRewardSource, gold_scorer
from rlhf_lightning.rewards.verifiable import VerifiableRewardSource
from rlhf_lightning.rewards.reward_model import RewardModelSource
from rlhf_lightning.rewards.implicit import ImplicitRewardSource
from rlhf_lightning.rewards.segment import FunctionSegmentRewardSource, SegmentRewards, SegmentRewardSource
from rlhf_lightning.rewards.fine_grained import (
    FineGrainedReward,
    FunctionSegmentScorer,
    GoldSegmentScorer,
    RepetitionPenalty,
    SegmentRewardBatch,
    SegmentRewardSpec,
    SegmentScorer,
    SegmentTextScorer,
)
from rlhf_lightning.rewards.transforms import RewardTransform, RunningMoments

__all__ = [
    "RewardSource",
    "FunctionRewardSource",
    "GoldRewardSource",
    "gold_scorer",
    "VerifiableRewardSource",
    "RewardModelSource",
    "EnsembleRewardSource",
    "aggregate_ensemble",
    "RewardTransform",
    "RunningMoments",
    "SegmentRewardSource",
    "SegmentRewards",
    "FunctionSegmentRewardSource",
    "import_object",
    "ImplicitRewardSource",
    "FineGrainedReward",
    "FunctionSegmentScorer",
    "GoldSegmentScorer",
    "RepetitionPenalty",
    "SegmentRewardBatch",
    "SegmentRewardSpec",
    "SegmentScorer",
    "SegmentTextScorer",
]
