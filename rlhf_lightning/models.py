"""Loading models and tokenizers: Hugging Face name, local directory, or an inline config dict.

A *model spec* is one of:

* a string: a Hub name or a local directory, loaded with ``from_pretrained``;
* a dict: a transformers config, e.g. ``{"model_type": "llama", "hidden_size": 64, ...}``; the model is
  built with random weights (``from_config``). ``vocab_size`` and the special-token ids default to the
  tokenizer's, so a tiny config only needs the architecture numbers;
* an already built ``torch.nn.Module`` (returned as is), for users who construct models themselves;
* a weight soup ``{"soup": [spec, spec, ...], "weights": [w, w, ...]}``: the weighted average of the
  parameters of several checkpoints of one architecture (``weights`` optional, uniform by default,
  normalised to sum to 1), built by :func:`rlhf_lightning.weights.load_soup`. Every module loads its
  models through this file, so any model slot takes a soup — e.g. the SALSA reference (Chegini et al.
  2024, an average of SFT runs as the KL reference of PPO or the reference of DPO), in YAML::

      reference:
        soup: [outputs/sft/hf/final, outputs/sft_seed1/hf/final]
        weights: [0.5, 0.5]

  or a weight-averaged reward model (WARM, Ramé et al. 2024) wherever a reward model spec is taken.

LoRA / PEFT: every module takes ``peft:``, a dict of ``peft.LoraConfig`` keyword arguments (e.g.
``{r: 16, lora_alpha: 32, target_modules: all-linear}``); :func:`apply_peft` wraps the loaded model so
that only the adapters (and a score / value head) train. The frozen reference of DPO / MODPO / PPO is
then the same base model with its adapters switched off (:class:`AdapterDisabledReference`), so one copy
of the weights serves policy and reference. A local directory holding an adapter (``adapter_config.json``,
as the export writes) loads as its base model with the adapter merged in, so a LoRA stage feeds the next.

Pad token choice: a tokenizer without a pad token gets ``pad_token = eos_token`` (the TRL convention;
it needs no new embedding row). Nothing in this library derives masks from the pad id — every
function takes an explicit ``attention_mask`` — so sharing the id with EOS is safe. Padding side is
always set explicitly by the caller: right for training batches, left for generation prompts.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any, Mapping, Sequence, Union

import torch
from torch import nn

from rlhf_lightning.logprobs import position_ids_from_attention_mask

ModelSpec = Union[str, os.PathLike, Mapping[str, Any], nn.Module]
# What a LightningCLI/YAML user can write for a model: an inline config (dict first, so jsonargparse
# keeps a mapping a mapping) or a name/path.
ModelSpecArg = Union[dict[str, Any], str]

__all__ = [
    "ModelSpec",
    "ModelSpecArg",
    "load_tokenizer",
    "build_config",
    "is_soup_spec",
    "soup_members",
    "load_causal_lm",
    "load_reward_model",
    "reward_model_scores",
    "CausalLMWithValueHead",
    "freeze",
    "resolve_dtype",
    "PeftArg",
    "apply_peft",
    "is_peft_model",
    "unwrap_peft",
    "transformer_trunk",
    "AdapterDisabledReference",
    "build_reference",
    "disable_dropout",
    "merged_copy",
    "trainable_parameter_share",
    "check_causal_lm_config",
    "prepare_trainable",
    "is_reward_model_dir",
    "build_value_model",
    "check_tokenizer_fits_model",
]

# ``peft:`` as YAML / CLI give it: keyword arguments of ``peft.LoraConfig`` (None: full fine-tuning).
PeftArg = Union[dict[str, Any], None]


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; ``None``/``"auto"`` -> ``None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(str(dtype), str(dtype))
    if name == "auto":
        return None
    resolved = getattr(torch, name, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use one of float32, bfloat16, float16 or auto.")
    return resolved


_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
)


def looks_like_local_path(name: str) -> bool:
    """True when ``name`` can only be a local path, not a Hub id ``[org/]name``: it starts with ``/``,
    ``./``, ``../`` or ``~``, or has more than one ``/``."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", ".."):
        return True
    return len(name.replace("\\", "/").split("/")) > 2


def check_local_path(spec: Any, what: str = "model") -> None:
    """``FileNotFoundError`` "path does not exist" for a string spec that is a local path and is missing
    (instead of the Hub-id validation error ``from_pretrained`` would give)."""
    if not isinstance(spec, (str, os.PathLike)):
        return
    name = os.fspath(spec)
    if os.path.exists(name) or not looks_like_local_path(name):
        return
    raise FileNotFoundError(
        f"{what} path does not exist: {name} (resolved to {os.path.abspath(os.path.expanduser(name))}). "
        "Check the path; a model trained by an earlier stage is exported to <run_dir>/hf/final."
    )


def load_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    padding_side: str = "right",
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """Load a tokenizer and make it ready for batching.

    Args:
        name_or_path: Hub name or local directory holding ``tokenizer.json`` / ``tokenizer_config.json``.
        padding_side: ``"right"`` (training) or ``"left"`` (generation).
        trust_remote_code: passed to ``AutoTokenizer.from_pretrained``.
        revision: Hub revision.

    A missing pad token is set to the EOS token (see module docstring); a tokenizer with neither raises.
    """
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    check_local_path(name_or_path, "tokenizer")
    if os.path.isdir(os.fspath(name_or_path)) and not any(
        os.path.exists(os.path.join(os.fspath(name_or_path), name)) for name in _TOKENIZER_FILES
    ):
        raise FileNotFoundError(
            f"{os.fspath(name_or_path)} has no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}). Point "
            "`tokenizer:` (model.init_args.tokenizer, and data.init_args.tokenizer if set) at the folder or Hub name "
            "of the tokenizer, or save the tokenizer into this folder (tokenizer.save_pretrained(...))."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as error:
        raise_if_missing_local_folder(str(name_or_path), error, "tokenizer")
        raise
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"Tokenizer {name_or_path!s} has neither a pad nor an EOS token; add one "
                "(tokenizer.add_special_tokens({'pad_token': '<pad>'})) and resize the model's embeddings."
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def build_config(spec: Mapping[str, Any], tokenizer=None, **overrides: Any):
    """A transformers ``PretrainedConfig`` from an inline dict (``model_type`` is required).

    ``vocab_size`` and pad/bos/eos ids are filled from ``tokenizer`` unless the dict sets them.
    """
    from transformers import AutoConfig

    spec = dict(spec)
    if "model_type" not in spec:
        raise ValueError(f"An inline model config needs a 'model_type' (e.g. 'llama'); got keys {sorted(spec)}")
    model_type = spec.pop("model_type")
    if tokenizer is not None:
        spec.setdefault("vocab_size", len(tokenizer))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(tokenizer, name, None)
            if value is not None:
                spec.setdefault(name, value)
    spec.update(overrides)
    if tokenizer is not None and isinstance(spec.get("vocab_size"), int):
        _check_special_ids(tokenizer, spec["vocab_size"], f"the inline {model_type!r} config")
    return AutoConfig.for_model(model_type, **spec)


def is_soup_spec(spec: Any) -> bool:
    """True for a weight-soup spec: a mapping with a ``"soup"`` key (see the module docstring)."""
    return isinstance(spec, Mapping) and "soup" in spec


def soup_members(spec: Mapping[str, Any]) -> tuple[list[ModelSpec], list[float] | None]:
    """The member specs and raw weights (None: uniform) of a soup spec, checked; raises ``ValueError``."""
    extra = sorted(set(spec) - {"soup", "weights"})
    if extra:
        raise ValueError(
            f"A soup spec takes 'soup' (a list of model specs) and optional 'weights'; got extra keys {extra}. "
            "An inline transformers config must not have a 'soup' key."
        )
    members = spec["soup"]
    if isinstance(members, (str, bytes, os.PathLike, Mapping, nn.Module)) or not isinstance(members, Sequence):
        raise ValueError(f"'soup' must be a list of model specs (names or directories), got {members!r}")
    members = list(members)
    if not members:
        raise ValueError("'soup' must list at least one model spec")
    weights = spec.get("weights")
    if weights is None:
        return members, None
    if isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Sequence):
        raise ValueError(f"soup 'weights' must be a list of numbers, got {weights!r}")
    if len(weights) != len(members):
        raise ValueError(f"soup 'weights' has {len(weights)} values for {len(members)} models in 'soup'")
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ValueError(f"soup 'weights' must be numbers, got {list(weights)!r}") from None
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"soup 'weights' must be finite, >= 0 and not all zero, got {weights}")
    return members, weights


def _from_spec(auto_class, spec: ModelSpec, *, tokenizer=None, dtype=None, trust_remote_code=False, revision=None, **config_overrides):
    if isinstance(spec, nn.Module):
        return spec
    torch_dtype = resolve_dtype(dtype)
    if isinstance(spec, Mapping):
        config = build_config(spec, tokenizer, **config_overrides)
        check_causal_lm_config(config, spec)
        model = auto_class.from_config(config)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        return model
    check_local_path(spec, "model")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    kwargs.update(config_overrides)
    if os.path.isfile(os.path.join(str(spec), "adapter_config.json")):
        return _load_adapter_dir(auto_class, str(spec), kwargs)
    try:
        return auto_class.from_pretrained(str(spec), **kwargs)
    except (OSError, ValueError) as error:
        raise_if_missing_local_folder(str(spec), error, "model")
        if isinstance(error, ValueError):
            # transformers' "Unrecognized configuration class" for a T5 / BART checkpoint: say why instead.
            from transformers import AutoConfig

            check_causal_lm_config(AutoConfig.from_pretrained(str(spec), trust_remote_code=trust_remote_code), spec)
        raise


def _load_adapter_dir(auto_class, path: str, kwargs: dict[str, Any]):
    """A PEFT adapter directory as its base model with the adapter merged in (a plain HF model)."""
    peft = _import_peft()
    from transformers import AutoModelForSequenceClassification

    peft_class = (
        peft.AutoPeftModelForSequenceClassification
        if auto_class is AutoModelForSequenceClassification
        else peft.AutoPeftModelForCausalLM
    )
    kwargs = {k: v for k, v in kwargs.items() if k != "revision" or v is not None}
    return peft_class.from_pretrained(path, **kwargs).merge_and_unload()


def raise_if_missing_local_folder(name: str, error: BaseException, what: str) -> None:
    """``outputs/sft`` is a valid Hub id too: when loading it failed and its first part is a local folder,
    raise ``FileNotFoundError`` saying which path is missing (instead of the Hub error)."""
    first = name.replace("\\", "/").split("/")[0]
    if not os.path.exists(name) and "/" in name and os.path.isdir(first):
        raise FileNotFoundError(
            f"{what} path does not exist: {name} (the folder {first}/ exists but has no {name[len(first) + 1:]}; "
            f"loading it as a Hub id failed too: {type(error).__name__})"
        ) from error


def load_causal_lm(
    spec: ModelSpec,
    *,
    tokenizer=None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """A ``AutoModelForCausalLM`` from a name, a local directory, an inline config dict, a module or a
    weight soup ``{"soup": [...], "weights": [...]}`` (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    if is_soup_spec(spec):
        loader = functools.partial(load_causal_lm, trust_remote_code=trust_remote_code, revision=revision)
        model = _load_soup_spec(spec, loader, tokenizer=tokenizer, dtype=dtype)
    else:
        model = _from_spec(
            AutoModelForCausalLM, spec, tokenizer=tokenizer, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision
        )
    check_causal_lm_config(getattr(model, "config", None), spec)
    if tokenizer is not None and getattr(model, "config", None) is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    check_tokenizer_fits_model(model, tokenizer, spec)
    return model


def check_causal_lm_config(config, spec: Any = None) -> None:
    """Raise a clear error for encoder-decoder configs (T5, BART, ...): every method here trains a
    decoder-only causal LM (one sequence, prompt then completion)."""
    if config is not None and getattr(config, "is_encoder_decoder", False):
        name = spec if isinstance(spec, (str, os.PathLike)) else getattr(config, "model_type", "?")
        raise ValueError(
            f"{name!s} is an encoder-decoder model ({getattr(config, 'model_type', '?')}); rlhf-lightning trains "
            "causal LMs only (decoder-only: GPT-2, Llama, Qwen2, Mistral, Gemma, Phi-3, ...)."
        )


def load_reward_model(
    spec: ModelSpec,
    *,
    tokenizer=None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """A sequence classifier with one output (a scalar reward) — from our RM export, any HF sequence
    classifier, or a causal LM checkpoint (its LM head is dropped and a new score head initialised); a
    soup spec averages several reward models (WARM)."""
    from transformers import AutoModelForSequenceClassification

    overrides: dict[str, Any] = {"num_labels": 1}
    if isinstance(spec, nn.Module):
        model = spec
    elif is_soup_spec(spec):
        loader = functools.partial(load_reward_model, trust_remote_code=trust_remote_code, revision=revision)
        model = _load_soup_spec(spec, loader, tokenizer=tokenizer, dtype=dtype)
    else:
        model = _from_spec(
            AutoModelForSequenceClassification,
            spec,
            tokenizer=tokenizer,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            revision=revision,
            **overrides,
        )
    check_causal_lm_config(getattr(model, "config", None), spec)
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    check_tokenizer_fits_model(model, tokenizer, spec)
    return model


def check_tokenizer_fits_model(model: nn.Module, tokenizer, spec: Any = None) -> None:
    """Raise a clear ``ValueError`` at load time when a special token id of ``tokenizer`` (pad, EOS, BOS)
    has no row in the model's input embeddings — otherwise the first padded batch fails with an
    ``IndexError`` deep inside the embedding lookup. A tokenizer with more tokens than the model has
    rows (added tokens, no resize) is warned about: only text that uses those tokens would fail."""
    if tokenizer is None:
        return
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        rows = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(rows, int):
        return
    _check_special_ids(tokenizer, rows, f"model {spec!s}" if isinstance(spec, (str, os.PathLike)) else "the model")


def _check_special_ids(tokenizer, rows: int, where: str) -> None:
    fix = (
        "Resize the model's embeddings (model.resize_token_embeddings(len(tokenizer))) and save it, or use a "
        "token the model knows as pad (tokenizer.pad_token = tokenizer.eos_token)."
    )
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and value >= rows:
            token = getattr(tokenizer, name.replace("_id", ""), None)
            raise ValueError(
                f"The tokenizer's {name} = {value} ({token!r}) is outside the vocabulary of {where}, which has "
                f"{rows} embedding rows (ids 0..{rows - 1}). {fix}"
            )
    if len(tokenizer) > rows:
        logging.getLogger(__name__).warning(
            "The tokenizer has %d tokens but %s has only %d embedding rows: text that tokenizes to ids %d..%d "
            "will fail inside the embedding lookup. %s", len(tokenizer), where, rows, rows, len(tokenizer) - 1, fix
        )


def _load_soup_spec(spec: Mapping[str, Any], loader, *, tokenizer=None, dtype=None) -> nn.Module:
    from rlhf_lightning.weights import load_soup

    members, weights = soup_members(spec)
    return load_soup(members, weights, tokenizer=tokenizer, dtype=dtype, loader=loader)


def _score_head(model: nn.Module) -> nn.Module | None:
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    return None


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of the last real token of each row, for left or right padding."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=-1)


def reward_model_scores(reward_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward per sequence, read at the last non-padding token (found from ``attention_mask``).

    Args:
        reward_model: a HF sequence classifier with one label.
        input_ids: ``(B, T)``; any padding side.
        attention_mask: ``(B, T)``.

    Returns:
        ``(B,)`` float32 scores.

    HF's own pooling locates the last token by comparing ids with ``pad_token_id``, which is wrong when
    pad == EOS and the sequence ends with EOS; we run the backbone and apply the score head ourselves.
    """
    position_ids = position_ids_from_attention_mask(attention_mask)
    inner = unwrap_peft(reward_model)  # a PeftModel's `base_model` is its LoraModel, not the trunk
    head = _score_head(inner)
    backbone = getattr(inner, "base_model", None)
    if head is None or backbone is None or backbone is inner:
        logits = reward_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        return logits.squeeze(-1).float()
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)[0]
    last = last_token_index(attention_mask)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(pooled).squeeze(-1).float()


class CausalLMWithValueHead(nn.Module):
    """A causal LM plus a scalar value head on the final hidden state (PPO's policy or critic).

    Args:
        model: a model spec for the causal LM (see module docstring) or a built model.
        tokenizer: used to fill ``vocab_size``/special ids for inline configs.
        dtype: parameter dtype for loaded weights.
        value_head_init_std: std of the value head's normal init (small, so initial values ~ 0).

    ``forward`` returns ``(logits (B, T, V), values (B, T))``; ``values(...)`` skips the LM head
    when only the critic is needed.
    """

    def __init__(self, model: ModelSpec, *, tokenizer=None, dtype=None, value_head_init_std: float = 0.0):
        super().__init__()
        self.pretrained_model = load_causal_lm(model, tokenizer=tokenizer, dtype=dtype)
        hidden_size = self.pretrained_model.config.hidden_size
        self.v_head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.v_head.weight, std=value_head_init_std) if value_head_init_std > 0 else nn.init.zeros_(
            self.v_head.weight
        )
        nn.init.zeros_(self.v_head.bias)

    @property
    def config(self):
        return self.pretrained_model.config

    def _hidden(self, input_ids, attention_mask, position_ids=None):
        if position_ids is None:
            position_ids = position_ids_from_attention_mask(attention_mask)
        backbone = transformer_trunk(self.pretrained_model)
        return backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)[0]

    def forward(self, input_ids, attention_mask, position_ids=None):
        """One forward of the whole causal LM, so the logits are exactly the model's own: any
        post-processing it applies after the LM head (Gemma-2/3 ``final_logit_softcapping``, Cohere's
        ``logit_scale``, Granite's ``logits_scaling``, ...) is kept, and the KL to an identical reference
        is 0. The value head reads the hidden state the LM head receives (captured by a forward pre-hook).
        """
        if position_ids is None:
            position_ids = position_ids_from_attention_mask(attention_mask)
        captured: list[torch.Tensor] = []

        def capture(_module, args):
            captured.append(args[0])

        handle = self.pretrained_model.get_output_embeddings().register_forward_pre_hook(capture)
        try:
            logits = self.pretrained_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).logits
        finally:
            handle.remove()
        hidden = captured[-1]
        values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1)
        return logits, values.float()

    def values(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        hidden = self._hidden(input_ids, attention_mask, position_ids)
        return self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1).float()


def freeze(model: nn.Module) -> nn.Module:
    """Frozen-model contract: eval mode (no dropout), ``requires_grad=False`` everywhere."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------ LoRA / PEFT


def _import_peft():
    try:
        import peft
    except ImportError as error:  # pragma: no cover - peft is installed by the test command
        raise ImportError(
            "`peft:` (LoRA adapters) and adapter directories need the peft package: pip install 'rlhf-lightning[peft]'"
        ) from error
    return peft


def is_peft_model(model: Any) -> bool:
    """True for a ``peft.PeftModel`` (without importing peft when it is not installed)."""
    return any(cls.__name__ == "PeftModel" and cls.__module__.startswith("peft") for cls in type(model).__mro__)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (LoRA layers injected in place, so it still runs the
    adapters); any other model unchanged."""
    return model.get_base_model() if is_peft_model(model) else model


def transformer_trunk(model: nn.Module) -> nn.Module:
    """The decoder stack of a HF causal LM or sequence classifier (``LlamaModel``, ``GPT2Model``, ...),
    whose forward returns hidden states ``(B, T, H)``; looks through a ``PeftModel``, whose own
    ``base_model`` is a ``LoraModel`` returning logits."""
    return unwrap_peft(model).base_model


def apply_peft(model: nn.Module, peft_kwargs: Mapping[str, Any] | None, *, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Wrap ``model`` with LoRA adapters; ``peft_kwargs`` ``None`` or empty returns it unchanged.

    Args:
        model: a HF causal LM or sequence classifier.
        peft_kwargs: keyword arguments of ``peft.LoraConfig`` (``r``, ``lora_alpha``, ``target_modules``
            e.g. ``all-linear``, ``lora_dropout``, ...).
        task_type: ``"CAUSAL_LM"`` or ``"SEQ_CLS"`` (then the score head is fully trainable and saved
            with the adapter, peft's ``modules_to_save``); a ``task_type`` in ``peft_kwargs`` wins.

    Returns:
        A ``peft.PeftModel``: only adapter (and score-head) parameters require grad.
    """
    if not peft_kwargs:
        return model
    if not isinstance(peft_kwargs, Mapping):
        raise ValueError(f"`peft:` must be a dict of peft.LoraConfig keyword arguments, got {peft_kwargs!r}")
    if is_peft_model(model):
        raise ValueError("`peft:` was given for a model that already is a PeftModel; pass the base model or drop `peft:`.")
    peft = _import_peft()
    kwargs = dict(peft_kwargs)
    kwargs.setdefault("task_type", task_type)
    try:
        config = peft.LoraConfig(**kwargs)
    except TypeError as error:
        raise ValueError(f"`peft:` has an argument peft.LoraConfig does not take: {error}") from None
    return peft.get_peft_model(model, config)


class AdapterDisabledReference(nn.Module):
    """The frozen reference of a LoRA policy: the same ``PeftModel`` run with its adapters disabled and in
    eval mode (no dropout), so policy and reference share one copy of the base weights.

    The policy is held, not registered as a submodule: the reference adds no parameters, state-dict keys
    or FSDP unit of its own. ``parameters()`` yields the (frozen) base weights so that device look-ups
    work; ``reference_state_dict()`` gives them for fingerprints of precomputed reference log-probs.
    """

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        if not is_peft_model(peft_model):
            raise TypeError(f"AdapterDisabledReference needs a peft.PeftModel, got {type(peft_model).__name__}")
        self._held = (peft_model,)  # a tuple: nn.Module does not register it

    @property
    def peft_model(self) -> nn.Module:
        return self._held[0]

    @property
    def config(self):
        return self.peft_model.config

    def forward(self, *args: Any, **kwargs: Any):
        model = self.peft_model
        was_training = model.training
        model.eval()
        try:
            with model.disable_adapter():
                return model(*args, **kwargs)
        finally:
            model.train(was_training)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, parameter in self.peft_model.named_parameters(prefix=prefix, remove_duplicate=remove_duplicate):
            if not parameter.requires_grad:
                yield name, parameter

    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's weights (adapter weights and trainable heads left out)."""
        trainable = {name for name, p in self.peft_model.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.peft_model.state_dict().items() if k not in trainable and "lora_" not in k}


def build_reference(policy: nn.Module, reference: ModelSpec | None = None, *, tokenizer=None, dtype=None) -> nn.Module:
    """The frozen reference of a policy-plus-reference method (DPO, MODPO, PPO, Fine-Grained RLHF).

    * ``reference`` given: that model, loaded and frozen;
    * a LoRA policy (``PeftModel``): the policy with its adapters disabled (no second copy);
    * otherwise a frozen copy of the initial policy (a copy, not a second load: an inline config would
      otherwise draw different random weights).
    """
    if reference is not None:
        return freeze(load_causal_lm(reference, tokenizer=tokenizer, dtype=dtype))
    if is_peft_model(policy):
        return AdapterDisabledReference(policy)
    import copy

    return freeze(copy.deepcopy(policy))


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability of ``model`` to 0: ``nn.Dropout`` modules, float ``*dropout*``
    attributes that attention modules read at forward time (Llama's ``attention_dropout``, OPT's
    ``dropout``), and the config's ``*dropout*`` fields (TRL's ``disable_dropout``). With dropout on, a
    policy in train mode differs from itself in eval mode, so DPO's implicit reward is not 0 and PPO's
    first ratio is not 1 at initialisation. LoRA's own ``lora_dropout`` is left as configured."""
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(module, nn.Dropout):
            module.p = 0.0
            continue
        for attribute, value in list(vars(module).items()):
            if "dropout" in attribute.lower() and isinstance(value, float):
                setattr(module, attribute, 0.0)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")}
    for config in configs.values():
        for attribute, value in config.to_dict().items():
            if "dropout" in attribute.lower() and isinstance(value, float) and hasattr(config, attribute):
                setattr(config, attribute, 0.0)
    return model


def merged_copy(peft_model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A plain HF model (no adapters) whose weights are the base weights with the LoRA updates merged in.

    Built fresh on CPU from the base model's config and loaded from ``state_dict`` (the gathered full
    state dict under sharding) or the model's own, so the training model is never modified. Costs one
    extra copy of the weights while it lives.
    """
    peft = _import_peft()
    base = peft_model.get_base_model()
    import copy

    config = copy.deepcopy(base.config)
    fresh = type(base)._from_config(config)
    fresh = peft.get_peft_model(fresh, peft_model.peft_config[peft_model.active_adapter])
    state = state_dict if state_dict is not None else peft_model.state_dict()
    fresh.load_state_dict({k: v.detach().to("cpu") for k, v in state.items()}, strict=True)
    return fresh.merge_and_unload()


def trainable_parameter_share(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (each shared tensor counted once)."""
    seen: dict[int, torch.nn.Parameter] = {}
    for parameter in model.parameters():
        seen[id(parameter)] = parameter
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, sum(p.numel() for p in seen.values())


def prepare_trainable(
    model: nn.Module,
    *,
    peft: Mapping[str, Any] | None = None,
    no_dropout: bool = True,
    gradient_checkpointing: bool = False,
    task_type: str = "CAUSAL_LM",
) -> nn.Module:
    """What every module does to the model it trains, in order: dropout off (``no_dropout``),
    activation checkpointing, then LoRA adapters (``peft``, see :func:`apply_peft`).

    With checkpointing and adapters, the embedding outputs are made to require grad
    (``enable_input_require_grads``): with frozen embeddings a re-entrant checkpoint would otherwise
    see no input that needs a gradient and give the adapters none.
    """
    if no_dropout:
        disable_dropout(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = apply_peft(model, peft, task_type=task_type)
    if gradient_checkpointing and peft:
        unwrap_peft(model).enable_input_require_grads()
    return model


def is_reward_model_dir(spec: Any) -> bool:
    """True when ``spec`` is a local directory holding a sequence classifier (a reward-model export, plain
    or a LoRA adapter of one)."""
    if not isinstance(spec, (str, os.PathLike)) or not os.path.isdir(str(spec)):
        return False
    import json

    adapter = os.path.join(str(spec), "adapter_config.json")
    if os.path.isfile(adapter):
        with open(adapter) as f:
            return json.load(f).get("task_type") == "SEQ_CLS"
    config = os.path.join(str(spec), "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        architectures = json.load(f).get("architectures") or []
    return any(str(name).endswith("ForSequenceClassification") for name in architectures)


def build_value_model(
    spec: ModelSpec,
    *,
    tokenizer=None,
    dtype=None,
    peft: Mapping[str, Any] | None = None,
    no_dropout: bool = True,
    gradient_checkpointing: bool = False,
) -> "CausalLMWithValueHead":
    """A separate critic: a trunk plus a scalar value head.

    * ``spec`` a reward-model directory (our RM export or any sequence classifier): the critic starts
      from the reward model's trunk AND its score head (OpenRLHF; Zheng et al. 2023, "Secrets of RLHF
      I"), so its first values are the reward model's scores of each prefix instead of 0;
    * any other spec: a causal LM trunk and a zero-initialised value head.

    The unused output head (LM head or the RM's own score head, whose weights were copied) is frozen, so
    it stays out of the optimizer and of DDP's unused-parameter check. ``peft`` puts LoRA adapters on the
    trunk (the value head stays fully trainable).
    """
    if is_reward_model_dir(spec):
        trunk_model = load_reward_model(spec, tokenizer=tokenizer, dtype=dtype)
        score = _score_head(trunk_model)
        critic = CausalLMWithValueHead(trunk_model, dtype=dtype)
        with torch.no_grad():
            critic.v_head.weight.copy_(score.weight.reshape_as(critic.v_head.weight))
            if getattr(score, "bias", None) is not None:
                critic.v_head.bias.copy_(score.bias.reshape_as(critic.v_head.bias))
        unused = score
    else:
        critic = CausalLMWithValueHead(spec, tokenizer=tokenizer, dtype=dtype)
        unused = critic.pretrained_model.get_output_embeddings()
        if unused is not None and unused.weight is critic.pretrained_model.get_input_embeddings().weight:
            unused = None  # tied to the input embeddings, which the critic does use
    if unused is not None:
        unused.requires_grad_(False)
    critic.pretrained_model = prepare_trainable(
        critic.pretrained_model, peft=peft, no_dropout=no_dropout, gradient_checkpointing=gradient_checkpointing,
        task_type="FEATURE_EXTRACTION",
    )
    return critic
