"""Throughput and peak memory of the method modules against the bare compute they wrap.

    python scripts/benchmark.py                                   # every section, small defaults
    python scripts/benchmark.py --sections dpo rm --hidden-size 256 --layers 4 --batch-size 8 \
        --seq-len 256 --steps 20 --out bench.md

Each section times its module's full training step (Lightning loop, loss, logging, optimizer) on
random token batches and, in the same process, the *bare* cost of the same work written directly
with the Hugging Face model: for DPO one policy forward + backward on the concatenated (2B, T)
batch, one reference forward under ``no_grad`` and an AdamW step; for the reward model one RM
forward + backward over 2B sequences and an AdamW step. Bare steps are interleaved with the module's
(each right after the module step on the same batch), so a change in machine load hits both alike.
Warmup steps are excluded from timing.

Step cost: on CUDA the median wall time (synchronised); on CPU the median *process CPU time* of a
step (``time.process_time``) — on a shared machine other processes stretch wall time by whatever
load they bring, while the CPU time a step burns is what the step itself costs. Both columns are
printed; ``step / bare`` = module step / bare step, on the basis just named.

Peak memory, measured in a separate fresh process per mode (so the timing runs are not slowed and
no measurement pollutes the next): CUDA ``max_memory_allocated`` growth; CPU the growth of the
kernel's resident-set high-water mark (``ru_maxrss``) over the resident size after imports and data,
with glibc's mmap threshold pinned to 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so every tensor buffer is
its own mapping, given back on free, and the high-water mark follows live tensor memory (weights,
gradients, optimizer state, activations) rather than allocator caching. Both include the models'
weights: a frozen reference shows up as its weights plus its forward's transient activations.

Sections live in ``SECTIONS`` (name -> function(args) -> rows); add one to benchmark another method.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import gc
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------------------------- setup


def _device(args) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _tokenizer_dir(vocab: int) -> str:
    from rlhf_lightning.synthetic.tokenizer import build_word_level_tokenizer

    path = tempfile.mkdtemp(prefix="bench-tok-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    build_word_level_tokenizer([f"w{i}" for i in range(vocab)], path)
    return path


def _config(args) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": args.hidden_size,
        "intermediate_size": 4 * args.hidden_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, args.hidden_size // 32),
        "num_key_value_heads": max(1, args.hidden_size // 32),
        "max_position_embeddings": max(256, args.seq_len),
        "tie_word_embeddings": False,
    }


class PairDataset(torch.utils.data.Dataset):
    """Random preference rows: chosen of length T, rejected of length ~3T/4 (unequal, as in real data)."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        prompt = seq_len // 4
        for i in range(n):
            row = {"index": torch.tensor(i)}
            for side, length in (("chosen", seq_len), ("rejected", max(prompt + 2, 3 * seq_len // 4))):
                ids = torch.randint(0, vocab, (seq_len,), generator=g)
                attention = (torch.arange(seq_len) < length).long()
                completion = ((torch.arange(seq_len) >= prompt) & (attention == 1)).long()
                row.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_completion_mask": completion})
            self.rows.append(row)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _loader(args, vocab):
    n = (args.warmup + args.steps) * args.batch_size
    return torch.utils.data.DataLoader(PairDataset(n, args.seq_len, vocab), batch_size=args.batch_size, shuffle=False)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_rss_mb() -> float:
    # ru_maxrss is KiB on Linux: the process's resident-set high-water mark, kept by the kernel.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    """Current resident set size (``/proc/self/statm``; falls back to the high-water mark elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return _max_rss_mb()


# glibc: allocations of at least this many bytes get their own mmap and go back to the OS on free.
_MMAP_THRESHOLD = str(64 * 1024)


class _Memory:
    """Peak memory growth from construction: CUDA allocated bytes, or CPU resident-set high-water mark
    over the resident size at construction (see the module docstring for why that tracks tensors)."""

    def __init__(self, device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device) / 2**20
        else:
            self.start = _rss_mb()
            self.start_high_water = _max_rss_mb()

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.start
        high_water = _max_rss_mb()
        if high_water <= self.start_high_water:
            return float("nan")  # the peak of this measurement never rose above an earlier one: unknown
        return high_water - self.start


class _StepTimer:
    """Lightning callback: wall time (CUDA-synchronised) and process CPU time of each training batch
    after ``warmup``, in ``times`` / ``cpu_times``."""

    def __new__(cls, warmup, device):
        import lightning as L

        class Timer(L.Callback):
            def __init__(self):
                self.times, self.cpu_times, self._t, self._cpu = [], [], 0.0, 0.0

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                _sync(device)
                self._t, self._cpu = time.perf_counter(), time.process_time()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                _sync(device)
                if batch_idx >= warmup:
                    self.times.append(time.perf_counter() - self._t)
                    self.cpu_times.append(time.process_time() - self._cpu)

        return Timer()


def _fit_module(module, args, loader, device) -> list[float]:
    """Wall times of the timed training steps (see :func:`_fit_module_timings`)."""
    return _fit_module_timings(module, args, loader, device)["times"]


def _fit_module_timings(module, args, loader, device, callbacks=()) -> dict[str, list[float]]:
    """``Trainer.fit`` for ``warmup + steps`` steps; ``{"times": wall, "cpu_times": process CPU}`` per
    timed step (from ``on_train_batch_start`` to ``on_train_batch_end``: forward, loss, logging,
    backward, optimizer and scheduler step; not data loading)."""
    import lightning as L

    timer = _StepTimer(args.warmup, device)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=args.warmup + args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer, *callbacks],
    )
    trainer.fit(module, train_dataloaders=loader)
    return {"times": timer.times, "cpu_times": timer.cpu_times}


def _bare_loop(args, loader, device, step: Callable[[dict], None]) -> dict[str, list[float]]:
    """Run ``step(batch)`` over the loader; wall and process CPU times of the steps after ``warmup``."""
    times, cpu_times = [], []
    for i, batch in enumerate(loader):
        batch = {k: v.to(device) for k, v in batch.items()}
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step(batch)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return {"times": times, "cpu_times": cpu_times}


def _token_logps_sum(logits, input_ids, mask):
    logits = logits[:, :-1].float()
    picked = torch.gather(logits, -1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return ((picked - torch.logsumexp(logits, -1)) * mask[:, 1:]).sum(-1)


# ------------------------------------------------------------------------------------------- measures


def _warm_up_kernels(tokenizer, device) -> None:
    """One forward/backward/AdamW step of a one-layer model: the lazy one-time allocations (kernel
    workspaces, autograd and optimizer machinery) then happen before the memory baseline."""
    from rlhf_lightning.models import load_causal_lm

    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 1, "num_key_value_heads": 1}
    model = load_causal_lm(config, tokenizer=tokenizer).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.zeros(2, 8, dtype=torch.long, device=device)
    model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().logsumexp(-1).mean().backward()
    optimizer.step()
    del model, optimizer


def _bare_step(kind: str, args, tokenizer, device) -> Callable[[dict], None]:
    """The bare work of a module's step, written directly against the HF model (``dpo``: policy
    forward+backward on the concatenated (2B, T) batch + reference forward under ``no_grad`` + AdamW;
    ``rm``: RM forward+backward over the 2B sequences + AdamW)."""
    from rlhf_lightning.models import load_causal_lm, load_reward_model, reward_model_scores
    from rlhf_lightning.modules.pair_forward import concatenate_pair

    torch.manual_seed(0)
    if kind == "dpo":
        policy = load_causal_lm(_config(args), tokenizer=tokenizer).to(device).train()
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)

        def step(batch):
            pair = concatenate_pair(batch)
            logps = _token_logps_sum(policy(input_ids=pair.input_ids, attention_mask=pair.attention_mask).logits,
                                     pair.input_ids, pair.completion_mask)
            with torch.no_grad():
                ref = _token_logps_sum(reference(input_ids=pair.input_ids, attention_mask=pair.attention_mask).logits,
                                       pair.input_ids, pair.completion_mask)
            b = pair.num_pairs
            loss = -torch.nn.functional.logsigmoid(0.1 * ((logps[:b] - ref[:b]) - (logps[b:] - ref[b:]))).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step
    if kind == "rm":
        rm = load_reward_model(_config(args), tokenizer=tokenizer).to(device).train()
        opt = torch.optim.AdamW(rm.parameters(), lr=1e-5)

        def step(batch):
            pair = concatenate_pair(batch)
            scores = reward_model_scores(rm, pair.input_ids, pair.attention_mask)
            b = pair.num_pairs
            loss = -torch.nn.functional.logsigmoid(scores[:b] - scores[b:]).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step
    raise ValueError(f"no bare step for {kind!r}")


def _module(kind: str, args, tokenizer_dir: str):
    """The LightningModule of a measurement kind (``dpo_live``, ``dpo_precomputed``, ``rm``)."""
    from rlhf_lightning.modules import DPOModule, Optimization, RewardModelModule

    torch.manual_seed(0)
    if kind in ("dpo_live", "dpo_precomputed"):
        return DPOModule(_config(args), tokenizer_dir, precompute_reference=kind == "dpo_precomputed", optim=Optimization(lr=1e-5))
    if kind == "rm":
        return RewardModelModule(_config(args), tokenizer_dir, optim=Optimization(lr=1e-5))
    raise ValueError(f"unknown module kind {kind!r}")


def _measure(kind: str, args, bare: str | None = None) -> dict[str, Any]:
    """One measurement (run in a fresh process): step wall / CPU times and peak memory growth.

    ``kind`` is a module kind (see :func:`_module`) or ``"<section>_bare"``. With ``bare`` (a section
    name) the module's steps are interleaved with bare steps on the same batches — each bare step runs
    right after the module step it is compared with — so both see the same machine load; the bare
    timings come back as ``bare_times`` / ``bare_cpu_times`` (memory is then not meaningful).
    """
    torch.set_num_threads(args.threads) if args.threads else None
    device = _device(args)
    tok = _tokenizer_dir(args.vocab)
    # Everything imported and the data built before the memory baseline: only models, optimizer
    # state and activations count.
    import lightning as L

    from rlhf_lightning.models import load_tokenizer
    from rlhf_lightning.modules import DPOModule, RewardModelModule  # noqa: F401

    tokenizer = load_tokenizer(tok)
    loader = _loader(args, len(tokenizer))
    _warm_up_kernels(tokenizer, device)
    gc.collect()
    memory = _Memory(device)
    if kind.endswith("_bare"):
        timings = _bare_loop(args, loader, device, _bare_step(kind[: -len("_bare")], args, tokenizer, device))
        return {**timings, "peak_mb": memory.peak_mb()}
    module = _module(kind, args, tok)
    callbacks = []
    if bare is not None:
        bare_step = _bare_step(bare, args, tokenizer, device)

        class InterleavedBare(L.Callback):
            """Runs (and times) the bare step on each batch right after the module's step."""

            def __init__(self):
                self.times, self.cpu_times = [], []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                _sync(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                bare_step(batch)
                _sync(device)
                if batch_idx >= args.warmup:
                    self.times.append(time.perf_counter() - start)
                    self.cpu_times.append(time.process_time() - cpu_start)

        callbacks.append(InterleavedBare())
    timings = _fit_module_timings(module, args, loader, device, callbacks=callbacks)
    result = {**timings, "peak_mb": memory.peak_mb()}
    if callbacks:
        result.update(bare_times=callbacks[0].times, bare_cpu_times=callbacks[0].cpu_times)
    return result


def _child(kind, args, bare, queue):
    try:
        queue.put(_measure(kind, args, bare))
    except BaseException as error:  # report, don't hang the parent
        queue.put({"error": repr(error)})


def _spawn(kind: str, args, env: dict[str, str], bare: str | None = None) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(kind, args, bare, queue))
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # a spawned interpreter starts with the parent's environment
    try:
        process.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    result = queue.get()
    process.join()
    if "error" in result:
        raise RuntimeError(f"{kind}: {result['error']}")
    return result


def _peak_memory(kind: str, args) -> float:
    """Peak memory of ``kind`` in its own fresh process (``warmup`` + 2 steps; on CPU with the pinned
    mmap threshold, see the module docstring)."""
    memory_args = argparse.Namespace(**{**vars(args), "steps": min(args.steps, 2)})
    env = {} if _device(args).type == "cuda" else {"MALLOC_MMAP_THRESHOLD_": _MMAP_THRESHOLD}
    return _spawn(kind, memory_args, env)["peak_mb"]


def measure(kind: str, args, bare: str | None = None) -> dict[str, Any]:
    """:func:`_measure` in fresh spawned processes: one for the step times (``args.steps`` timed steps,
    interleaved with the ``bare`` section's bare steps when given), one for the peak memory.
    Returns ``times``, ``cpu_times`` (seconds per timed step), ``peak_mb`` and, with ``bare``,
    ``bare_times`` / ``bare_cpu_times``."""
    timed = _spawn(kind, args, {}, bare)
    timed["peak_mb"] = _peak_memory(kind, args)
    return timed


def _bare_result(result: dict[str, Any], peak_mb: float) -> dict[str, Any]:
    return {"times": result["bare_times"], "cpu_times": result["bare_cpu_times"], "peak_mb": peak_mb}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _step_cost(result: dict[str, Any], device) -> float:
    """The basis of ``step / bare``: median CPU time per step on CPU, median wall time on CUDA."""
    if device.type != "cuda" and result.get("cpu_times"):
        return _median(result["cpu_times"])
    return _median(result["times"])


def _row(section, mode, result, args, bare=None) -> dict[str, Any]:
    """A table row; ``bare`` is the bare measurement's :func:`_step_cost` (None for the bare row)."""
    median = _median(result["times"])
    cpu = _median(result["cpu_times"]) if result.get("cpu_times") else float("nan")
    row = {"section": section, "mode": mode, "step_ms": 1000 * median, "cpu_ms": 1000 * cpu,
           "pairs_per_s": args.batch_size / median, "peak_mb": result["peak_mb"]}
    row["overhead"] = _step_cost(result, _device(args)) / bare if bare else 1.0
    return row


# ------------------------------------------------------------------------------------------- sections


def bench_dpo(args) -> list[dict[str, Any]]:
    """DPOModule with a live and with a precomputed reference against the bare policy forward+backward,
    reference forward and AdamW step on the same concatenated batches. Each module run interleaves
    the bare steps (same process, same batches), and its ``step / bare`` uses those."""
    device = _device(args)
    bare_peak = _peak_memory("dpo_bare", args)
    rows, bare_row = [], None
    for mode in ("live", "precomputed"):
        result = measure(f"dpo_{mode}", args, bare="dpo")
        bare = _bare_result(result, bare_peak)
        if bare_row is None:
            bare_row = _row("dpo", "bare (policy fwd+bwd + ref fwd + AdamW)", bare, args)
        rows.append(_row("dpo", f"DPOModule, {mode} reference", result, args, _step_cost(bare, device)))
    return [bare_row, *rows]


def bench_rm(args) -> list[dict[str, Any]]:
    """RewardModelModule against the bare RM forward+backward over 2B sequences and AdamW step
    (interleaved in the same process, as in :func:`bench_dpo`)."""
    result = measure("rm", args, bare="rm")
    bare = _bare_result(result, _peak_memory("rm_bare", args))
    return [
        _row("rm", "bare (RM fwd+bwd over 2B + AdamW)", bare, args),
        _row("rm", "RewardModelModule", result, args, _step_cost(bare, _device(args))),
    ]


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


def _onpolicy_child(kind, args, queue):
    try:
        queue.put(_measure_onpolicy(kind, args))
    except BaseException as error:  # report, don't hang the parent
        queue.put({"error": repr(error)})


def measure_onpolicy(kind: str, args) -> dict[str, Any]:
    """:func:`_measure_onpolicy` in a fresh spawned process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_onpolicy_child, args=(kind, args, queue))
    process.start()
    result = queue.get()
    process.join()
    if "error" in result:
        raise RuntimeError(f"{kind}: {result['error']}")
    return result


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


def bench_lora_memory(args) -> list[dict[str, Any]]:
    """LoRA-DPO vs LoRA-SFT vs full-FT DPO peak memory on a 103M-parameter model: scripts/benchmark_memory.py
    with its own defaults; its table is printed after this script's (``args.appendix``), no rows here."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import benchmark_memory

    parser = argparse.ArgumentParser()
    benchmark_memory.add_arguments(parser)
    memory_args = parser.parse_args(["--device", args.device])
    args.appendix = getattr(args, "appendix", "") + "\nLoRA memory (scripts/benchmark_memory.py):\n\n" + benchmark_memory.to_markdown(
        benchmark_memory.rows(memory_args), memory_args)
    return []


SECTIONS: dict[str, Callable[[Any], list[dict[str, Any]]]] = {
    "dpo": bench_dpo, "rm": bench_rm, "ppo": bench_ppo, "fine_grained": bench_fine_grained, "lora_memory": bench_lora_memory,
}


def to_markdown(rows, args) -> str:
    device = _device(args)
    lines = [
        f"Model: llama hidden {args.hidden_size}, {args.layers} layers, vocab {args.vocab}; batch {args.batch_size} pairs, "
        f"T = {args.seq_len}; {args.steps} timed steps after {args.warmup} warmup (median); device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads") + ".",
        "",
        f"`step / bare` compares median {'wall' if device.type == 'cuda' else 'process CPU'} time per step; "
        f"peak memory: {'CUDA max_memory_allocated growth' if device.type == 'cuda' else 'resident-set high-water-mark growth (mmap threshold 64 KiB)'}.",
        "",
        "| section | mode | step wall (ms) | step CPU (ms) | pairs/s (wall) | peak memory (MiB) | step / bare |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cpu = r.get("cpu_ms", float("nan"))
        lines.append(
            f"| {r['section']} | {r['mode']} | {r['step_ms']:.1f} | {cpu:.1f} | {r['pairs_per_s']:.1f} | {r['peak_mb']:.1f} | {r['overhead']:.3f} |"
        )
    return "\n".join(lines) + "\n" + _extra_tables(rows, args)


def _extra_tables(rows, args) -> str:
    """One table per section whose rows carry ``extra`` columns (the on-policy sections' phase shares)."""
    out = []
    for section in dict.fromkeys(r["section"] for r in rows if r.get("extra")):
        section_rows = [r for r in rows if r["section"] == section and r.get("extra")]
        columns = list(dict.fromkeys(key for r in section_rows for key in r["extra"]))
        reward = (args.reward_model or "the gold sentiment scorer") if section == "ppo" else "configs/fine_grained.yaml's sources"
        out += ["", f"{section}: policy {args.policy or 'random (sizes above, embedded-world vocabulary)'}, reward {reward}, "
                f"{args.batch_size} prompts x {args.samples_per_prompt} samples, up to {args.max_new_tokens} new tokens, "
                f"{args.ppo_epochs} PPO epochs x {args.num_minibatches} minibatches. Generation tokens/s count every decoded "
                "position (rows that stopped early are still computed); in-step tokens/s count completion tokens only. "
                "Shares are of the summed step cost (CPU time on CPU, wall on CUDA).", "",
                "| mode | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for r in section_rows:
            out.append(f"| {r['mode']} | " + " | ".join(str(r["extra"].get(c, "")) for c in columns) + " |")
    return "\n".join(out) + ("\n" if out else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1000, help="words in the benchmark tokenizer")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (prompt = T/4)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    # on-policy sections (ppo, fine_grained)
    parser.add_argument("--policy", default=None, help="ppo/fine_grained: HF policy directory (default: random, embedded-world vocabulary)")
    parser.add_argument("--reward-model", default=None, help="ppo: reward model directory (default: the gold sentiment scorer)")
    parser.add_argument("--prompts", default=None, help="ppo/fine_grained: prompts JSONL (default: fresh embedded-world prompts)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="ppo/fine_grained: completion length limit")
    parser.add_argument("--samples-per-prompt", type=int, default=2, help="ppo/fine_grained: episodes per prompt")
    parser.add_argument("--ppo-epochs", type=int, default=4, help="ppo/fine_grained: passes over each rollout")
    parser.add_argument("--num-minibatches", type=int, default=2, help="ppo/fine_grained: minibatches per pass")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rows = []
    for name in args.sections:
        rows.extend(SECTIONS[name](args))
    table = (to_markdown(rows, args) if rows else "") + getattr(args, "appendix", "")
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
