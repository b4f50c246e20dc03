"""One LightningModule per method."""

from rlhf_lightning.modules.optim import Optimization
from rlhf_lightning.modules.sft import SFTModule
from rlhf_lightning.modules.reward_model import RewardModelModule
from rlhf_lightning.modules.dpo import DPOModule
from rlhf_lightning.modules.modpo import MODPOModule
from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.modules.fine_grained import FineGrainedPPOModule
from rlhf_lightning.modules.policy_gradient import GRPOModule, PolicyGradientModule, ReinforcePPModule, RLOOModule

__all__ = [
    "Optimization",
    "SFTModule",
    "RewardModelModule",
    "DPOModule",
    "MODPOModule",
    "PPOModule",
    "FineGrainedPPOModule",
    "PolicyGradientModule",
    "GRPOModule",
    "RLOOModule",
    "ReinforcePPModule",
]
