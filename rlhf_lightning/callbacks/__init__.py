"""Callbacks that work across methods through the module hooks in docs/CONTRACTS_INTERNAL.md
(``policy``, ``reference``, ``kl_coef``, ``last_rollout_kl`` / ``last_rollout_size``, ``tokenizer``).

One file per callback; add a new one with one import line below and its name in ``__all__``.
"""

from rlhf_lightning.callbacks.elastic_reset import ElasticReset
from rlhf_lightning.callbacks.ema import EMA
from rlhf_lightning.callbacks.hf_export import HFExport
from rlhf_lightning.callbacks.kl_control import AdaptiveKLController, FixedKLController
from rlhf_lightning.callbacks.model_averaging import ModelAveraging

__all__ = [
    "AdaptiveKLController",
    "EMA",
    "ElasticReset",
    "FixedKLController",
    "HFExport",
    "ModelAveraging",
]
