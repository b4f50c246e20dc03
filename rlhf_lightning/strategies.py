"""Scaling by strategy: the FSDP2 sharding plan that every module applies in ``configure_model``, the
``FSDP2Strategy`` that ``configs/strategy/fsdp2.yaml`` selects, and full-state-dict gathering for export.

The strategy is chosen in YAML only (``--config configs/strategy/<name>.yaml``). ``ddp``, ``fsdp`` (FSDP1)
and ``deepspeed`` are Lightning's own and need nothing from the modules; ``ModelParallelStrategy``
(FSDP2, ``fully_shard``) asks the module to shard itself, which :func:`apply_fsdp2` does.

How a model is cut into FSDP2 units (:func:`shard_model`), and why:

* Each transformer block is one unit (the classes HF lists in ``_no_split_modules``): one all-gather
  per block in forward, one reduce-scatter per block in backward, and at most one gathered block (plus
  the prefetched next one) in memory at a time.
* Every other module that owns parameters directly (embeddings, final norm, LM / score / value heads)
  is a unit of its own; modules that share a parameter (tied embeddings) form one grouped unit.
  torchtitan leaves these to the root unit, which works when every call enters through the root's
  ``forward``. Ours do not: :func:`~rlhf_lightning.models.reward_model_scores` runs the backbone and
  the score head itself, ``CausalLMWithValueHead.values`` runs the trunk and ``v_head``, and rollouts
  call ``generate`` on the LM inside the value-head wrapper. With leaf units a parameter is gathered
  by the forward of the module that uses it, whichever path reaches it.
* The model itself is sharded last, as the root (it owns no parameters by then): it is lazily
  initialised right away, so whichever unit runs first, all units share one root and one
  post-backward pass.
* Generation gathers once, not per token: ``generate`` of every sharded LM is wrapped so that its
  units are all-gathered once before decoding and resharded after it (:func:`gathered_parameters`).
  Per-token gathering would cost one all-gather per block per token, and would deadlock when ranks
  stop decoding at different lengths, since each gather is a collective that all ranks must join.
* Frozen models (reference, frozen reward model) are sharded like the policy by default
  (``frozen_models="shard"``): a full copy per rank of a policy-sized reference is what makes ZeRO-3 /
  FSDP runs run out of memory. ``"replicate"`` keeps a full copy on each rank instead: no all-gather
  per forward, the better trade when the frozen model is small next to the policy. Frozen models
  never enter an optimizer and need no gradient synchronisation, so replicating them is correct
  without any wrapper.

A reward model held by a reward source (``RewardModelSource``) is not a child module of the
LightningModule and stays replicated: a sharded one would turn every scoring call into collectives
that all ranks must make in lockstep, which a reward function scoring a per-rank number of texts
cannot promise.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from rlhf_lightning.models import resolve_dtype

__all__ = [
    "FSDP2Plan",
    "FSDP2Strategy",
    "apply_fsdp2",
    "shard_model",
    "transformer_blocks",
    "gathered_parameters",
    "is_fsdp2_sharded",
    "full_state_dict",
    "export_state_dict",
    "clip_gradient_norm",
    "set_deepspeed_gradient_clipping",
]

FrozenModels = Literal["shard", "replicate"]


@dataclass(frozen=True)
class FSDP2Plan:
    """How :func:`apply_fsdp2` shards a module's models (see the module docstring for the why).

    Args:
        frozen_models: ``"shard"`` frozen models (reference, ...) like the policy, or ``"replicate"``
            them (a full copy per rank, no communication).
        reshard_after_forward: free gathered parameters after forward and gather again in backward
            (ZeRO-3 memory); ``False`` keeps them from forward to backward (ZeRO-2-like: less
            communication, more memory). Frozen models always reshard: they have no backward.
        param_dtype: dtype parameters are all-gathered and computed in (``"bfloat16"`` for mixed
            precision); ``None`` computes in the parameters' own dtype.
        reduce_dtype: dtype gradients are reduce-scattered in; ``None`` follows ``param_dtype``.
        activation_checkpointing: recompute the trainable models' block activations in backward
            (HF gradient checkpointing, non-reentrant, which composes with FSDP2's hooks).
        cpu_offload: keep sharded parameters, gradients and optimizer states in CPU memory (the
            optimizer step then runs on CPU).
    """

    frozen_models: FrozenModels = "shard"
    reshard_after_forward: bool = True
    param_dtype: str | None = None
    reduce_dtype: str | None = None
    activation_checkpointing: bool = False
    cpu_offload: bool = False

    def __post_init__(self) -> None:
        if self.frozen_models not in ("shard", "replicate"):
            raise ValueError(f"frozen_models must be 'shard' or 'replicate', got {self.frozen_models!r}")
        resolve_dtype(self.param_dtype)  # raises on an unknown dtype name
        resolve_dtype(self.reduce_dtype)

    def mp_policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=resolve_dtype(self.param_dtype), reduce_dtype=resolve_dtype(self.reduce_dtype))

    def offload_policy(self):
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

        return CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy()


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` as pure FSDP2 over all ranks, carrying the modules' sharding plan.

    Lightning's ``ModelParallelStrategy`` defaults to tensor parallelism within a node
    (``tensor_parallel_size="auto"``); the modules here implement FSDP only, so the whole world is one
    data-parallel mesh dimension, whatever ``trainer.devices`` is.

    Args:
        frozen_models: see :class:`FSDP2Plan`.
        reshard_after_forward: see :class:`FSDP2Plan`.
        param_dtype: see :class:`FSDP2Plan`; with ``"bfloat16"`` keep ``trainer.precision`` at
            ``32-true`` (the policy already casts; autocast on top would only add casts).
        reduce_dtype: see :class:`FSDP2Plan`.
        activation_checkpointing: see :class:`FSDP2Plan`.
        cpu_offload: see :class:`FSDP2Plan`.
        save_distributed_checkpoint: each rank writes its shard (a checkpoint folder) instead of
            gathering everything into one file on rank 0.
        process_group_backend: ``None`` picks nccl on GPUs, gloo on CPU.
        timeout: collective timeout.
    """

    def __init__(
        self,
        frozen_models: FrozenModels = "shard",
        reshard_after_forward: bool = True,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        activation_checkpointing: bool = False,
        cpu_offload: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.plan = FSDP2Plan(
            frozen_models=frozen_models,
            reshard_after_forward=reshard_after_forward,
            param_dtype=param_dtype,
            reduce_dtype=reduce_dtype,
            activation_checkpointing=activation_checkpointing,
            cpu_offload=cpu_offload,
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            # The parent would turn "auto" into the number of nodes (tensor parallel inside a node).
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


# ------------------------------------------------------------------------------------------------ plan


def is_fsdp2_sharded(module: nn.Module) -> bool:
    """True when FSDP2 manages ``module`` or any module inside it."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``, outermost first, each to become one FSDP unit.

    Blocks are the classes a Hugging Face model lists in ``_no_split_modules`` (the same list
    ``accelerate`` uses to place whole blocks on one device). A model without that list falls back to
    the modules of its longest ``nn.ModuleList``.
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    if blocks or names:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return list(max(lists, key=len)) if lists else []


def _leaf_units(model: nn.Module, blocks: Sequence[nn.Module]) -> list[list[nn.Module]]:
    """Modules outside ``blocks`` (and other than ``model``) that own parameters directly, grouped so
    that modules sharing a parameter (tied weights) land in one group."""
    in_blocks = {id(m) for block in blocks for m in block.modules()}
    owners: dict[int, list[nn.Module]] = {}
    order: list[nn.Module] = []
    for module in model.modules():
        if module is model or id(module) in in_blocks:
            continue
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        order.append(module)
        for param in own:
            owners.setdefault(id(param), []).append(module)
    # Union-find over modules linked by a shared parameter.
    parent = {id(m): id(m) for m in order}

    def find(key: int) -> int:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for modules in owners.values():
        for other in modules[1:]:
            parent[find(id(other))] = find(id(modules[0]))
    groups: dict[int, list[nn.Module]] = {}
    for module in order:
        groups.setdefault(find(id(module)), []).append(module)
    return list(groups.values())


def _generative_submodules(model: nn.Module) -> list[nn.Module]:
    from transformers import GenerationMixin

    return [m for m in model.modules() if isinstance(m, GenerationMixin)]


def _fsdp_units(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_parameters(module: nn.Module, *, reshard_after_forward: bool = True) -> Iterator[None]:
    """All-gather every FSDP2 unit inside ``module`` once, keep them gathered across forwards, and
    reshard on exit (to ``reshard_after_forward``). A collective: every rank must enter it.

    Use it around many no-grad forwards of the same weights (token-by-token decoding); a no-op for a
    module without FSDP2 units.
    """
    units = _fsdp_units(module)
    handles = [unit.unshard(async_op=True) for unit in units]
    for handle in handles:
        if handle is not None:
            handle.wait()
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(reshard_after_forward, recurse=False)
            unit.reshard()


def _gather_once_for_generate(lm: nn.Module, *, reshard_after_forward: bool) -> None:
    """Make ``lm.generate`` run inside :func:`gathered_parameters` (an instance attribute shadowing the
    class method, as ``torch.distributed.fsdp.register_fsdp_forward_method`` patches methods)."""
    if getattr(lm, "_rlhf_gathered_generate", False):
        return
    original = lm.generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any):
        with gathered_parameters(lm, reshard_after_forward=reshard_after_forward):
            return original(*args, **kwargs)

    lm.generate = generate
    lm._rlhf_gathered_generate = True


def _broadcast_from_rank_zero(model: nn.Module, device: torch.device) -> None:
    """Give every rank rank 0's parameters and buffers, as DDP does when it wraps a model: FSDP2 shards
    what each rank holds, so ranks that drew different random initialisations would otherwise train a
    model none of them holds. Tensors travel through ``device`` (nccl cannot send CPU tensors)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            staged = tensor.data.to(device)
            dist.broadcast(staged, src=0)
            if staged is not tensor.data:
                tensor.data.copy_(staged)


def shard_model(model: nn.Module, mesh, plan: FSDP2Plan, *, trainable: bool) -> nn.Module:
    """Apply ``fully_shard`` to ``model``: blocks, then parameter-owning leaves (tied ones grouped), then
    ``model`` as the root; wrap the ``generate`` of its LMs to gather once per call. Returns ``model``."""
    from torch.distributed.fsdp import fully_shard

    reshard = plan.reshard_after_forward if trainable else True
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard, mp_policy=plan.mp_policy(), offload_policy=plan.offload_policy())
    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block, **kwargs)
    for group in _leaf_units(model, blocks):
        fully_shard(group if len(group) > 1 else group[0], **kwargs)
    fully_shard(model, **kwargs)
    # Make `model` the root now: otherwise the first unit to run forward (e.g. a block during
    # `generate` of the LM inside a value-head wrapper) would become a root of its own, and the real
    # root's first forward would then fail.
    model._get_fsdp_state()._lazy_init()
    for lm in _generative_submodules(model):
        _gather_once_for_generate(lm, reshard_after_forward=reshard)
    return model


def apply_fsdp2(module, targets: Mapping[str, nn.Module], plan: FSDP2Plan | None = None) -> bool:
    """Shard a LightningModule's models when its strategy is ``ModelParallelStrategy``; else do nothing.

    Args:
        module: the LightningModule (its trainer's strategy and ``device_mesh`` are read).
        targets: ``{name: model}`` to place; a model with a trainable parameter is sharded, a frozen
            one is sharded or replicated per ``plan.frozen_models``.
        plan: defaults to the strategy's ``plan`` (:class:`FSDP2Strategy`), else :class:`FSDP2Plan()`.

    Returns:
        True when the strategy is FSDP2 (whether or not there was anything left to shard).

    Idempotent: Lightning calls ``configure_model`` again for each ``fit`` / ``validate`` / ``test``.
    """
    trainer = getattr(module, "_trainer", None)
    strategy = trainer.strategy if trainer is not None else None
    if not isinstance(strategy, ModelParallelStrategy):
        return False
    plan = plan or getattr(strategy, "plan", None) or FSDP2Plan()
    mesh = module.device_mesh
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "rlhf-lightning modules implement FSDP2 sharding only, not tensor parallelism: use "
            "rlhf_lightning.strategies.FSDP2Strategy (configs/strategy/fsdp2.yaml) or "
            f"ModelParallelStrategy(tensor_parallel_size=1); got a tensor-parallel size of {mesh['tensor_parallel'].size()}."
        )
    dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    stray = [name for name, p in module.named_parameters(recurse=False) if p.requires_grad]
    if stray:
        raise ValueError(f"Trainable parameters owned by the LightningModule itself cannot be sharded: {stray}; put them in a submodule.")
    for name, model in targets.items():
        if model is None or is_fsdp2_sharded(model):
            continue
        trainable = any(p.requires_grad for p in model.parameters())
        _broadcast_from_rank_zero(model, strategy.root_device)
        if not trainable and plan.frozen_models == "replicate":
            continue  # moved to the device by the strategy like any other module
        if trainable and plan.activation_checkpointing:
            _enable_activation_checkpointing(model)
        shard_model(model, dp_mesh, plan, trainable=trainable)
    _check_trainable_sharded(module)
    return True


def _enable_activation_checkpointing(model: nn.Module) -> None:
    from transformers import PreTrainedModel

    found = False
    for sub in model.modules():
        if isinstance(sub, PreTrainedModel) and sub.supports_gradient_checkpointing:
            # Non-reentrant: the reentrant variant re-runs forward outside autograd's view of FSDP's hooks.
            sub.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            found = True
    if not found:
        raise ValueError(f"activation_checkpointing=True but {type(model).__name__} holds no HF model that supports it.")


def _check_trainable_sharded(module: nn.Module) -> None:
    """Under FSDP2 nothing else synchronises gradients: a trainable parameter left out of every unit
    would silently train a different model on each rank."""
    from torch.distributed.tensor import DTensor

    loose = [name for name, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if loose:
        raise RuntimeError(
            f"Trainable parameters outside any FSDP2 unit (their gradients would not be synchronised): {loose[:5]}"
            + (f" and {len(loose) - 5} more" if len(loose) > 5 else "")
        )


# ---------------------------------------------------------------------------------------------- export


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict of an FSDP2-sharded ``model`` on CPU, on global rank 0; ``None``
    on the other ranks. A collective: every rank must call it, in the same order.

    Tensors are gathered one at a time, so no rank ever holds more than one full tensor besides
    rank 0's CPU copy.
    """
    from torch.distributed.tensor import DTensor

    is_zero = not dist.is_initialized() or dist.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        if is_zero:
            out[name] = tensor.detach().to("cpu", copy=True)
    return out if is_zero else None


def _qualified_name(root: nn.Module, target: nn.Module) -> str:
    """``target``'s name inside ``root`` as state-dict keys spell it (FSDP1 / checkpoint wrapper segments
    removed); ``""`` for ``root`` itself."""
    for name, module in root.named_modules():
        if module is target:
            for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
                name = (name + ".").replace(wrapper, "")
            return name.rstrip(".")
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def _fsdp1_full_state_dict(root: nn.Module, prefix: str) -> dict[str, torch.Tensor] | None:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
        state = root.state_dict()
    if dist.get_rank() != 0:
        return None
    start = prefix + "." if prefix else ""
    return {key[len(start) :]: value for key, value in state.items() if key.startswith(start)}


def _zero3_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if dist.get_rank() != 0:
            return None
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}


def export_state_dict(pl_module: nn.Module, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict of ``model`` (a submodule of ``pl_module``) on global rank 0 when its weights are
    sharded, ``None`` elsewhere and when they are whole (single device, DDP, ZeRO-1/2). A collective
    under sharding: every rank must call it.

    FSDP2 is gathered tensor by tensor (:func:`full_state_dict`). FSDP1 uses FSDP's full-state-dict
    context on Lightning's root wrapper, ZeRO-3 DeepSpeed's ``GatheredParameters``; those two need CUDA
    and are not exercised by this repository's CPU tests.
    """
    if is_fsdp2_sharded(model):
        return full_state_dict(model)
    trainer = getattr(pl_module, "_trainer", None)
    strategy = trainer.strategy if trainer is not None else None
    if strategy is None:
        return None
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, FSDPStrategy) and strategy.model is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if any(isinstance(m, FSDP) for m in strategy.model.modules()):
            return _fsdp1_full_state_dict(strategy.model, _qualified_name(pl_module, model))
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        return _zero3_full_state_dict(model)
    return None


# --------------------------------------------------------------------------------- manual-optimization clipping


def clip_gradient_norm(pl_module, optimizer, max_norm: float) -> None:
    """Clip the total gradient norm of ``pl_module``'s parameters to ``max_norm`` before a manual optimizer step,
    the way the strategy needs it (Lightning clips only under automatic optimization).

    * FSDP1 (``FSDPStrategy``): the root FSDP unit's ``clip_grad_norm_``, which computes the norm over all
      shards; Lightning's FSDP precision plugin refuses ``"norm"`` clipping (``MisconfigurationException``).
    * DeepSpeed: nothing here. The engine clips inside its own step, to the config's ``gradient_clipping``,
      which :func:`set_deepspeed_gradient_clipping` sets (Lightning's DeepSpeed precision plugin ignores
      ``clip_gradients``, and ZeRO keeps the gradients in its own partitioned buffers).
    * Every other strategy (single device, DDP, FSDP2): ``LightningModule.clip_gradients`` with the ``"norm"``
      algorithm (``torch.nn.utils.clip_grad_norm_``, which handles FSDP2's DTensor gradients).
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    strategy = pl_module.trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        return
    if isinstance(strategy, FSDPStrategy):
        strategy.model.clip_grad_norm_(max_norm)
        return
    pl_module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")


def set_deepspeed_gradient_clipping(pl_module, max_norm: float | None) -> None:
    """Under DeepSpeed, make the engine clip the gradient norm to ``max_norm`` at each step (its config's
    ``gradient_clipping``); a no-op under other strategies or for ``None``. Call it before the engine is built
    (``setup`` / ``configure_model``). A different non-zero value already in the DeepSpeed config is an error:
    two settings for one thing."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = pl_module.trainer.strategy
    if max_norm is None or not isinstance(strategy, DeepSpeedStrategy):
        return
    config = strategy.config
    current = config.get("gradient_clipping")
    if current and current != max_norm:
        raise ValueError(
            f"The DeepSpeed config sets gradient_clipping={current}, and {type(pl_module).__name__} has "
            f"max_grad_norm={max_norm}: set one of them (max_grad_norm, or null to keep the config's)."
        )
    config["gradient_clipping"] = float(max_norm)
