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


UPDATE_SHAPES = ("as sampled", "variable completions")


def _cut_completions(rollout, generator: torch.Generator):
    """``(input_ids, attention_mask, completion_mask)`` with each completion cut to a uniform random length
    in ``[1, its length]`` (the spread of a policy that stops; a random policy almost never does)."""
    keep = (torch.rand(len(rollout), generator=generator) * rollout.completion_lengths.cpu().float()).long() + 1
    columns = torch.arange(rollout.input_ids.shape[1]) - rollout.prompt_length
    cut = (columns[None, :] < keep[:, None]).to(rollout.attention_mask.device)
    completion_mask = rollout.completion_mask * cut
    prompt = torch.arange(rollout.input_ids.shape[1], device=cut.device)[None, :] < rollout.prompt_length
    attention_mask = rollout.attention_mask * (prompt | cut.bool())
    return rollout.input_ids, attention_mask, completion_mask


def _measure_update_forwards(args, device, policy_spec, tokenizer, batches) -> dict[str, Any]:
    """PPO's update forward + backward (``rollout.policy_forward`` on the shared value-head model, as in
    ``OnPolicyModuleBase.policy_update``) over real rollouts' minibatches, padded against padding-free,
    interleaved minibatch by minibatch (alternating which goes first). The two must give the same log-probs
    and values (checked). Two shapes: the episodes as sampled, and the same episodes with completions cut
    at random lengths (:func:`_cut_completions`). Tokens computed: the padded minibatch (trailing
    all-padding columns dropped, as the update does) against the packed rows; useful: the real tokens."""
    from rlhf_lightning.data.packing import pack_episodes
    from rlhf_lightning.modules import Optimization, PPOModule
    from rlhf_lightning.rewards import GoldRewardSource
    from rlhf_lightning.rollout import policy_forward

    module = PPOModule(policy_spec, tokenizer, reward=GoldRewardSource("sentiment"), optim=Optimization(lr=1e-5),
                       sampling={"max_new_tokens": args.max_new_tokens, "num_samples_per_prompt": args.samples_per_prompt},
                       log_samples_every_n_steps=0).to(device)
    module.train()
    keys = ("padded", "padded_cpu", "padding_free", "padding_free_cpu", "padded_tokens", "packed_tokens", "useful_tokens")
    result: dict[str, Any] = {shape: {key: [] for key in keys} for shape in UPDATE_SHAPES}
    generator = torch.Generator().manual_seed(0)
    for i, batch in enumerate(batches):
        rollout = module.collect({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}, seed_offset=i)
        size = -(-len(rollout) // args.num_minibatches)
        for shape in UPDATE_SHAPES:
            layout = (rollout.input_ids, rollout.attention_mask, rollout.completion_mask)
            if shape == "variable completions":
                layout = _cut_completions(rollout, generator)
            order = torch.randperm(len(rollout), generator=generator)
            for start in range(0, len(rollout), size):
                rows = order[start : start + size].to(device)
                attention_mask = layout[1][rows]
                width = int(attention_mask.sum(0).nonzero().max()) + 1
                inputs = (layout[0][rows, :width], attention_mask[:, :width], layout[2][rows, :width])
                outs = {}

                def step(padding_free: bool):
                    out = policy_forward(module.model, *inputs, padding_free=padding_free, return_entropy=True)
                    (-(out.logprobs.sum()) + out.values.pow(2).sum() - out.entropy.sum()).backward()
                    module.zero_grad(set_to_none=True)
                    return out

                for padding_free in ((False, True) if (i + start) % 2 == 0 else (True, False)):
                    name = "padding_free" if padding_free else "padded"
                    _sync(device)
                    begin, cpu_begin = time.perf_counter(), time.process_time()
                    outs[name] = step(padding_free)
                    _sync(device)
                    if i >= args.warmup:
                        result[shape][name].append(time.perf_counter() - begin)
                        result[shape][f"{name}_cpu"].append(time.process_time() - cpu_begin)
                for field in ("logprobs", "values"):
                    want, got = getattr(outs["padded"], field), getattr(outs["padding_free"], field)
                    if not torch.allclose(got, want, atol=1e-4, rtol=0):
                        raise RuntimeError(f"padded and padding-free update forwards disagree on {field}: the comparison is void")
                if i >= args.warmup:
                    packed = pack_episodes(*inputs)
                    result[shape]["padded_tokens"].append(float(inputs[0].numel()))
                    result[shape]["packed_tokens"].append(float(packed.input_ids.numel()))
                    result[shape]["useful_tokens"].append(float(packed.real_tokens))
    result["minibatch_episodes"] = float(size)
    return result


def _measure_onpolicy(kind: str, args) -> dict[str, Any]:
    """One on-policy measurement (in a fresh process): ``ppo_generate``, ``ppo_update``, ``ppo``
    (``padding_free``, the default), ``ppo_padded``, ``fine_grained`` or ``fine_grained_sequence``."""
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
    if kind == "ppo_update":
        return _measure_update_forwards(args, device, policy_spec, tok, batches)

    clock = _PhaseClock(device)
    common = dict(
        sampling={"max_new_tokens": args.max_new_tokens, "num_samples_per_prompt": args.samples_per_prompt},
        ppo_epochs=args.ppo_epochs, num_minibatches=args.num_minibatches, optim=Optimization(lr=1e-5),
        log_samples_every_n_steps=0,
    )
    if kind in ("ppo", "ppo_padded"):
        reward = RewardModelSource(args.reward_model, batch_size=64) if args.reward_model else GoldRewardSource("sentiment")
        module = _timed_subclass(PPOModule, clock)(policy_spec, tok, reward=reward, padding_free=kind == "ppo", **common)
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
    rows += update_forward_rows(measure_onpolicy("ppo_update", args), args)
    mode = f"PPOModule step ({args.ppo_epochs} epochs x {args.num_minibatches} minibatches)"
    padded = _onpolicy_row("ppo", f"{mode}, padding_free: false", measure_onpolicy("ppo_padded", args), args)
    rows += [padded, _onpolicy_row("ppo", mode, measure_onpolicy("ppo", args), args, basis=padded["cost"])]
    return rows


def update_forward_rows(result: dict[str, Any], args) -> list[dict[str, Any]]:
    """Rows of :func:`_measure_update_forwards`: one minibatch's update forward + backward, padded and
    padding-free, per shape (``pairs/s`` reads as episodes/s; ``step / bare`` against the padded one of
    the same shape)."""
    cuda = _device(args).type == "cuda"
    episodes = result["minibatch_episodes"]
    rows = []
    for shape in UPDATE_SHAPES:
        measured = result[shape]
        useful = sum(measured["useful_tokens"])
        padded_basis = sum(measured["padded" if cuda else "padded_cpu"])
        for name, tokens_key, label in (("padded", "padded_tokens", "padded"), ("padding_free", "packed_tokens", "padding-free")):
            wall, cpu = _median(measured[name]), _median(measured[f"{name}_cpu"])
            computed = sum(measured[tokens_key])
            rows.append({"section": "ppo", "mode": f"update fwd+bwd, {shape}, {label} ({episodes:.0f} episodes)",
                         "step_ms": 1000 * wall, "cpu_ms": 1000 * cpu, "pairs_per_s": episodes / wall, "peak_mb": float("nan"),
                         "overhead": sum(measured[name if cuda else f"{name}_cpu"]) / padded_basis,
                         "extra": {"tokens computed": f"{computed:.0f}", "tokens useful": f"{useful:.0f}",
                                   "padding share": f"{100 * (1 - useful / computed):.1f}%"}})
    return rows


def bench_fine_grained(args) -> list[dict[str, Any]]:
    """FineGrainedPPOModule with configs/fine_grained.yaml's segment sources against the same sources at
    sequence level (configs/fine_grained_sequence.yaml): what segmenting, per-segment scoring and placing
    rewards on tokens add to a whole PPO step."""
    sequence = _onpolicy_row("fine_grained", "same sources, sequence level", measure_onpolicy("fine_grained_sequence", args), args)
    fine = _onpolicy_row("fine_grained", "FineGrainedPPOModule (sentence / sub-sentence)", measure_onpolicy("fine_grained", args),
                         args, basis=sequence["cost"])
    return [sequence, fine]
