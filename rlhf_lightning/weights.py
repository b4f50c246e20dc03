"""Weight arithmetic on parameters and state dicts: EMA, interpolation, SLERP merges and weight soups.

Pure functions (no Lightning): the callbacks in ``rlhf_lightning.callbacks`` compose them, and users can
call them on checkpoints directly.

* ``ema_update_`` — the exponential moving average step shared by ``EMA`` and ``ElasticReset``.
* ``interpolate_state_dicts`` — ``(1 - alpha) * init + alpha * trained`` with one alpha, one alpha per
  decoder layer, or layer ranges: the heterogeneous model averaging (HMA) of Lin et al. 2024,
  "Mitigating the Alignment Tax of RLHF", which gives input-side and output-side layers different ratios.
* ``slerp_task_vectors`` — merge two policies fine-tuned from the same base by spherical interpolation of
  their task vectors (``theta - base``), per tensor.
* ``average_state_dicts`` / ``load_soup`` — weight soups (e.g. the reference "soup" of SALSA, Chegini et
  al. 2024: a reference model that is the average of several SFT runs).

Arithmetic is done in float32 and cast back to each tensor's dtype, so bf16 weights do not lose the small
increments an average is made of. Non-floating tensors (integer buffers) are copied from the trained /
first state dict, never averaged.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Callable, Iterable, Mapping, Sequence, Union

import torch
from torch import nn

__all__ = [
    "AlphaSpec",
    "ema_update_",
    "copy_params_",
    "trainable_named_parameters",
    "layer_index",
    "validate_alpha_spec",
    "resolve_alpha",
    "interpolate_state_dicts",
    "slerp_task_vectors",
    "average_state_dicts",
    "load_soup",
]

StateDict = Mapping[str, torch.Tensor]
# A float for every parameter, a list with one float per decoder layer, or {"0-3": a, "4-7": b, "default": c}.
AlphaSpec = Union[float, Sequence[float], Mapping[str, float]]

# ``model.layers.3.``, ``transformer.h.3.``, ``encoder.layer.3.``, ``blocks.3.``: the decoder-layer index.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")


def _tensors(params: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return list(params.values()) if isinstance(params, Mapping) else list(params)


def _paired(dst, src) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pair two collections of tensors, by name when both are mappings, else by position."""
    if isinstance(dst, Mapping) and isinstance(src, Mapping):
        _check_same_keys(dst, src, "first", "second")
        return [(dst[name], src[name]) for name in dst]
    dst_list, src_list = _tensors(dst), _tensors(src)
    if len(dst_list) != len(src_list):
        raise ValueError(f"Parameter lists differ in length: {len(dst_list)} vs {len(src_list)}")
    return list(zip(dst_list, src_list))


@torch.no_grad()
def ema_update_(ema_params, online_params, decay: float) -> None:
    """In place: ``ema <- decay * ema + (1 - decay) * online`` for each pair of tensors.

    Args:
        ema_params: the averaged tensors (updated in place); a list or a ``{name: tensor}`` mapping.
        online_params: the current weights, same order (or same names) and shapes; may live on another
            device or have another dtype (e.g. bf16 weights, float32 EMA on CPU).
        decay: in ``[0, 1]``; ``0`` copies the online weights, ``1`` leaves the EMA unchanged.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    for ema, online in _paired(ema_params, online_params):
        # lerp(ema, online, w) = ema + w * (online - ema), exact at w = 0 and w = 1.
        ema.lerp_(online.detach().to(device=ema.device, dtype=ema.dtype), 1.0 - decay)


@torch.no_grad()
def copy_params_(dst_params, src_params) -> None:
    """In place: ``dst <- src`` (cast to ``dst``'s device and dtype), pairing as in :func:`ema_update_`."""
    for dst, src in _paired(dst_params, src_params):
        dst.copy_(src.detach().to(device=dst.device, dtype=dst.dtype))


def trainable_named_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter of ``module`` with ``requires_grad``, in registration order."""
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def layer_index(name: str) -> int | None:
    """Decoder-layer index in a parameter name (``model.layers.3.mlp.up_proj.weight`` -> 3), else None."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def _parse_range_spec(spec: Mapping[str, float]) -> tuple[list[tuple[int, int, float]], float | None]:
    ranges: list[tuple[int, int, float]] = []
    default = None
    for key, value in spec.items():
        value = float(value)
        if key == "default":
            default = value
            continue
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(key))
        if match is None:
            raise ValueError(f"Bad layer range {key!r} in alpha spec: use 'i', 'i-j' (inclusive) or 'default'")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"Bad layer range {key!r} in alpha spec: end {hi} < start {lo}")
        for other_lo, other_hi, _ in ranges:
            if lo <= other_hi and other_lo <= hi:
                raise ValueError(f"Layer range {key!r} overlaps {other_lo}-{other_hi} in alpha spec")
        ranges.append((lo, hi, value))
    return ranges, default


def validate_alpha_spec(alpha: AlphaSpec) -> None:
    """Raise ``ValueError`` for a malformed alpha spec (checked early, e.g. in a callback ``__init__``)."""
    if isinstance(alpha, bool):
        raise ValueError("alpha must be a float, a list of floats or a dict of layer ranges, not a bool")
    if isinstance(alpha, (int, float)):
        values = [float(alpha)]
    elif isinstance(alpha, Mapping):
        ranges, default = _parse_range_spec(alpha)
        values = [a for _, _, a in ranges] + ([default] if default is not None else [])
        if not values:
            raise ValueError("An alpha dict needs at least one layer range or a 'default'")
    elif isinstance(alpha, Sequence) and not isinstance(alpha, str):
        values = [float(a) for a in alpha]
        if not values:
            raise ValueError("An alpha list needs one value per decoder layer; got an empty list")
    else:
        raise ValueError(f"alpha must be a float, a list of floats or a dict of layer ranges; got {alpha!r}")
    bad = [a for a in values if not math.isfinite(a)]
    if bad:
        raise ValueError(f"alpha values must be finite; got {bad}")


def resolve_alpha(alpha: AlphaSpec, names: Iterable[str]) -> dict[str, float]:
    """The interpolation coefficient of every parameter name under an alpha spec.

    * float: the same alpha everywhere.
    * list: ``alpha[i]`` for parameters of decoder layer ``i``; its length must equal the number of layers
      found in ``names``. Parameters outside the layers (embeddings, final norm, LM head) get the mean of
      the list — a neutral choice; use the dict form to set them explicitly.
    * dict: ``{"0-3": a, "4-7": b, "default": c}`` — inclusive layer ranges (or single indices ``"5"``);
      ``default`` covers every other parameter, including non-layer ones, and is required when any
      parameter is left uncovered.
    """
    validate_alpha_spec(alpha)
    names = list(names)
    if isinstance(alpha, (int, float)):
        return {name: float(alpha) for name in names}
    indices = {name: layer_index(name) for name in names}
    if isinstance(alpha, Mapping):
        ranges, default = _parse_range_spec(alpha)
        out, uncovered = {}, []
        for name, idx in indices.items():
            value = next((a for lo, hi, a in ranges if idx is not None and lo <= idx <= hi), default)
            if value is None:
                uncovered.append(name)
            else:
                out[name] = value
        if uncovered:
            raise ValueError(
                f"alpha spec {dict(alpha)} covers no range for {len(uncovered)} parameters (e.g. {uncovered[:3]}); "
                "add a 'default' entry"
            )
        return out
    per_layer = [float(a) for a in alpha]
    num_layers = 1 + max((i for i in indices.values() if i is not None), default=-1)
    if num_layers != len(per_layer):
        raise ValueError(
            f"alpha list has {len(per_layer)} values but the model has {num_layers} decoder layers "
            "(parameter names like 'model.layers.<i>.')"
        )
    outside = sum(per_layer) / len(per_layer)
    return {name: (per_layer[idx] if idx is not None else outside) for name, idx in indices.items()}


def _check_same_keys(a: Mapping, b: Mapping, a_name: str, b_name: str) -> None:
    if a.keys() != b.keys():
        missing = sorted(set(a) - set(b))[:5]
        extra = sorted(set(b) - set(a))[:5]
        raise ValueError(
            f"State dicts do not match: in {a_name} but not {b_name}: {missing}; in {b_name} but not {a_name}: {extra}"
        )


def _check_same_shapes(a: StateDict, b: StateDict, a_name: str, b_name: str) -> None:
    _check_same_keys(a, b, a_name, b_name)
    for name, tensor in a.items():
        if tuple(tensor.shape) != tuple(b[name].shape):
            raise ValueError(
                f"Shape mismatch for {name!r}: {tuple(tensor.shape)} in {a_name} vs {tuple(b[name].shape)} in {b_name}"
            )


@torch.no_grad()
def interpolate_state_dicts(init: StateDict, trained: StateDict, alpha: AlphaSpec) -> dict[str, torch.Tensor]:
    """``theta = (1 - alpha) * init + alpha * trained``, per parameter (see :func:`resolve_alpha` for specs).

    ``alpha = 0`` returns ``init`` and ``alpha = 1`` returns ``trained`` exactly; values outside ``[0, 1]``
    extrapolate (e.g. ExPO's ``alpha > 1``). New tensors on ``trained``'s devices and dtypes.
    """
    _check_same_shapes(init, trained, "init", "trained")
    alphas = resolve_alpha(alpha, trained.keys())
    out = {}
    for name, end in trained.items():
        if not torch.is_floating_point(end):
            out[name] = end.clone()
            continue
        start = init[name].to(device=end.device, dtype=torch.float32)
        out[name] = torch.lerp(start, end.float(), alphas[name]).to(end.dtype)
    return out


@torch.no_grad()
def slerp_task_vectors(
    base: StateDict, a: StateDict, b: StateDict, t: float, *, eps: float = 1e-6
) -> dict[str, torch.Tensor]:
    """Merge two models fine-tuned from ``base`` by SLERP of their task vectors, per tensor.

    With ``u = a - base`` and ``v = b - base`` (flattened) and ``omega`` the angle between them::

        merged = base + sin((1 - t) omega) / sin(omega) * u + sin(t omega) / sin(omega) * v

    When ``u`` and ``v`` are nearly colinear (``|cos omega| > 1 - eps``) or one is ~0, ``sin(omega)`` is ~0
    and the formula is ill-conditioned: that tensor falls back to the linear ``(1 - t) u + t v``.
    ``t = 0`` gives ``a`` and ``t = 1`` gives ``b`` (up to rounding).
    """
    if not math.isfinite(t):
        raise ValueError(f"t must be finite, got {t}")
    _check_same_shapes(base, a, "base", "a")
    _check_same_shapes(base, b, "base", "b")
    out = {}
    for name, theta0 in base.items():
        if not torch.is_floating_point(theta0):
            out[name] = a[name].clone()
            continue
        origin = theta0.float()
        u = a[name].to(device=origin.device, dtype=torch.float32) - origin
        v = b[name].to(device=origin.device, dtype=torch.float32) - origin
        nu, nv = u.norm(), v.norm()
        cos = (u.flatten() @ v.flatten()) / (nu * nv).clamp_min(1e-30)
        if nu.item() <= eps or nv.item() <= eps or abs(cos.item()) > 1.0 - eps:
            delta = torch.lerp(u, v, t)
        else:
            omega = torch.arccos(cos.clamp(-1.0, 1.0))
            sin_omega = torch.sin(omega)
            delta = (torch.sin((1.0 - t) * omega) / sin_omega) * u + (torch.sin(t * omega) / sin_omega) * v
        out[name] = (origin + delta).to(theta0.dtype)
    return out


def _normalized_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if n == 0:
        raise ValueError("Need at least one state dict / model to average")
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"Got {len(weights)} weights for {n} models")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"Soup weights must be finite, non-negative and not all zero; got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


@torch.no_grad()
def _accumulate_(acc: dict[str, torch.Tensor], state_dict: StateDict, weight: float) -> None:
    for name, tensor in state_dict.items():
        if torch.is_floating_point(tensor):
            acc[name].add_(tensor.to(device=acc[name].device, dtype=torch.float32), alpha=weight)


def _start_accumulator(state_dict: StateDict, weight: float) -> dict[str, torch.Tensor]:
    return {
        name: tensor.float() * weight if torch.is_floating_point(tensor) else tensor.clone()
        for name, tensor in state_dict.items()
    }


def _finish_accumulator(acc: dict[str, torch.Tensor], like: StateDict) -> dict[str, torch.Tensor]:
    return {name: acc[name].to(like[name].dtype) for name in like}


@torch.no_grad()
def average_state_dicts(state_dicts: Sequence[StateDict], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Weighted average ("soup") of state dicts with identical keys and shapes.

    Args:
        state_dicts: the models to average.
        weights: one non-negative weight per state dict, normalised to sum to 1; uniform when None.

    Returns new tensors with the first state dict's devices and dtypes.
    """
    weights = _normalized_weights(weights, len(state_dicts))
    first = state_dicts[0]
    for i, state_dict in enumerate(state_dicts[1:], start=1):
        _check_same_shapes(first, state_dict, "state_dicts[0]", f"state_dicts[{i}]")
    acc = _start_accumulator(first, weights[0])
    for state_dict, weight in zip(state_dicts[1:], weights[1:]):
        _accumulate_(acc, state_dict, weight)
    return _finish_accumulator(acc, first)


@torch.no_grad()
def load_soup(
    model_specs: Sequence,
    weights: Sequence[float] | None = None,
    *,
    tokenizer=None,
    dtype=None,
    loader: Callable[..., nn.Module] | None = None,
):
    """A model whose weights are the weighted average of several checkpoints of one architecture.

    Args:
        model_specs: model specs as accepted by ``loader`` (Hub names or local ``save_pretrained``
            directories; built modules also work — they are read, never modified).
        weights: soup weights (normalised); uniform when None.
        tokenizer: passed to ``loader`` (fills the pad id).
        dtype: parameter dtype of the loaded models.
        loader: ``loader(spec, tokenizer=..., dtype=...) -> nn.Module``; default
            ``rlhf_lightning.models.load_causal_lm`` (``load_reward_model`` gives a reward-model soup).

    Models are loaded one at a time into a float32 running sum, so memory is about two models, not N.
    Raises ``ValueError`` naming the offending spec when architectures, parameter names or shapes differ.
    """
    if loader is None:
        from rlhf_lightning.models import load_causal_lm as loader

    model_specs = list(model_specs)
    weights = _normalized_weights(weights, len(model_specs))
    first = loader(model_specs[0], tokenizer=tokenizer, dtype=dtype)
    # A built module given as the first member must not be overwritten by the average.
    soup = copy.deepcopy(first) if isinstance(model_specs[0], nn.Module) else first
    first_sd = soup.state_dict()
    first_arch = _architecture(soup)
    acc = _start_accumulator(first_sd, weights[0])
    for spec, weight in zip(model_specs[1:], weights[1:]):
        model = loader(spec, tokenizer=tokenizer, dtype=dtype)
        arch = _architecture(model)
        if arch != first_arch:
            raise ValueError(
                f"Cannot average {_spec_name(spec)} ({arch}) with {_spec_name(model_specs[0])} ({first_arch}): "
                "architectures differ"
            )
        state_dict = model.state_dict()
        try:
            _check_same_shapes(first_sd, state_dict, _spec_name(model_specs[0]), _spec_name(spec))
        except ValueError as err:
            raise ValueError(f"Cannot average these checkpoints: {err}") from None
        _accumulate_(acc, state_dict, weight)
        del model, state_dict
    soup.load_state_dict(_finish_accumulator(acc, first_sd))
    return soup


def _spec_name(spec) -> str:
    """A short name of a model spec for error messages (a built module's repr spans pages)."""
    return f"<built {type(spec).__name__}>" if isinstance(spec, nn.Module) else repr(spec)


def _architecture(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return f"{type(model).__name__}" + (f"/{model_type}" if model_type else "")
