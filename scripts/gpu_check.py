"""One prepared GPU check: bf16 throughput, memory and every strategy path of the method modules.

    python scripts/gpu_check.py --out gpu_check                   # on one CUDA GPU: the whole check
    python scripts/gpu_check.py --device cpu --tiny --out smoke   # CPU smoke mode (what CI runs, a subset)
    python scripts/gpu_check.py --list                            # the plan: every run, in order
    python scripts/gpu_check.py --runs 'qwen2-0.5b/fsdp2/*' --budget 0.5 --out again   # rerun a part

On one device it trains randomly initialised models of realistic shape, built from configs (no
downloads): a ~0.5B Qwen2-style and a ~1.5B Llama-style model over a generated word-level tokenizer of
the real vocabulary size (151,936 / 128,256 words; built with the embedded world's tokenizer builder), for
a fixed number of steps each, for SFT, the reward model, DPO (live reference; precomputed), PPO
(KV-cached HF ``generate`` inside the step) and, when the checkout has them, padding-free batches,
LoRA (``peft:``) and GRPO. Each method runs under the single-device strategy and under every
``configs/strategy/*.yaml`` that shards (FSDP1, DeepSpeed ZeRO-2 and ZeRO-3, FSDP2), with
``devices=1`` and the file's own precision and settings, parsed as the CLI parses them. One sharded
checkpoint (ZeRO-3, DPO) is resumed, and the losses after the resume are compared with an
uninterrupted run.

Every run is a fresh subprocess (``--child``): a crash, an out-of-memory error or a hang (per-run
timeout) is recorded and the next run starts. After every run ``results.json`` and ``results.md`` are
rewritten in ``--out``, so a check cut short still leaves what it measured; one log per run is in
``--out/logs``. Runs are ordered by what they tell (every strategy's first steps before more methods
and the larger model); ``--time-limit`` skips the runs that no longer fit (marked as such), and
``--budget`` scales the number of timed steps.

What a run reports, and how it is measured:

* Data: one fixed batch (``batch`` records of random words, lengths drawn between half and all of the
  configured prompt / completion lengths), repeated every step, so the loss of a working trainer must
  fall. Step time is the wall time from ``on_train_batch_start`` to ``on_train_batch_end``
  (CUDA-synchronised at both ends: forward, loss, backward, optimizer; for PPO the whole rollout and
  update), median over the timed steps after ``warmup`` untimed ones.
* tokens/s: useful (non-padding) tokens of the batch per second: prompt + completion of each sequence;
  a pair counts both of its sequences; a PPO step counts the rollout's prompt + completion tokens.
  ``items/s``: sequences (SFT), pairs (RM, DPO) or episodes (PPO, GRPO) per second.
* MFU: ``6 N tokens / step time`` over the device's dense bf16 peak (``--peak-tflops``; for H100 / H200
  SXM the datasheet's 989 TFLOP/s, not the ~790 measured on random data, which the check also measures
  and prints). ``N`` counts the parameters that take part in matrix products: all of the trained model
  but its input embedding (a tied LM head is counted once); attention's ``T^2`` term is left out.
  For PPO the tokens are the rollout's tokens x ``ppo_epochs``; with LoRA, 4N (no weight gradients for
  frozen weights). ``MFU all`` adds the forwards that train nothing: the live reference (2N per token),
  and for PPO the generation (2N per decoded position), the old-log-prob / value and reference
  forwards (2N each per rollout token).
* Peak memory: ``torch.cuda.max_memory_allocated`` over the fit (reset after the untimed generation
  baseline); on CPU the process's resident-set high-water mark.
* Generation (PPO, GRPO): decoded positions per second inside the step (``rlhf_lightning.rollout``'s
  call to ``generate``, under the strategy) and of a bare ``model.generate`` on the unwrapped policy
  (fp32 weights, bf16 autocast on CUDA, same prompts, sampling settings and number of new tokens),
  timed in the same process before training.
* Loss: finite at every step; *moved*: for SFT / RM / DPO the last step's loss is below the first's
  (the same batch every step); for PPO / GRPO the rollout KL to the reference is above 0 at the last
  step (the policy left the reference). DPO's first loss must be ln 2 (policy == reference) and PPO's
  first rollout KL 0: both are checked (``checks``).
* Resume: three runs of DPO under ZeRO-3 with deterministic algorithms: ``K + M`` steps straight
  through; ``K`` steps then a (sharded) checkpoint; a fresh process resumed from it to ``K + M``. The
  ``M`` losses after the resume must equal the uninterrupted run's (``--resume-tol``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import importlib.util
import inspect
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# ---------------------------------------------------------------------------------------------- the plan

# Realistic shapes (random weights). Qwen2-0.5B's architecture; a Llama of ~1.5B (Llama-3.2-1B's layer shape
# with 20 layers: 1.48B parameters, tied embeddings).
MODELS: dict[str, dict[str, Any]] = {
    "qwen2-0.5b": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 4096,
        "rope_theta": 1000000.0, "tie_word_embeddings": True, "vocab": 151936,
    },
    "llama-1.5b": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 20,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 4096,
        "rope_theta": 500000.0, "tie_word_embeddings": True, "vocab": 128256,
    },
    # --tiny: the same two architectures at test size.
    "tiny-qwen2": {
        "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "tie_word_embeddings": True, "vocab": 512,
    },
    "tiny-llama": {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
        "tie_word_embeddings": False, "vocab": 512,
    },
}
SMALL, LARGE = "qwen2-0.5b", "llama-1.5b"
TINY_NAMES = {SMALL: "tiny-qwen2", LARGE: "tiny-llama"}

# Shapes per mode. Lengths are maxima: each record draws its prompt / completion length between half and all.
SHAPES: dict[str, dict[str, int]] = {
    "gpu": dict(sft_batch=8, pair_batch=4, prompt_len=256, completion_len=512, ppo_prompts=16, ppo_prompt_len=128,
                max_new_tokens=64, samples_per_prompt=2, grpo_group=4, ppo_epochs=2, num_minibatches=2,
                warmup=2, steps=10, ppo_warmup=1, ppo_steps=2),
    "tiny": dict(sft_batch=4, pair_batch=4, prompt_len=8, completion_len=16, ppo_prompts=4, ppo_prompt_len=8,
                 max_new_tokens=8, samples_per_prompt=2, grpo_group=4, ppo_epochs=2, num_minibatches=2,
                 warmup=1, steps=2, ppo_warmup=1, ppo_steps=2),  # 3 rollouts: a first rollout whose group scores tie gives no update
}
LEARNING_RATE = {"gpu": 1e-5, "tiny": 1e-3}

STRATEGIES = ("single", "fsdp2", "deepspeed_zero2", "deepspeed_zero3", "fsdp")
CUDA_ONLY_STRATEGIES = ("fsdp", "deepspeed_zero2", "deepspeed_zero3")
OFFLINE_METHODS = ("sft", "rm", "dpo_live", "dpo_precomputed")
ONLINE_METHODS = ("ppo", "grpo")
METHODS = OFFLINE_METHODS + ONLINE_METHODS
VARIANTS = ("padding_free", "lora")
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
# Dense bf16 peak (TFLOP/s) by device name, from the vendors' datasheets (SXM parts).
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


@dataclasses.dataclass(frozen=True)
class Run:
    """One isolated run: a method (+ variants) on a model under a strategy; ``kind`` ``"train"``, or one of
    the three parts of the resume check (``"resume_full"``, ``"resume_first"``, ``"resume_second"``), or
    ``"matmul"`` (the bf16 matmul probe)."""

    model: str
    strategy: str
    method: str
    variants: tuple[str, ...] = ()
    kind: str = "train"

    @property
    def name(self) -> str:
        if self.kind == "matmul":
            return "probe/bf16-matmul"
        base = f"{self.model}/{self.strategy}/{self.method}" + "".join(f"+{v}" for v in self.variants)
        return base if self.kind == "train" else f"{base}:{self.kind.replace('resume_', 'resume-')}"

    @property
    def file_name(self) -> str:
        return self.name.replace("/", "__").replace(":", "_").replace("+", "_")


def build_plan(tiny: bool, resume_strategy: str) -> list[Run | list[Run]]:
    """Every run in priority order; a list is a group that runs in order (the resume check)."""
    small, large = (TINY_NAMES[SMALL], TINY_NAMES[LARGE]) if tiny else (SMALL, LARGE)
    plan: list[Run | list[Run]] = [] if tiny else [Run("", "", "", kind="matmul")]
    plan += [Run(small, "single", method) for method in ("sft", "rm", "dpo_live", "dpo_precomputed", "ppo")]
    for strategy in STRATEGIES[1:]:  # every strategy's first steps, on the three kinds of step
        plan += [Run(small, strategy, method) for method in ("sft", "dpo_live", "ppo")]
    plan.append([Run(small, resume_strategy, "dpo_live", kind=kind) for kind in ("resume_full", "resume_first", "resume_second")])
    plan += [
        Run(small, "single", "sft", ("padding_free",)), Run(small, "single", "dpo_live", ("padding_free",)),
        Run(small, "single", "sft", ("lora",)), Run(small, "single", "dpo_live", ("lora",)), Run(small, "single", "ppo", ("lora",)),
        Run(small, "single", "grpo"),
    ]
    plan += [Run(large, "single", method) for method in ("sft", "dpo_live", "ppo")]
    plan += [Run(large, strategy, "dpo_live") for strategy in ("fsdp2", "deepspeed_zero3")]
    for strategy in STRATEGIES[1:]:
        plan += [Run(small, strategy, method) for method in ("rm", "dpo_precomputed")]
    plan += [
        Run(small, "fsdp2", "dpo_live", ("padding_free",)), Run(small, "fsdp2", "dpo_live", ("lora",)),
        Run(small, "deepspeed_zero3", "dpo_live", ("lora",)), Run(small, "fsdp2", "grpo"), Run(small, "deepspeed_zero3", "grpo"),
    ]
    return plan


# ------------------------------------------------------------------------------------ what the checkout has


def _init_parameters(cls) -> set[str]:
    """Names of the ``__init__`` arguments of ``cls`` and of its bases (a subclass may pass ``**kwargs`` on)."""
    return {name for klass in cls.__mro__ if "__init__" in vars(klass) for name in inspect.signature(klass.__init__).parameters}


def _accepts(cls, name: str) -> bool:
    return name in _init_parameters(cls)


def _module_class(method: str):
    import rlhf_lightning.modules as modules

    names = {"sft": "SFTModule", "rm": "RewardModelModule", "dpo_live": "DPOModule", "dpo_precomputed": "DPOModule",
             "ppo": "PPOModule", "grpo": "GRPOModule"}
    return getattr(modules, names[method], None)


def _datamodule_class(method: str):
    from rlhf_lightning.data import DemonstrationDataModule, PreferenceDataModule, PromptDataModule

    return {"sft": DemonstrationDataModule, "rm": PreferenceDataModule, "dpo_live": PreferenceDataModule,
            "dpo_precomputed": PreferenceDataModule}.get(method, PromptDataModule)


def unsupported(run: Run, device: str) -> str | None:
    """Why ``run`` cannot run in this checkout / on this device, or None. Features built in parallel (GRPO,
    LoRA, padding-free batches) are detected here, so they join the check once they are merged."""
    if run.kind == "matmul":
        return "needs CUDA" if device != "cuda" else None
    if device != "cuda" and run.strategy in CUDA_ONLY_STRATEGIES:
        return f"needs CUDA ({run.strategy}: Lightning refuses it on CPU)"
    # find_spec, not import: importing deepspeed probes CUDA, and the parent keeps off the GPU.
    if run.strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (docs/gpu.md: the offline wheels)"
    module_class = _module_class(run.method)
    if module_class is None:
        return f"rlhf_lightning.modules has no {run.method.upper()}Module in this checkout"
    if "lora" in run.variants:
        if not _accepts(module_class, "peft"):
            return f"{module_class.__name__} does not accept `peft` (no LoRA support in this checkout)"
        try:
            import peft  # noqa: F401
        except ImportError:
            return "peft is not installed"
    if "padding_free" in run.variants and not (_accepts(module_class, "padding_free") or _accepts(_datamodule_class(run.method), "padding_free")):
        return f"neither {module_class.__name__} nor {_datamodule_class(run.method).__name__} accepts `padding_free` (not in this checkout)"
    return None


# ------------------------------------------------------------------------------------------- the child


# Ids of the word-level tokenizer that are not words: 4 special tokens and 5 punctuation marks.
NON_WORD_IDS = 9


def _tokenizer_dir(out: str, vocab: int) -> str:
    """A word-level tokenizer of exactly ``vocab`` ids (special tokens, punctuation, then words
    ``w0 w1 ...``), built once per vocabulary size with the embedded world's builder."""
    from rlhf_lightning.synthetic.tokenizer import build_word_level_tokenizer

    path = os.path.join(out, "tokenizers", f"words-{vocab}")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        tmp = f"{path}.tmp{os.getpid()}"
        tokenizer = build_word_level_tokenizer([f"w{i}" for i in range(vocab - NON_WORD_IDS)], tmp)
        if len(tokenizer) != vocab:
            raise RuntimeError(f"tokenizer has {len(tokenizer)} ids, expected {vocab}")
        os.replace(tmp, path) if not os.path.exists(path) else shutil.rmtree(tmp)
    return path


def _text(rng: random.Random, words: int, length: int) -> str:
    return " ".join(f"w{rng.randrange(words)}" for _ in range(length))


def make_records(method: str, shapes: dict[str, int], words: int, seed: int = 0) -> list[dict[str, str]]:
    """One batch of records of random words (one token each): lengths drawn between half and all of the
    configured maxima, so a padded batch carries realistic padding."""
    rng = random.Random(seed)

    def length(maximum: int) -> int:
        return rng.randint(max(1, maximum // 2), maximum)

    if method == "sft":
        return [{"prompt": _text(rng, words, length(shapes["prompt_len"])), "completion": _text(rng, words, length(shapes["completion_len"]))}
                for _ in range(shapes["sft_batch"])]
    if method in ("rm", "dpo_live", "dpo_precomputed"):
        return [{"prompt": _text(rng, words, length(shapes["prompt_len"])), "chosen": _text(rng, words, length(shapes["completion_len"])),
                 "rejected": _text(rng, words, length(shapes["completion_len"]))} for _ in range(shapes["pair_batch"])]
    return [{"prompt": _text(rng, words, length(shapes["ppo_prompt_len"]))} for _ in range(shapes["ppo_prompts"])]


def distinct_word_fraction(prompts: list[str], completions: list[str]) -> list[float]:
    """The online runs' reward: the fraction of distinct words in a completion (cheap, and it varies)."""
    return [len(set(c.split())) / max(1, len(c.split())) for c in completions]


def matmul_params(model) -> int:
    """Parameters that take part in matrix products: all but the input embedding, unless it is tied to the
    output layer (then it is the LM head's matrix and counts once)."""
    import torch

    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(embeddings, torch.nn.Module):
        tied = output is not None and getattr(output, "weight", None) is embeddings.weight
        if not tied:
            total -= embeddings.weight.numel()
    return total


def count_tokens(method: str, features: list[dict[str, Any]]) -> int:
    """Useful tokens of a batch of tokenized records (prompt + completion per sequence; both sequences of a pair)."""
    total = 0
    for f in features:
        prompt = len(f.get("prompt_ids", ()))
        if method == "sft":
            total += prompt + len(f["completion_ids"])
        else:
            total += 2 * prompt + len(f["chosen_ids"]) + len(f["rejected_ids"])
    return total


def step_flops(method: str, n: int, tokens: float, *, lora: bool, ppo: dict[str, float] | None = None) -> tuple[float, float]:
    """(trained FLOPs, all model FLOPs) of one step (see the module docstring).

    Offline: ``tokens`` are the batch's useful tokens. Online (``ppo``): ``rollout_tokens`` (prompt +
    completion tokens of the rollout), ``decoded`` (generated positions), ``epochs``, and ``value_forward``
    / ``reference_forward`` (1 when the rollout has that forward, else 0).
    """
    train = (4 if lora else 6) * n
    if method in ("sft", "rm", "dpo_precomputed"):
        return train * tokens, train * tokens
    if method == "dpo_live":
        return train * tokens, (train + 2 * n) * tokens
    assert ppo is not None
    trained = train * ppo["rollout_tokens"] * ppo["epochs"]
    frozen = 2 * n * (ppo["decoded"] + ppo["rollout_tokens"] * (1 + ppo["reference_forward"]))
    return trained, trained + frozen


def _strategy_spec(strategy: str) -> tuple[dict[str, Any] | None, str]:
    """(the ``trainer.strategy`` spec, ``trainer.precision``) of ``configs/strategy/<strategy>.yaml``;
    ``single``: (None, the DDP file's precision)."""
    import yaml

    name = "ddp" if strategy == "single" else strategy
    with open(os.path.join(REPO, "configs", "strategy", f"{name}.yaml")) as handle:
        trainer = yaml.safe_load(handle)["trainer"]
    return (None if strategy == "single" else trainer["strategy"]), trainer["precision"]


def instantiate_strategy(spec: dict[str, Any]):
    """The strategy object from its ``class_path``/``init_args``, built as LightningCLI's parser builds it."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=Strategy)
    return parser.instantiate(parser.parse_object({"strategy": spec})).strategy


def _module_kwargs(run: Run, cls, spec: dict[str, Any], tokenizer: str, shapes: dict[str, int], lr: float) -> dict[str, Any]:
    from rlhf_lightning.modules import Optimization
    from rlhf_lightning.rewards import FunctionRewardSource

    optim = Optimization(lr=lr, schedule="constant", warmup_steps=0, weight_decay=0.0)
    kwargs: dict[str, Any] = {"tokenizer": tokenizer, "optim": optim}
    if run.method in ONLINE_METHODS:
        group = shapes["grpo_group"] if run.method == "grpo" else shapes["samples_per_prompt"]
        kwargs.update(
            policy=spec, reward=FunctionRewardSource(distinct_word_fraction, batched=True),
            sampling={"max_new_tokens": shapes["max_new_tokens"], "num_samples_per_prompt": group},
            ppo_epochs=shapes["ppo_epochs"], num_minibatches=shapes["num_minibatches"], log_samples_every_n_steps=0, seed=0,
        )
    else:
        kwargs["model"] = spec
    if run.method.startswith("dpo"):
        kwargs["precompute_reference"] = run.method == "dpo_precomputed"
    if "lora" in run.variants:
        kwargs["peft"] = dict(LORA)
    if _accepts(cls, "padding_free"):
        kwargs["padding_free"] = "padding_free" in run.variants  # the padded path is the baseline
    accepted = _init_parameters(cls)
    if "policy" in kwargs and "policy" not in accepted and "model" in accepted:
        kwargs["model"] = kwargs.pop("policy")
    return {k: v for k, v in kwargs.items() if k in accepted}


def run_child(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """One run in this (fresh) process; returns the result record."""
    started = time.perf_counter()
    if run.kind == "matmul":
        return matmul_probe()
    import torch

    if run.kind.startswith("resume"):
        # Deterministic kernels, so that a resumed run can equal an uninterrupted one bit for bit.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        if args.device == "cuda":  # the fused attention backwards accumulate with atomics; the math one does not
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
            torch.backends.cuda.enable_cudnn_sdp(False)
    import lightning as L

    from rlhf_lightning.models import load_tokenizer

    mode = "tiny" if args.tiny else "gpu"
    shapes = dict(SHAPES[mode])
    shapes["steps"] = max(2, round(shapes["steps"] * args.budget))
    shapes["ppo_steps"] = max(1, round(shapes["ppo_steps"] * args.budget))
    online = run.method in ONLINE_METHODS
    warmup, timed = (shapes["ppo_warmup"], shapes["ppo_steps"]) if online else (shapes["warmup"], shapes["steps"])
    if run.kind.startswith("resume"):
        warmup, timed = 0, 2 * args.resume_steps  # K + M steps; timing is not the point here
    total_steps = warmup + timed
    max_steps = args.resume_steps if run.kind == "resume_first" else total_steps

    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    model_spec = dict(MODELS[run.model])
    vocab = model_spec.pop("vocab")
    tokenizer_dir = _tokenizer_dir(args.out, vocab)
    records = make_records(run.method, shapes, vocab - NON_WORD_IDS)
    module_class = _module_class(run.method)
    datamodule_class = _datamodule_class(run.method)
    batch_size = len(records)
    data_kwargs: dict[str, Any] = {"dataset": records, "batch_size": batch_size, "shuffle": False}
    if _accepts(datamodule_class, "padding_free"):  # the padded path is the baseline
        data_kwargs["padding_free"] = "padding_free" in run.variants
    datamodule = datamodule_class(**data_kwargs)

    torch.manual_seed(0)
    kwargs = _module_kwargs(run, module_class, model_spec, tokenizer_dir, shapes, LEARNING_RATE[mode])
    with torch.device(device):  # random init straight on the device (fast for a 1.5B model)
        module = module_class(**kwargs)
    policy = module.policy
    n = matmul_params(policy)
    params_total = sum(p.numel() for p in module.parameters())
    params_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)

    spec, precision = _strategy_spec(run.strategy)
    strategy: Any = "auto"
    if device.type == "cpu":
        precision = "32-true"  # bf16 matmuls are slow on most CPUs; the smoke mode checks paths, not speed
        if spec is not None and spec["class_path"].endswith("FSDP2Strategy"):
            spec = {**spec, "init_args": {**spec.get("init_args", {}), "param_dtype": None, "reduce_dtype": None}}
    if spec is not None:
        strategy = instantiate_strategy(spec)

    tokenizer = load_tokenizer(tokenizer_dir, padding_side="left")
    generation: dict[str, Any] = {}
    if online:
        generation["bare"] = bare_generate(policy, tokenizer, records, shapes, kwargs["sampling"]["num_samples_per_prompt"], device)

    recorder = _recorder(device, run.method)
    work = os.path.join(args.out, "work", run.file_name)
    shutil.rmtree(work, ignore_errors=True)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, strategy=strategy, precision=precision,
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[recorder],
        default_root_dir=work,
    )
    checkpoint = os.path.join(args.out, "work", Run(run.model, run.strategy, run.method, run.variants, "resume_first").file_name + "-ckpt")
    ckpt_path = checkpoint if run.kind == "resume_second" else None
    import rlhf_lightning.rollout as rollout_lib

    original_generate = rollout_lib.generate
    rollout_lib.generate = recorder.wrap_generate(original_generate)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the generation baseline's cached blocks must not count as the fit's peak
        torch.cuda.reset_peak_memory_stats(device)
    setup_s = time.perf_counter() - started
    fit_started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        rollout_lib.generate = original_generate
    fit_s = time.perf_counter() - fit_started
    if run.kind == "resume_first":
        shutil.rmtree(checkpoint, ignore_errors=True)
        trainer.save_checkpoint(checkpoint)

    peak = {}
    if device.type == "cuda":
        peak = {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    else:
        import resource

        peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    steps = recorder.steps
    if not steps:
        raise RuntimeError(f"no training step was recorded (trainer.global_step = {trainer.global_step})")
    timed_steps = steps[warmup:] if len(steps) > warmup else steps
    step_s = sorted(s["seconds"] for s in timed_steps)[len(timed_steps) // 2]
    features = _features(datamodule)
    lora = "lora" in run.variants
    if online:
        episodes = batch_size * kwargs["sampling"]["num_samples_per_prompt"]
        rollout_tokens = _median([s.get("rollout_tokens", 0.0) for s in timed_steps])
        decoded = _median([s.get("decoded", 0.0) for s in timed_steps])
        tokens, items, item_kind = rollout_tokens, episodes, "episodes"
        flops = step_flops(run.method, n, tokens, lora=lora, ppo={
            "rollout_tokens": rollout_tokens, "decoded": decoded, "epochs": shapes["ppo_epochs"],
            "reference_forward": 1.0,
        })
        in_step = sum(s.get("decoded", 0.0) for s in timed_steps) / max(1e-12, sum(s.get("generate_s", 0.0) for s in timed_steps))
        generation.update(in_step_tokens_per_s=in_step, in_step_over_bare=in_step / generation["bare"]["tokens_per_s"])
    else:
        tokens = float(count_tokens(run.method, features)) if features is not None else float("nan")
        items, item_kind = batch_size, ("sequences" if run.method == "sft" else "pairs")
        flops = step_flops(run.method, n, tokens, lora=lora)
    computed = _median([s.get("computed_tokens", float("nan")) for s in timed_steps])

    losses = [s["loss"] for s in steps]
    kls = [s.get("kl") for s in steps] if online else None
    checks = loss_checks(run.method, run.kind, losses, kls)
    # One optimizer step per recorded batch (PPO: one counted step per rollout), as the module promises.
    checks["global_step_counts_batches"] = trainer.global_step == len(steps) + (args.resume_steps if run.kind == "resume_second" else 0)
    peak_tflops = args.peak_tflops
    result = {
        "n_matmul_params": n, "params_total": params_total, "params_trainable": params_trainable,
        "strategy_class": type(trainer.strategy).__name__,
        # FSDP2 computes in its plan's param_dtype whatever the trainer precision says.
        "precision": precision + (f", param_dtype {trainer.strategy.plan.param_dtype}" if hasattr(trainer.strategy, "plan") else ""),
        "warmup_steps": warmup if not run.kind.startswith("resume") else 0, "timed_steps": len(timed_steps),
        "step_seconds": [s["seconds"] for s in steps], "median_step_s": step_s,
        "tokens_per_step": tokens, "computed_tokens_per_step": computed, "items_per_step": items, "item_kind": item_kind,
        "tokens_per_s": tokens / step_s, "items_per_s": items / step_s,
        "train_flops_per_step": flops[0], "all_flops_per_step": flops[1],
        "peak_tflops": peak_tflops,
        "mfu": flops[0] / step_s / (peak_tflops * 1e12) if peak_tflops else None,
        "mfu_all": flops[1] / step_s / (peak_tflops * 1e12) if peak_tflops else None,
        "losses": losses, "loss_key": recorder.loss_key, "checks": checks, "generation": generation or None,
        "setup_s": setup_s, "fit_s": fit_s, **peak,
    }
    if online:
        result["kl"] = kls
    return result


def loss_checks(method: str, kind: str, losses: list[float | None], kls: list[float | None] | None) -> dict[str, Any]:
    """Whether training worked, from the per-step losses (and, online, the rollout KLs to the reference).

    ``loss_finite``: every step's loss is finite. ``moved``: offline, the last loss is below the first (the
    same batch every step); online, the last rollout's KL is above 0 (the policy left the reference), or,
    when no KL is logged, the loss changed. DPO's first loss is ln 2 (policy == reference) and PPO's first
    rollout KL 0 (checked on the runs that start from step 0).
    """
    finite = all(v is not None and math.isfinite(v) for v in losses)
    checks: dict[str, Any] = {"loss_finite": finite}
    from_start = kind in ("train", "resume_full", "resume_first")
    if kls is not None and any(kl is not None for kl in kls):
        checks["moved"] = bool(kls[-1] is not None and kls[-1] > 1e-6)
        checks["moved_rule"] = "rollout KL to the reference > 0 at the last step"
        if from_start:
            checks["first_rollout_kl"] = kls[0]
            checks["first_rollout_kl_is_0"] = kls[0] is not None and abs(kls[0]) < 1e-3
    elif kls is not None:
        checks["moved"] = bool(finite and len(set(losses)) > 1)
        checks["moved_rule"] = "the loss changed (no rollout KL logged)"
    else:
        checks["moved"] = bool(finite and len(losses) > 1 and losses[-1] < losses[0])
        checks["moved_rule"] = "last loss < first loss (the same batch every step)"
        if method.startswith("dpo") and from_start:
            checks["first_loss_is_ln2"] = losses[0] is not None and abs(losses[0] - math.log(2)) < 1e-3
    return checks


def _features(datamodule) -> list[dict[str, Any]] | None:
    """The tokenized training records (``prompt_ids`` + ``completion_ids`` / ``chosen_ids`` / ``rejected_ids``)."""
    data = getattr(getattr(datamodule, "train_set", None), "data", None)
    return getattr(data, "features", None)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def bare_generate(policy, tokenizer, records, shapes, samples: int, device) -> dict[str, Any]:
    """Decoded positions per second of a plain ``policy.generate`` on the run's prompts (repeat-interleaved
    per sample), with the run's sampling settings; one untimed call, then two timed ones."""
    import torch

    texts = [r["prompt"] for r in records]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    ids = encoded["input_ids"].to(device).repeat_interleave(samples, 0)
    mask = encoded["attention_mask"].to(device).repeat_interleave(samples, 0)
    # Every strategy config computes in bf16 on CUDA (autocast, DeepSpeed's bf16 weights, FSDP2's param_dtype).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    was_training = policy.training
    policy.eval()
    times, tokens = [], []
    for i in range(3):
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad(), autocast:
            out = policy.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=shapes["max_new_tokens"], do_sample=True, temperature=1.0,
                top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
            )
        _sync(device)
        if i > 0:
            times.append(time.perf_counter() - start)
            tokens.append(out[:, ids.shape[1]:].numel())
    policy.train(was_training)
    return {"tokens_per_s": sum(tokens) / sum(times), "seconds": times, "decoded_per_call": tokens[-1],
            "autocast_bf16": device.type == "cuda"}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _recorder(device, method: str):
    """A Lightning callback recording, per training step: wall seconds (synchronised), the loss, padded
    tokens of the batch, and for online methods the rollout KL and the ``generate`` calls inside the step."""
    import lightning as L
    import torch

    loss_keys = ("loss/policy",) if method in ONLINE_METHODS else ("train/loss",)

    class StepRecorder(L.Callback):
        def __init__(self):
            self.steps: list[dict[str, Any]] = []
            self.current: dict[str, Any] = {}
            self.loss_key: str | None = None

        def wrap_generate(self, generate):
            def timed(*a, **k):
                _sync(device)
                start = time.perf_counter()
                out = generate(*a, **k)
                _sync(device)
                self.current["generate_s"] = self.current.get("generate_s", 0.0) + time.perf_counter() - start
                self.current["decoded"] = self.current.get("decoded", 0.0) + float(out.completion_ids.numel())
                self.current["rollout_tokens"] = self.current.get("rollout_tokens", 0.0) + float(out.attention_mask.sum())
                # Online steps compute on the rollout, not on the prompt batch: count its padded positions.
                self.current["computed_tokens"] = self.current.get("rollout_computed", 0.0) + float(out.input_ids.numel())
                self.current["rollout_computed"] = self.current["computed_tokens"]
                return out

            return timed

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            computed = sum(v.numel() for k, v in batch.items() if k.endswith("input_ids") and isinstance(v, torch.Tensor))
            self.current = {} if method in ONLINE_METHODS else {"computed_tokens": float(computed)}
            _sync(device)
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(device)
            self.current["seconds"] = time.perf_counter() - self._start
            metrics = trainer.callback_metrics
            key = next((k for k in loss_keys if k in metrics), None) or next((k for k in metrics if "loss" in k), None)
            self.loss_key = key
            self.current["loss"] = float(metrics[key]) if key is not None else None
            if "kl" in metrics:
                self.current["kl"] = float(metrics["kl"])
            self.steps.append(self.current)

    return StepRecorder()


def matmul_probe() -> dict[str, Any]:
    """bf16 8192^3 matrix products on random data: the device's measured ceiling (mean of 10 after 3 warm-ups)."""
    import torch

    device = torch.device("cuda")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    return {"bf16_matmul_tflops": 2 * 8192**3 / seconds / 1e12, "device_name": torch.cuda.get_device_name(device)}


# ---------------------------------------------------------------------------------------------- the parent


def _versions() -> dict[str, str]:
    """Installed versions, read from package metadata (importing deepspeed would touch the GPU)."""
    import importlib.metadata

    versions = {"python": platform.python_version()}
    for name in ("torch", "lightning", "transformers", "deepspeed", "peft", "jsonargparse"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _device_name(device: str) -> str:
    if device != "cuda":
        return f"cpu ({os.cpu_count()} cores)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "cuda (nvidia-smi gave nothing)"
    except (OSError, subprocess.TimeoutExpired):
        return "cuda (no nvidia-smi)"


def default_peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None


class Check:
    """The parent: runs the plan, one subprocess per run, and keeps results.json / results.md current."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.started = time.perf_counter()
        self.results: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.header: dict[str, Any] = {}
        self.lock = threading.Lock()  # --jobs > 1: runs finish on several threads

    def remaining(self) -> float:
        return self.args.time_limit - (time.perf_counter() - self.started)

    def record(self, run: Run, result: dict[str, Any]) -> None:
        self.results[run.name] = {"name": run.name, "model": run.model, "strategy": run.strategy, "method": run.method,
                                  "variants": list(run.variants), "kind": run.kind, **result}
        self.write()

    def launch(self, run: Run) -> dict[str, Any]:
        """Run ``run`` in a fresh process (or explain why not); returns its result record."""
        reason = unsupported(run, self.args.device)
        if reason is not None:
            return {"status": "skipped", "reason": reason}
        remaining = self.remaining()
        if remaining < self.args.min_start:
            return {"status": "skipped", "reason": f"time limit ({self.args.time_limit:.0f} s) reached"}
        timeout = min(self.args.run_timeout, remaining)
        log_path = os.path.join(self.args.out, "logs", f"{run.file_name}.log")
        result_path = os.path.join(self.args.out, "logs", f"{run.file_name}.json")
        for path in (result_path,):
            if os.path.exists(path):
                os.remove(path)
        command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(dataclasses.asdict(run)), "--result", result_path,
                   *self.child_arguments()]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        if self.args.device == "cpu":
            env.setdefault("OMP_NUM_THREADS", "1")
        for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)
        print(f"[{time.perf_counter() - self.started:6.0f} s] {run.name} ...", flush=True)
        start = time.perf_counter()
        with open(log_path, "w") as log:
            try:
                completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=REPO)
                returncode: int | None = completed.returncode
            except subprocess.TimeoutExpired:
                returncode = None
        seconds = time.perf_counter() - start
        if returncode == 0 and os.path.exists(result_path):
            with open(result_path) as handle:
                result = {"status": "ok", **json.load(handle)}
        elif returncode is None:
            result = {"status": "failed", "reason": f"timed out after {timeout:.0f} s", "log_tail": _tail(log_path)}
        else:
            result = {"status": "failed", "reason": f"exit code {returncode}", "log_tail": _tail(log_path)}
        result["wall_s"] = seconds
        print(f"[{time.perf_counter() - self.started:6.0f} s] {run.name}: {result['status']}"
              + (f" ({result['reason']})" if "reason" in result else ""), flush=True)
        return result

    def child_arguments(self) -> list[str]:
        a = self.args
        out = ["--out", a.out, "--device", a.device, "--budget", str(a.budget), "--resume-steps", str(a.resume_steps)]
        if a.tiny:
            out.append("--tiny")
        if a.peak_tflops:
            out += ["--peak-tflops", str(a.peak_tflops)]
        return out

    def run_group(self, group: list[Run]) -> None:
        """The resume check: its three runs in order (each later one needs the earlier), then the comparison."""
        full, first, second = group
        results = {}
        for run in group:
            if run is second and results[first.name]["status"] != "ok":
                result = {"status": "skipped", "reason": "the checkpointing run did not finish"}
            else:
                result = self.launch(run)
            results[run.name] = result
            self.record(run, result)
        verdict = compare_resume(results[full.name], results[second.name], self.args.resume_steps, self.args.resume_tol)
        self.header["resume"] = {"strategy": full.strategy, "model": full.model, "method": full.method, **verdict}
        shutil.rmtree(os.path.join(self.args.out, "work", first.file_name + "-ckpt"), ignore_errors=True)
        self.write()

    def execute(self, plan: list[Run | list[Run]]) -> None:
        self.header.update({
            "device": _device_name(self.args.device), "versions": _versions(), "budget": self.args.budget,
            "mode": "tiny" if self.args.tiny else "gpu", "time_limit_s": self.args.time_limit,
            "peak_tflops": self.args.peak_tflops,
            "peak_source": self.args.peak_source, "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        })
        for item in plan:
            for run in item if isinstance(item, list) else [item]:
                self.order.append(run.name)
        jobs = [item for item in plan]
        if self.args.jobs > 1:
            with ThreadPoolExecutor(max_workers=self.args.jobs) as pool:
                list(pool.map(self._do, jobs))
        else:
            for item in jobs:
                self._do(item)
        self.header["total_s"] = time.perf_counter() - self.started
        self.write()

    def _do(self, item: Run | list[Run]) -> None:
        if isinstance(item, list):
            self.run_group(item)
            return
        result = self.launch(item)
        if item.kind == "matmul" and result["status"] == "ok":
            self.header["bf16_matmul_tflops"] = result["bf16_matmul_tflops"]
        self.record(item, result)

    def write(self) -> None:
        with self.lock:
            self._write()

    def _write(self) -> None:
        ordered = [self.results[name] for name in self.order if name in self.results]
        document = {**self.header, "elapsed_s": time.perf_counter() - self.started, "runs": ordered}
        tmp = os.path.join(self.args.out, "results.json.tmp")
        with open(tmp, "w") as handle:
            json.dump(document, handle, indent=1, default=_json_default)
        os.replace(tmp, os.path.join(self.args.out, "results.json"))
        with open(os.path.join(self.args.out, "results.md"), "w") as handle:
            handle.write(to_markdown(document))


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return ""


def compare_resume(full: dict[str, Any], resumed: dict[str, Any], k: int, tol: float) -> dict[str, Any]:
    """Losses of steps ``k ..`` of the uninterrupted run against the resumed run's."""
    if full.get("status") != "ok" or resumed.get("status") != "ok":
        return {"status": "not run", "reason": "a resume run failed or was skipped (see its row)"}
    expected, got = full["losses"][k:], resumed["losses"]
    if len(expected) != len(got) or not got:
        return {"status": "failed", "reason": f"{len(got)} steps after resume, expected {len(expected)}"}
    diffs = [abs(a - b) for a, b in zip(expected, got)]
    equal = max(diffs) <= tol
    return {"status": "ok" if equal else "failed", "losses_uninterrupted": expected, "losses_resumed": got,
            "max_abs_diff": max(diffs), "bitwise_equal": expected == got, "tolerance": tol}


# ------------------------------------------------------------------------------------------------ report


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def to_markdown(document: dict[str, Any]) -> str:
    runs = [r for r in document["runs"] if r["kind"] != "matmul" or r["status"] != "ok"]  # a probe that ran is in the header
    peak = document.get("peak_tflops")
    lines = [
        "# GPU check", "",
        f"Device: {document['device']}; " + ", ".join(f"{k} {v}" for k, v in document["versions"].items()) + ".",
        f"Mode {document['mode']}, budget {document['budget']}, {document.get('elapsed_s', 0):.0f} s of a {document['time_limit_s']:.0f} s limit; "
        f"started {document['started_utc']}.",
        (f"MFU against {peak} TFLOP/s dense bf16 ({document['peak_source']})" if peak else "MFU not computed (no peak for this device; --peak-tflops)")
        + (f"; this device's measured bf16 8192^3 matmul: {document['bf16_matmul_tflops']:.0f} TFLOP/s." if document.get("bf16_matmul_tflops") else "."),
        "",
        "| run | status | step (s) | tokens/s | items/s | MFU | MFU all | peak mem (GiB) | gen tok/s in step / bare | loss first -> last | finite | moved |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in runs:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['status']}: {r.get('reason', '')} | | | | | | | | | | |")
            continue
        memory = r.get("peak_allocated_gib")
        memory_text = _fmt(memory, ".1f") if memory is not None else f"{_fmt(r.get('peak_rss_mib'), '.0f')} MiB RSS"
        gen = r.get("generation") or {}
        gen_text = f"{_fmt(gen.get('in_step_tokens_per_s'), '.0f')} / {_fmt(gen.get('bare', {}).get('tokens_per_s'), '.0f')} ({_fmt(gen.get('in_step_over_bare'), '.2f')}x)" if gen else ""
        losses = r["losses"]
        checks = r["checks"]
        lines.append(
            f"| {r['name']} | ok | {_fmt(r['median_step_s'])} | {_fmt(r['tokens_per_s'], '.0f')} | {_fmt(r['items_per_s'], '.3g')} {r['item_kind']} "
            f"| {_percent(r['mfu'])} | {_percent(r['mfu_all'])} "
            f"| {memory_text} | {gen_text} | {_fmt(losses[0], '.4g')} -> {_fmt(losses[-1], '.4g')} "
            f"| {'yes' if checks['loss_finite'] else 'NO'} | {'yes' if checks['moved'] else 'NO'} |"
        )
    precisions = {r["strategy"]: f"{r['strategy_class']} {r['precision']}" for r in runs if r["status"] == "ok" and r["kind"] != "matmul"}
    if precisions:
        lines += ["", "Strategies as run: " + "; ".join(f"{name}: {text}" for name, text in precisions.items()) + "."]
    flagged = [(r["name"], k) for r in runs if r["status"] == "ok" for k, v in r["checks"].items() if isinstance(v, bool) and not v]
    if flagged:
        lines += ["", "Checks that failed: " + "; ".join(f"{name}: {check}" for name, check in flagged) + "."]
    resume = document.get("resume")
    if resume:
        lines += ["", f"Resume ({resume['model']}, {resume['strategy']}, {resume['method']}): **{resume['status']}**"]
        if "max_abs_diff" in resume:
            lines[-1] += (f", max |loss difference| {resume['max_abs_diff']:.3g} (tolerance {resume['tolerance']:.0e}), "
                          f"bitwise equal: {resume['bitwise_equal']}; uninterrupted {resume['losses_uninterrupted']}, "
                          f"resumed {resume['losses_resumed']}.")
        elif "reason" in resume:
            lines[-1] += f": {resume['reason']}."
    failures = [r for r in runs if r["status"] == "failed"]
    if failures:
        lines += ["", "## Failures", ""]
        for r in failures:
            lines += [f"### {r['name']}: {r['reason']}", "", "```", r.get("log_tail", "").rstrip(), "```", ""]
    lines += ["", "Columns: step = median wall time of a timed step; tokens/s = useful (non-padding) tokens; items = sequences, "
              "pairs or episodes; MFU = 6N x tokens / time (4N with LoRA; PPO: x ppo_epochs) over the peak; MFU all adds "
              "frozen forwards and generation; gen tok/s = decoded positions per second in the step vs a bare "
              "`model.generate`; moved = last loss < first (offline) or rollout KL > 0 (online). "
              "Definitions: scripts/gpu_check.py's docstring."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check", help="output folder: results.json, results.md, logs/ (default: gpu_check)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (the check) or cpu (smoke mode, with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="test-size models and shapes (the CPU smoke mode)")
    parser.add_argument("--budget", type=float, default=1.0, help="scales the timed steps (0.5: half as many; at least 2 offline, 1 online)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds for the whole check; runs that would start later are skipped (default 420 on cuda, 1800 on cpu)")
    parser.add_argument("--run-timeout", type=float, default=None, help="seconds per run (default 180 on cuda, 600 on cpu)")
    parser.add_argument("--min-start", type=float, default=20.0, help="do not start a run with fewer seconds than this left")
    parser.add_argument("--runs", nargs="+", default=None, help="only runs whose name matches one of these patterns (fnmatch; see --list)")
    parser.add_argument("--list", action="store_true", help="print the plan (run names, in order) and exit")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by device name, e.g. 989.4 for H100/H200)")
    parser.add_argument("--resume-strategy", default=None, help="strategy of the resume check (default deepspeed_zero3; fsdp2 on cpu)")
    parser.add_argument("--resume-steps", type=int, default=3, help="K: steps before the checkpoint (and M: after it)")
    parser.add_argument("--resume-tol", type=float, default=1e-5, help="largest |loss difference| that counts as equal after resume")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (cpu only: timings on one GPU must not overlap)")
    parser.add_argument("--keep-work", action="store_true", help="keep out/work (checkpoints of the resume check)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return parser


def select(plan: list[Run | list[Run]], patterns: list[str] | None) -> list[Run | list[Run]]:
    if not patterns:
        return plan
    selected: list[Run | list[Run]] = []
    for item in plan:
        names = [r.name for r in (item if isinstance(item, list) else [item])]
        if any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in patterns):
            selected.append(item)
    return selected


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child is not None:
        run = Run(**{**json.loads(args.child), "variants": tuple(json.loads(args.child)["variants"])})
        result = run_child(run, args)
        tmp = args.result + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(result, handle, default=_json_default)
        os.replace(tmp, args.result)
        return 0

    if args.device == "cuda" and args.jobs != 1:
        raise SystemExit("--jobs > 1 only on cpu: runs sharing one GPU would measure each other")
    cuda = args.device == "cuda"
    args.time_limit = args.time_limit if args.time_limit is not None else (420.0 if cuda else 1800.0)
    args.run_timeout = args.run_timeout if args.run_timeout is not None else (180.0 if cuda else 600.0)
    args.resume_strategy = args.resume_strategy or ("deepspeed_zero3" if cuda else "fsdp2")
    plan = select(build_plan(args.tiny, args.resume_strategy), args.runs)
    if args.list:
        for item in plan:
            for run in item if isinstance(item, list) else [item]:
                print(run.name)
        return 0
    if not plan:
        raise SystemExit(f"no run matches {args.runs}; see --list")
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda, but torch sees no CUDA device (use --device cpu --tiny for the smoke mode)")
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    args.out = os.path.abspath(args.out)
    device_name = _device_name(args.device)
    if args.peak_tflops is None and cuda:
        args.peak_tflops = default_peak_tflops(device_name)
        args.peak_source = f"datasheet dense bf16 for {device_name.split(',')[0]}" if args.peak_tflops else "unknown device"
    else:
        args.peak_source = "--peak-tflops" if args.peak_tflops else "none on cpu"
    # Tokenizers are built once here, not in every child.
    for model in {r.model for item in plan for r in (item if isinstance(item, list) else [item]) if r.model}:
        _tokenizer_dir(args.out, MODELS[model]["vocab"])
    check = Check(args)
    check.execute(plan)
    if not args.keep_work:
        shutil.rmtree(os.path.join(args.out, "work"), ignore_errors=True)
    document = json.load(open(os.path.join(args.out, "results.json")))
    print(to_markdown(document))
    failed = [r["name"] for r in document["runs"] if r["status"] == "failed"]
    bad_checks = [r["name"] for r in document["runs"] if r["status"] == "ok" and r.get("checks")
                  and not all(v for v in r["checks"].values() if isinstance(v, bool))]
    resume = document.get("resume", {}).get("status")
    print(f"{len(document['runs'])} runs: {sum(r['status'] == 'ok' for r in document['runs'])} ok, {len(failed)} failed, "
          f"{sum(r['status'] == 'skipped' for r in document['runs'])} skipped; checks failed in {len(bad_checks)}; resume {resume}")
    return 1 if failed or bad_checks or resume == "failed" else 0


if __name__ == "__main__":
    raise SystemExit(main())
