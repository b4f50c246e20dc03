"""One LightningModule per method."""

from rlhf_lightning.modules.optim import Optimization
from rlhf_lightning.modules.sft import SFTModule

__all__ = ["Optimization", "SFTModule"]
