"""Helpers the callbacks share: reading the module hooks (docs/CONTRACTS_INTERNAL.md, "Module hooks used
by callbacks") with a clear error, and keeping replicated weights identical across ranks."""

from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
from torch import nn

__all__ = ["get_policy", "require_attribute", "check_state_key", "params_replicated", "broadcast_tensors_"]


def get_policy(pl_module: L.LightningModule, callback: str) -> nn.Module:
    """``pl_module.policy``, the trainable model every weight callback acts on."""
    try:
        policy = pl_module.policy
    except (AttributeError, NotImplementedError):
        policy = None
    if not isinstance(policy, nn.Module):
        raise TypeError(
            f"{callback} needs the LightningModule to expose the trainable model as `policy` (an nn.Module); "
            f"{type(pl_module).__name__} does not"
        )
    return policy


def require_attribute(pl_module: L.LightningModule, name: str, callback: str, what: str) -> None:
    if not hasattr(pl_module, name):
        raise AttributeError(f"{callback} needs `{type(pl_module).__name__}.{name}` ({what})")


def check_state_key(state_key: str | None, owner: str) -> str | None:
    """A user-given checkpoint key for a callback's state (several instances of one callback may coexist)."""
    if state_key is not None and (not isinstance(state_key, str) or not state_key):
        raise ValueError(f"{owner}: state_key must be a non-empty string, got {state_key!r}")
    return state_key


def params_replicated(trainer: L.Trainer) -> bool:
    """True when every rank holds full, identical copies of the parameters (DDP / DDP-spawn).

    Sharded strategies (FSDP, ModelParallel, DeepSpeed) hold different shards per rank: the callbacks' per-rank
    arithmetic on local shards is already consistent there, and a broadcast from rank 0 would be wrong.
    """
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    return trainer.world_size > 1 and isinstance(trainer.strategy, DDPStrategy) and not isinstance(
        trainer.strategy, DeepSpeedStrategy
    )


@torch.no_grad()
def broadcast_tensors_(trainer: L.Trainer, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """In place: overwrite ``tensors`` on every rank with rank ``src``'s values (replicated strategies only).

    Tensor collectives rather than ``strategy.broadcast`` (which pickles objects): no copy through the host.
    Every rank must call this with the same tensors in the same order.
    """
    if not params_replicated(trainer) or not torch.distributed.is_initialized():
        return
    nccl = "nccl" in str(torch.distributed.get_backend())
    for tensor in tensors:
        if nccl and not tensor.is_cuda:  # e.g. an EMA offloaded to CPU: NCCL only moves CUDA tensors
            staged = tensor.to(trainer.strategy.root_device)
            torch.distributed.broadcast(staged, src=src)
            tensor.copy_(staged)
        else:
            torch.distributed.broadcast(tensor, src=src)
