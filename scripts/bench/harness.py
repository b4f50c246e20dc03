"""Measurement machinery shared by the benchmark sections: devices, timers, peak memory, fresh processes."""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
from typing import Any, Callable

import torch


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


def _config(args, head_dim: int = 32) -> dict[str, Any]:
    """The benchmark's random Llama: ``args.hidden_size`` wide, ``args.layers`` deep, heads of ``head_dim``."""
    return {
        "model_type": "llama",
        "hidden_size": args.hidden_size,
        "intermediate_size": 4 * args.hidden_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, args.hidden_size // head_dim),
        "num_key_value_heads": max(1, args.hidden_size // head_dim),
        "max_position_embeddings": max(256, args.seq_len),
        "tie_word_embeddings": False,
    }


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


def _child(fn, kind, args, bare, queue):
    try:
        queue.put(fn(kind, args, bare))
    except BaseException as error:  # report, don't hang the parent
        queue.put({"error": repr(error)})


def _spawn(fn: Callable, kind: str, args, env: dict[str, str], bare: str | None = None) -> dict[str, Any]:
    """``fn(kind, args, bare)`` (a module-level function) in a fresh spawned interpreter, with ``env`` set."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(fn, kind, args, bare, queue))
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


def emit_table(table: str, out: str | None) -> None:
    """Print a benchmark's markdown table and, with ``out``, write it there too."""
    print(table)
    if out:
        with open(out, "w") as f:
            f.write(table)
