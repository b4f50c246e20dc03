"""rlhf-lightning: RLHF methods (SFT, reward modeling, PPO, DPO, MODPO, Fine-Grained RLHF) as Lightning modules."""

__version__ = "0.1.0"
