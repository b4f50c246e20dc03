"""The reward-model, DPO, PPO and critic-free (GRPO, REINFORCE++) runs that tests/distributed compares across strategies.

One function, :func:`run_variant`, builds a tiny module and DataModule and fits a few steps under the
strategy asked for; the single-process run and the 2-process runs (DDP, FSDP2) call the very same code.
Each rank records its per-step metrics, the HF export of the trained model is written, and rank 0 saves
the trained (possibly still sharded) model's outputs on fixed inputs, to compare with the export.

Run as a script, it is what each of the two processes executes:
``python parity_kit.py <ddp|fsdp2|single> <devices> <out_dir> <tokenizer_dir> [variant ...]``.

What "the same global batch" means here
---------------------------------------
The single process takes batches of ``2b`` records; each of the two ranks takes ``b``. Data are not
shuffled, so a ``DistributedSampler(shuffle=False)`` gives rank r the records ``r, r + 2, r + 4, ...``:
global batch k of the 2-rank run holds exactly the records of the single process's batch k. (Lightning's
own distributed sampler always shuffles training data, whatever the DataLoader says, so the runs here
set ``use_distributed_sampler=False`` and attach that sampler themselves.) Gradients are averaged over
ranks, so each update equals the single-process update on the union, provided the loss is a mean over
equally many terms per rank:

* reward-model and DPO losses are means over pairs, and each rank has ``b`` pairs: the mean of the
  two rank losses is the single-process loss;
* PPO's losses are means over completion *tokens*. With sampled completions both setups would draw
  different samples (the sampling seed includes the rank), and with per-rank token counts that differ
  the mean of per-rank token means is not the global token mean (a property of data-parallel PPO, not
  a bug). So rollouts are greedy (deterministic given the weights) and every completion is exactly
  ``MAX_NEW_TOKENS`` long (``min_new_tokens`` in the policy's generation config keeps EOS out until
  then): both ranks then hold the same number of tokens, and the 2-rank rollout is the single-process
  rollout split in two. ``num_minibatches=1`` keeps each minibatch the whole (per-rank) rollout, since
  minibatch order is drawn per rank; ``ppo_epochs=2`` makes the second epoch's loss depend on the
  first update. Advantages are whitened over all ranks by the module, as one process whitens its
  whole rollout. Prompts all have the same token length, so left padding is the same in both setups.
* the critic-free family follows PPO's recipe. REINFORCE++ normalises its returns over all ranks (the
  module all-reduces the moments), as one process normalises its whole rollout. GRPO with greedy
  rollouts has identical completions in each group (zero advantages), so its run takes a reference that
  is *not* the initial policy (another tiny model): the in-loss k3 KL then drives the updates, and the
  per-rank sequence means average to the global one because every rank holds as many sequences.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from conftest import TINY_LLAMA  # noqa: E402

from rlhf_lightning.callbacks.hf_export import HFExport  # noqa: E402
from rlhf_lightning.data import PreferenceDataModule, PromptDataModule  # noqa: E402
from rlhf_lightning.generation import SamplingConfig, generate  # noqa: E402
from rlhf_lightning.models import reward_model_scores  # noqa: E402
from rlhf_lightning.modules import DPOModule, Optimization, PolicyGradientModule, PPOModule, RewardModelModule  # noqa: E402
from rlhf_lightning.rewards import FunctionRewardSource  # noqa: E402
from rlhf_lightning.strategies import FSDP2Strategy, is_fsdp2_sharded  # noqa: E402

MAX_STEPS = 3
GLOBAL_BATCH = 4
MAX_NEW_TOKENS = 4
# Fixed inputs on which the trained model and its HF export must agree: (B, T) ids, all real tokens.
PROBE_IDS = [[2, 10, 11, 12, 13, 14, 3], [2, 20, 21, 22, 23, 24, 25]]
# Prompts for the generation check after PPO: (B, P), no padding.
GENERATION_PROMPTS = [[2, 30, 31, 32], [2, 40, 41, 42]]
GENERATION_TOKENS = 6
ASSETS = os.path.join(TESTS, "assets")

# variant -> (method, module options, FSDP2Strategy options or None for the plain strategy)
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any] | None]] = {
    "reward_model": ("reward_model", {}, None),
    "dpo": ("dpo", {}, None),
    "ppo": ("ppo", {}, None),
    # A separate critic: its forward is `CausalLMWithValueHead.values`, not `forward`, so under FSDP2 it
    # only works because every parameter-owning leaf is a unit of its own.
    "ppo_critic": ("ppo", {"critic": "tiny"}, None),
    # The FSDP2 options, against the single-process DPO run: a replicated reference, activation
    # checkpointing and parameters kept gathered between forward and backward change nothing numerically.
    "dpo_fsdp2_options": (
        "dpo", {}, {"frozen_models": "replicate", "activation_checkpointing": True, "reshard_after_forward": False}
    ),
    # Reference log-probs precomputed (each rank a share of the batches, gathered), against the live
    # single-process reference.
    "dpo_precomputed": ("dpo", {"precompute_reference": True}, None),
    # The critic-free family on the same rollout: GRPO (k3 KL in the loss, another model as reference) and
    # REINFORCE++ (returns normalised over all ranks).
    "grpo": ("grpo", {"reference": "tiny"}, None),
    "reinforce_pp": ("reinforce_pp", {}, None),
    # LoRA: adapters (+ value / score head) train, the reference is the policy with adapters disabled.
    "reward_model_lora": ("reward_model", {"peft": "lora"}, None),
    "dpo_lora": ("dpo", {"peft": "lora"}, None),
    "ppo_lora": ("ppo", {"peft": "lora"}, None),
}
LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
# The single-process run each variant is compared with.
REFERENCE_VARIANT = {name: ("dpo" if name in ("dpo_fsdp2_options", "dpo_precomputed") else name) for name in VARIANTS}
LOGGED = {
    "reward_model": ["train/loss", "train/accuracy"],
    "dpo": ["train/loss", "train/rewards/margins"],
    "ppo": ["loss/policy", "loss/value", "reward/raw", "kl"],
    "grpo": ["loss/policy", "loss/kl", "reward/raw", "kl"],
    "reinforce_pp": ["loss/policy", "reward/raw", "kl"],
}
ON_POLICY = ("ppo", "grpo", "reinforce_pp")


def completion_length_reward(prompt: str, completion: str) -> float:
    """A deterministic text reward with some spread: characters in the completion, scaled."""
    return len(completion) / 10.0


class RecordRollouts:
    """Mixin: also keep what each rollout held (token count, completions) for the test to check."""

    def collect(self, prompt_batch, **kwargs):
        rollout = super().collect(prompt_batch, **kwargs)
        if not hasattr(self, "rollout_records"):
            self.rollout_records: list[dict[str, Any]] = []
        self.rollout_records.append(
            {"tokens": int(rollout.mask.sum()), "completions": list(rollout.completion_text), "index": rollout.index.tolist()}
        )
        return rollout


class RecordingPPO(RecordRollouts, PPOModule):
    pass


class RecordingPolicyGradient(RecordRollouts, PolicyGradientModule):
    pass


class MetricRecorder(Callback):
    """Keeps the named ``trainer.callback_metrics`` and the batch's record indices after every training
    batch, per rank."""

    def __init__(self, keys: list[str]):
        self.keys = keys
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        row: dict[str, Any] = {key: float(metrics[key]) for key in self.keys if key in metrics}
        row["index"] = batch["index"].tolist()
        self.rows.append(row)


def build(method: str, options: dict[str, Any], tokenizer_dir: str, per_device_batch: int):
    """A tiny module and its DataModule; the same weights in every process (seeded)."""
    torch.manual_seed(0)
    model = dict(TINY_LLAMA)
    optim = Optimization(lr=1e-2)
    peft = LORA if options.get("peft") == "lora" else None
    if method == "reward_model":
        module = RewardModelModule(model=model, tokenizer=tokenizer_dir, optim=optim, peft=peft)
    elif method == "dpo":
        module = DPOModule(model=model, tokenizer=tokenizer_dir, beta=0.5, optim=optim,
                           precompute_reference=options.get("precompute_reference", False), peft=peft)
    elif method == "ppo":
        module = RecordingPPO(
            policy=model,
            tokenizer=tokenizer_dir,
            critic=dict(TINY_LLAMA) if options.get("critic") == "tiny" else None,
            reward=FunctionRewardSource(completion_length_reward),
            sampling=SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False),
            ppo_epochs=2,
            num_minibatches=1,
            kl_coef=0.1,
            log_samples_every_n_steps=0,
            optim=optim,
            peft=peft,
        )
    elif method in ("grpo", "reinforce_pp"):
        module = RecordingPolicyGradient(
            policy=model,
            tokenizer=tokenizer_dir,
            reference=dict(TINY_LLAMA) if options.get("reference") == "tiny" else None,
            advantage=method,
            reward=FunctionRewardSource(completion_length_reward),
            sampling=SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                    num_samples_per_prompt=2 if method == "grpo" else 1),
            ppo_epochs=2,
            num_minibatches=1,
            kl_coef=0.1,
            log_samples_every_n_steps=0,
            optim=optim,
        )
    else:
        raise ValueError(method)
    if method in ON_POLICY:
        # Fixed-length completions (see the module docstring): EOS is suppressed until MAX_NEW_TOKENS.
        module.policy.generation_config.min_new_tokens = MAX_NEW_TOKENS
    if method in ON_POLICY:
        data = PromptDataModule(train_file=os.path.join(ASSETS, "prompts_tiny.jsonl"), batch_size=per_device_batch, shuffle=False)
    else:
        data = PreferenceDataModule(train_file=os.path.join(ASSETS, "pairs_tiny.jsonl"), batch_size=per_device_batch, shuffle=False)
    return module, data


def in_order_train_loader(data, trainer: L.Trainer) -> DataLoader:
    """The DataModule's train loader with an unshuffled ``DistributedSampler`` over the trainer's ranks."""
    loader = type(data).train_dataloader(data)
    sampler = DistributedSampler(loader.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn)


@torch.no_grad()
def probe_outputs(method: str, module) -> torch.Tensor:
    """The trained model's outputs on :data:`PROBE_IDS` (a forward on every rank: it may be sharded)."""
    ids = torch.tensor(PROBE_IDS, device=module.device)
    mask = torch.ones_like(ids)
    model = module.export_model()
    model.eval()
    if method == "reward_model":
        return reward_model_scores(model, ids, mask).float().cpu()
    return model(input_ids=ids, attention_mask=mask).logits.float().cpu()


def count_all_gathers_in_generate(module) -> dict[str, Any]:
    """Greedy-generate :data:`GENERATION_TOKENS` tokens from the (sharded) policy and count the
    all-gathers issued meanwhile, next to the number of FSDP units of the policy that own parameters."""
    from torch.distributed.fsdp import FSDPModule

    calls = {"n": 0}
    originals = {name: getattr(dist, name) for name in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, name)}

    def counting(original):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            return original(*args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(dist, name, counting(original))
    try:
        out = generate(
            module.model, module.tokenizer, torch.tensor(GENERATION_PROMPTS), torch.ones(2, 4, dtype=torch.long),
            max_new_tokens=GENERATION_TOKENS, do_sample=False,
        )
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    # Units that own parameters (a model's root owns none) all-gather once each per gather. A grouped
    # unit (tied weights) appears under each of its modules: count states, not modules.
    states = {id(m._get_fsdp_state()): m._get_fsdp_state() for m in module.policy.modules() if isinstance(m, FSDPModule)}
    owning = sum(1 for state in states.values() if state._fsdp_param_groups)
    return {"all_gathers": calls["n"], "units_with_parameters": owning, "input_ids": out.input_ids.tolist(),
            "completion_lengths": out.completion_lengths.tolist()}


def make_strategy(name: str, fsdp2_options: dict[str, Any] | None):
    if name == "single":
        return "auto"
    if name == "ddp":
        return "ddp"
    if name == "fsdp2":
        return FSDP2Strategy(**(fsdp2_options or {}))
    raise ValueError(name)


def run_variant(variant: str, strategy_name: str, devices: int, out_dir: str, tokenizer_dir: str) -> None:
    """Fit ``variant`` for :data:`MAX_STEPS` steps on a global batch of :data:`GLOBAL_BATCH` and write
    ``<out>/<variant>/metrics_rank<r>.json``, the HF export ``<out>/<variant>/hf/final`` and, on rank 0,
    ``<out>/<variant>/probe.pt`` (outputs of the trained model)."""
    if GLOBAL_BATCH % devices:
        raise ValueError(f"GLOBAL_BATCH={GLOBAL_BATCH} must split evenly over {devices} devices")
    method, options, fsdp2_options = VARIANTS[variant]
    module, data = build(method, options, tokenizer_dir, GLOBAL_BATCH // devices)
    target = os.path.join(out_dir, variant)
    recorder = MetricRecorder(LOGGED[method])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=make_strategy(strategy_name, fsdp2_options),
        max_steps=MAX_STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=target,
        # LoRA runs also write merged weights (`final-merged`): the adapter of an inline config names no base.
        callbacks=[recorder, HFExport(dirpath=os.path.join(target, "hf"), on_best=False, merge_adapters=bool(options.get("peft")))],
        use_distributed_sampler=False,
    )
    data.train_dataloader = lambda: in_order_train_loader(data, trainer)
    trainer.fit(module, datamodule=data)
    record: dict[str, Any] = {"metrics": recorder.rows, "world_size": trainer.world_size}
    if method in ON_POLICY:
        record["rollouts"] = module.rollout_records
    if strategy_name == "fsdp2":
        reference = module.reference
        record["policy_sharded"] = is_fsdp2_sharded(module.policy)
        record["reference_sharded"] = reference is not None and is_fsdp2_sharded(reference)
        record["gradient_checkpointing"] = bool(getattr(module.policy, "is_gradient_checkpointing", False))
        if variant == "ppo":
            record["generation"] = count_all_gathers_in_generate(module)
    with open(os.path.join(target, f"metrics_rank{trainer.global_rank}.json"), "w") as f:
        json.dump(record, f)
    outputs = probe_outputs(method, module)
    if trainer.is_global_zero:
        torch.save(outputs, os.path.join(target, "probe.pt"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    strategy_name, devices, out, tokenizer = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    for name in sys.argv[5:] or list(VARIANTS):
        run_variant(name, strategy_name, devices, out, tokenizer)
