"""On-policy sections (ppo, fine_grained): rollout generation against a bare HF generate, and the phases of a PPO step."""

from __future__ import annotations

import gc
import tempfile
import time
from typing import Any, Callable

import torch

from bench.harness import _Memory, _config, _device, _median, _spawn, _sync


# ------------------------------------------------------------------------ on-policy sections (ppo, fine_grained)
#
# One PPO step = one rollout (generate; old, reference and value forwards; reward; shaping + GAE) then
# ppo_epochs x minibatches of fwd+bwd+AdamW. The step is timed whole, and each phase through thin wrappers
# installed in the benchmark's own spawned process (the modules themselves carry no timers). Prompts are
# embedded-world prompts, so the policy (random of the configured size, or ``--policy``) and the reward
# (the gold sentiment scorer, or ``--reward-model``) see the text they are meant for.

PHASES = ("generation", "logprob/value forwards", "reward scoring", "reward shaping", "updates")
OTHER_PHASE = "other (GAE, decode, logging, loop)"


class _PhaseClock:
    """Wall and process-CPU seconds per phase (CUDA-synchronised at both ends of every timed call)."""

    def __init__(self, device):
        self.device = device
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def reset(self) -> None:
        self.wall, self.cpu = {}, {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*a, **k):
            _sync(self.device)
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                _sync(self.device)
                self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - start
                self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu_start

        return timed


def _timed_subclass(module_cls, clock: _PhaseClock):
    """``module_cls`` with its reward shaping and its update timed (a benchmark-only subclass)."""

    class Timed(module_cls):
        def shape_rewards(self, rollout, kl):
            return clock.wrap("reward shaping", super().shape_rewards)(rollout, kl)

        def ppo_update(self, rollout, advantages, returns):
            return clock.wrap("updates", super().ppo_update)(rollout, advantages, returns)

    Timed.__name__ = f"Timed{module_cls.__name__}"
    return Timed


def _time_reward(module, clock: _PhaseClock) -> None:
    """Time the module's reward source, keeping its type (Fine-Grained RLHF's shaping checks it)."""
    from rlhf_lightning.modules.fine_grained import EpisodeTotalReward

    if isinstance(module.reward_fn, EpisodeTotalReward):
        inner = module.reward_fn.reward
        inner.score = clock.wrap("reward scoring", inner.score)  # the instance attribute shadows the method
    else:
        module.reward_fn = clock.wrap("reward scoring", module.reward_fn)


def _world_prompts(args, n: int) -> list[str]:
    """``n`` prompts: from ``--prompts`` (JSONL, cycled), else freshly drawn embedded-world prompts."""
    import json
    import random

    if args.prompts:
        with open(args.prompts) as handle:
            prompts = [json.loads(line)["prompt"] for line in handle if line.strip()]
        return [prompts[i % len(prompts)] for i in range(n)]
    from rlhf_lightning.synthetic import make_prompt, sample_facts
    from rlhf_lightning.synthetic.lexicon import PROMPT_TEMPLATES

    rng = random.Random(0)
    return [make_prompt(sample_facts(rng), rng.randrange(len(PROMPT_TEMPLATES))) for _ in range(n)]


def _policy_and_tokenizer(args) -> tuple[Any, str]:
    """(policy spec, tokenizer dir): ``--policy`` (an HF directory with its tokenizer), else a random
    llama of the configured size over the embedded world's vocabulary."""
    if args.policy:
        return args.policy, args.policy
    from rlhf_lightning.synthetic import build_world_tokenizer

    tok = tempfile.mkdtemp(prefix="bench-world-tok-")
    tokenizer = build_world_tokenizer(tok)
    return {**_config(args), "vocab_size": len(tokenizer)}, tok


def _prompt_batches(args, tokenizer) -> list[dict[str, Any]]:
    """``warmup + steps`` left-padded prompt batches of ``batch_size`` prompts (the prompt batch contract)."""
    from rlhf_lightning.generation import tokenize_prompts

    steps = args.warmup + args.steps
    prompts = _world_prompts(args, steps * args.batch_size)
    batches = []
    for step in range(steps):
        texts = prompts[step * args.batch_size : (step + 1) * args.batch_size]
        ids, mask = tokenize_prompts(tokenizer, texts)
        batches.append({"prompt_input_ids": ids, "prompt_attention_mask": mask,
                        "index": torch.arange(len(texts)) + step * args.batch_size, "prompt_text": texts})
    return batches


def _segment_sources(granularity: str | None):
    """configs/fine_grained.yaml's sources (``granularity=None``), or the same sources all at ``granularity``
    (``"sequence"``: configs/fine_grained_sequence.yaml)."""
    from rlhf_lightning.rewards import GoldSegmentScorer, RepetitionPenalty, SegmentRewardSpec

    fine = granularity is None
    return [
        SegmentRewardSpec(GoldSegmentScorer("sentiment", aggregate="mean"), granularity or "sentence", 1.0, normalize=fine),
        SegmentRewardSpec(GoldSegmentScorer("fluency", aggregate="mean"), granularity or "sentence", 0.5, normalize=fine),
        SegmentRewardSpec(RepetitionPenalty(penalty=0.1, vocabulary="world"), granularity or "sub_sentence", 1.0,
                          segmenter_kwargs={"min_words": 3} if fine else None),
    ]


def _measure_generation(args, device, policy_spec, tokenizer, batches) -> dict[str, Any]:
    """Our rollout generation (``rlhf_lightning.generation.generate``) and a bare HF ``model.generate`` with
    the same sampling arguments, seed and (repeat-interleaved) batch, interleaved batch by batch. The two
    must draw identical tokens (checked), so they do the same work."""
    from rlhf_lightning.generation import generate
    from rlhf_lightning.models import load_causal_lm

    policy = load_causal_lm(policy_spec, tokenizer=tokenizer).to(device).eval()
    n = args.samples_per_prompt
    result: dict[str, list[float]] = {"ours": [], "ours_cpu": [], "bare": [], "bare_cpu": [], "tokens": []}
    for i, batch in enumerate(batches):
        ids, mask = batch["prompt_input_ids"].to(device), batch["prompt_attention_mask"].to(device)

        def ours():
            return generate(policy, tokenizer, ids, mask, max_new_tokens=args.max_new_tokens, num_samples_per_prompt=n, seed=i)

        def bare():
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(i)
                return policy.generate(
                    input_ids=ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                    max_new_tokens=args.max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
                )

        timed = {}
        for name, call in ((("ours", ours), ("bare", bare)) if i % 2 == 0 else (("bare", bare), ("ours", ours))):
            _sync(device)  # alternate which goes first, so neither always runs on a warm cache
            start, cpu_start = time.perf_counter(), time.process_time()
            timed[name] = call()
            _sync(device)
            if i >= args.warmup:
                result[name].append(time.perf_counter() - start)
                result[f"{name}_cpu"].append(time.process_time() - cpu_start)
        out, generated = timed["ours"], timed["bare"][:, ids.shape[1] :]
        kept = out.completion_mask[:, ids.shape[1] :].bool()
        if generated.shape != out.completion_ids.shape or not torch.equal(generated[kept], out.completion_ids[kept]):
            raise RuntimeError("our generate and the bare HF generate drew different tokens: the comparison is void")
        if i >= args.warmup:
            result["tokens"].append(float(generated.numel()))  # every decoded position: finished rows still cost
    return result


def _measure_onpolicy(kind: str, args) -> dict[str, Any]:
    """One on-policy measurement (in a fresh process): ``ppo_generate``, ``ppo``, ``fine_grained`` or
    ``fine_grained_sequence``."""
    import lightning as L

    import rlhf_lightning.rollout as rollout_lib
    from rlhf_lightning.models import load_tokenizer
    from rlhf_lightning.modules import FineGrainedPPOModule, Optimization, PPOModule
    from rlhf_lightning.rewards import GoldRewardSource, RewardModelSource

    torch.manual_seed(0)
    torch.set_num_threads(args.threads) if args.threads else None
    device = _device(args)
    policy_spec, tok = _policy_and_tokenizer(args)
    tokenizer = load_tokenizer(tok, padding_side="left")
    batches = _prompt_batches(args, tokenizer)
    if kind == "ppo_generate":
        return _measure_generation(args, device, policy_spec, tokenizer, batches)

    clock = _PhaseClock(device)
    common = dict(
        sampling={"max_new_tokens": args.max_new_tokens, "num_samples_per_prompt": args.samples_per_prompt},
        ppo_epochs=args.ppo_epochs, num_minibatches=args.num_minibatches, optim=Optimization(lr=1e-5),
        log_samples_every_n_steps=0,
    )
    if kind == "ppo":
        reward = RewardModelSource(args.reward_model, batch_size=64) if args.reward_model else GoldRewardSource("sentiment")
        module = _timed_subclass(PPOModule, clock)(policy_spec, tok, reward=reward, **common)
    elif kind in ("fine_grained", "fine_grained_sequence"):
        sources = _segment_sources(None if kind == "fine_grained" else "sequence")
        module = _timed_subclass(FineGrainedPPOModule, clock)(policy_spec, tok, segment_rewards=sources, **common)
    else:
        raise ValueError(f"unknown on-policy kind {kind!r}")
    _time_reward(module, clock)

    class StepRecorder(L.Callback):
        """Per timed step: wall / CPU seconds of the step and of each phase, and the mean response length."""

        def __init__(self):
            self.steps: list[dict[str, Any]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync(device)
            clock.reset()
            self._t, self._cpu = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(device)
            wall, cpu = time.perf_counter() - self._t, time.process_time() - self._cpu
            if batch_idx >= args.warmup:
                self.steps.append({"wall": wall, "cpu": cpu, "phase_wall": dict(clock.wall), "phase_cpu": dict(clock.cpu),
                                   "response_length": float(trainer.callback_metrics["response_length"])})

    recorder = StepRecorder()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=len(batches),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[recorder],
    )
    gc.collect()
    memory = _Memory(device)
    # collect_rollout looks these up in its module's globals at call time: wrap them there for this fit only.
    originals = rollout_lib.generate, rollout_lib.policy_forward
    rollout_lib.generate = clock.wrap("generation", originals[0])
    rollout_lib.policy_forward = clock.wrap("logprob/value forwards", originals[1])
    try:
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False))
    finally:
        rollout_lib.generate, rollout_lib.policy_forward = originals
    return {"steps": recorder.steps, "episodes": args.batch_size * args.samples_per_prompt, "peak_mb": memory.peak_mb()}


def _measure_onpolicy_child(kind: str, args, bare=None) -> dict[str, Any]:
    return _measure_onpolicy(kind, args)


def measure_onpolicy(kind: str, args) -> dict[str, Any]:
    """:func:`_measure_onpolicy` in a fresh spawned process."""
    return _spawn(_measure_onpolicy_child, kind, args, {})


def _onpolicy_row(section: str, mode: str, result: dict[str, Any], args, basis: float | None = None) -> dict[str, Any]:
    """Main-table row (median step, episodes/s) plus ``extra``: phase shares of the step's cost (CPU time
    on CPU, wall on CUDA, summed over the timed steps) and the in-step generation throughput."""
    steps, cuda = result["steps"], _device(args).type == "cuda"
    basis_key, phase_key = ("wall", "phase_wall") if cuda else ("cpu", "phase_cpu")
    wall = _median([s["wall"] for s in steps])
    cpu = _median([s["cpu"] for s in steps])
    total = sum(s[basis_key] for s in steps)
    shares = {phase: sum(s[phase_key].get(phase, 0.0) for s in steps) / total for phase in PHASES}
    shares[OTHER_PHASE] = 1.0 - sum(shares.values())
    episodes = result["episodes"]
    length = sum(s["response_length"] for s in steps) / len(steps)
    generation_time = sum(s[phase_key].get("generation", 0.0) for s in steps)
    extra = {
        "episodes/s (wall)": f"{episodes / wall:.1f}",
        "episodes/s (CPU)": f"{episodes / cpu:.1f}",
        "mean response length": f"{length:.1f}",
        "in-step generation, completion tokens/s": f"{episodes * length * len(steps) / generation_time:.0f}",
        **{f"share: {name}": f"{100 * share:.1f}%" for name, share in shares.items()},
    }
    cost = _median([s[basis_key] for s in steps])
    return {"section": section, "mode": mode, "step_ms": 1000 * wall, "cpu_ms": 1000 * cpu, "pairs_per_s": episodes / wall,
            "peak_mb": result["peak_mb"], "overhead": cost / basis if basis else float("nan"), "cost": cost, "extra": extra}


def bench_ppo(args) -> list[dict[str, Any]]:
    """Our rollout generation against a bare HF ``generate`` on the same batches (tokens/s; ``pairs/s``
    reads as episodes/s), then PPOModule's full step: episodes/s and the share of generation, scoring
    and updates in it."""
    gen = measure_onpolicy("ppo_generate", args)
    cuda = _device(args).type == "cuda"
    tokens = sum(gen["tokens"])
    episodes = args.batch_size * args.samples_per_prompt
    rows = []
    for mode, key in ((f"bare HF model.generate ({args.max_new_tokens} new tokens)", "bare"),
                      ("rlhf_lightning.generation.generate (same batch, seed, tokens)", "ours")):
        wall, cpu = _median(gen[key]), _median(gen[f"{key}_cpu"])
        basis = sum(gen[key if cuda else f"{key}_cpu"])
        bare_basis = sum(gen["bare" if cuda else "bare_cpu"])
        rows.append({"section": "ppo", "mode": mode, "step_ms": 1000 * wall, "cpu_ms": 1000 * cpu,
                     "pairs_per_s": episodes / wall, "peak_mb": float("nan"), "overhead": basis / bare_basis,
                     "extra": {"generation tokens/s (wall)": f"{tokens / sum(gen[key]):.0f}",
                               "generation tokens/s (CPU)": f"{tokens / sum(gen[f'{key}_cpu']):.0f}"}})
    mode = f"PPOModule step ({args.ppo_epochs} epochs x {args.num_minibatches} minibatches)"
    rows.append(_onpolicy_row("ppo", mode, measure_onpolicy("ppo", args), args))
    return rows


def bench_fine_grained(args) -> list[dict[str, Any]]:
    """FineGrainedPPOModule with configs/fine_grained.yaml's segment sources against the same sources at
    sequence level (configs/fine_grained_sequence.yaml): what segmenting, per-segment scoring and placing
    rewards on tokens add to a whole PPO step."""
    sequence = _onpolicy_row("fine_grained", "same sources, sequence level", measure_onpolicy("fine_grained_sequence", args), args)
    fine = _onpolicy_row("fine_grained", "FineGrainedPPOModule (sentence / sub-sentence)", measure_onpolicy("fine_grained", args),
                         args, basis=sequence["cost"])
    return [sequence, fine]
