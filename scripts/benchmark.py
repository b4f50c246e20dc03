"""Throughput and peak memory of the method modules against the bare compute they wrap.

    python scripts/benchmark.py                                   # every section, small defaults
    python scripts/benchmark.py --sections dpo rm --hidden-size 256 --layers 4 --batch-size 8 \
        --seq-len 256 --steps 20 --out bench.md

Each section times its module's full training step (Lightning loop, loss, logging, optimizer) on
random token batches and, in the same run, the *bare* cost of the same work written directly
with the Hugging Face model: for DPO one policy forward + backward on the concatenated (2B, T)
batch, one reference forward under ``no_grad`` and an AdamW step; for the reward model one RM
forward + backward over 2B sequences and an AdamW step. ``overhead`` = module step / bare step.
Warmup steps are excluded from timing. Every measurement runs in a fresh process, so peak memory
(CUDA: ``max_memory_allocated``; CPU: max-RSS growth from the start of the measurement, which
includes the models' weights) is not polluted by the previous one.

Sections live in ``SECTIONS`` (name -> function(args) -> rows); add one to benchmark another method.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import resource
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


def _rss_mb() -> float:
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Memory:
    def __init__(self, device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device) / 2**20
        else:
            self.start = _rss_mb()

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.start
        return _rss_mb() - self.start


class _StepTimer:
    """Lightning callback: wall time of each training batch after ``warmup`` (CUDA-synchronised)."""

    def __new__(cls, warmup, device):
        import lightning as L

        class Timer(L.Callback):
            def __init__(self):
                self.times, self._t = [], 0.0

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                _sync(device)
                self._t = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                _sync(device)
                if batch_idx >= warmup:
                    self.times.append(time.perf_counter() - self._t)

        return Timer()


def _fit_module(module, args, loader, device) -> list[float]:
    import lightning as L

    timer = _StepTimer(args.warmup, device)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=args.warmup + args.steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    return timer.times


def _bare_loop(args, loader, device, step: Callable[[dict], None]) -> list[float]:
    times = []
    for i, batch in enumerate(loader):
        batch = {k: v.to(device) for k, v in batch.items()}
        _sync(device)
        start = time.perf_counter()
        step(batch)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def _token_logps_sum(logits, input_ids, mask):
    logits = logits[:, :-1].float()
    picked = torch.gather(logits, -1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return ((picked - torch.logsumexp(logits, -1)) * mask[:, 1:]).sum(-1)


# ------------------------------------------------------------------------------------------- measures


def _measure(kind: str, args) -> dict[str, Any]:
    """One measurement (run in a fresh process): returns step times and peak memory."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads) if args.threads else None
    device = _device(args)
    tok = _tokenizer_dir(args.vocab)
    from rlhf_lightning.models import load_causal_lm, load_reward_model, load_tokenizer

    tokenizer = load_tokenizer(tok)
    vocab = len(tokenizer)
    loader = _loader(args, vocab)
    memory = _Memory(device)
    if kind == "dpo_bare":
        from rlhf_lightning.modules.pair_forward import concatenate_pair

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

        times = _bare_loop(args, loader, device, step)
    elif kind in ("dpo_live", "dpo_precomputed"):
        from rlhf_lightning.modules import DPOModule, Optimization

        module = DPOModule(_config(args), tok, precompute_reference=kind == "dpo_precomputed", optim=Optimization(lr=1e-5))
        times = _fit_module(module, args, loader, device)
    elif kind == "rm_bare":
        from rlhf_lightning.models import reward_model_scores
        from rlhf_lightning.modules.pair_forward import concatenate_pair

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

        times = _bare_loop(args, loader, device, step)
    elif kind == "rm":
        from rlhf_lightning.modules import Optimization, RewardModelModule

        module = RewardModelModule(_config(args), tok, optim=Optimization(lr=1e-5))
        times = _fit_module(module, args, loader, device)
    else:
        raise ValueError(kind)
    return {"times": times, "peak_mb": memory.peak_mb()}


def _child(kind, args, queue):
    try:
        queue.put(_measure(kind, args))
    except BaseException as error:  # report, don't hang the parent
        queue.put({"error": repr(error)})


def measure(kind: str, args) -> dict[str, Any]:
    """:func:`_measure` in a fresh spawned process (clean peak-memory accounting)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_child, args=(kind, args, queue))
    process.start()
    result = queue.get()
    process.join()
    if "error" in result:
        raise RuntimeError(f"{kind}: {result['error']}")
    return result


def _row(section, mode, result, args, bare=None) -> dict[str, Any]:
    times = sorted(result["times"])
    median = times[len(times) // 2]
    row = {"section": section, "mode": mode, "step_ms": 1000 * median, "pairs_per_s": args.batch_size / median,
           "peak_mb": result["peak_mb"]}
    row["overhead"] = median / bare if bare else 1.0
    return row


# ------------------------------------------------------------------------------------------- sections


def bench_dpo(args) -> list[dict[str, Any]]:
    bare = measure("dpo_bare", args)
    bare_median = sorted(bare["times"])[len(bare["times"]) // 2]
    rows = [_row("dpo", "bare (policy fwd+bwd + ref fwd + AdamW)", bare, args)]
    for mode in ("live", "precomputed"):
        rows.append(_row("dpo", f"DPOModule, {mode} reference", measure(f"dpo_{mode}", args), args, bare_median))
    return rows


def bench_rm(args) -> list[dict[str, Any]]:
    bare = measure("rm_bare", args)
    bare_median = sorted(bare["times"])[len(bare["times"]) // 2]
    return [
        _row("rm", "bare (RM fwd+bwd over 2B + AdamW)", bare, args),
        _row("rm", "RewardModelModule", measure("rm", args), args, bare_median),
    ]


def bench_ppo(args) -> list[dict[str, Any]]:
    """PPOModule's full step (rollout: KV-cached generation of ``seq_len / 2`` tokens, old/ref/value
    forwards, scoring; then ppo_epochs x minibatches fwd+bwd+AdamW) against ``generate`` alone on the same
    prompts, its dominant cost at small scale. Runs in this process (generation needs no fresh state);
    "pairs/s" reads as episodes/s here (``batch_size`` prompts x 2 samples per step)."""
    import lightning as L

    from rlhf_lightning.generation import SamplingConfig, generate
    from rlhf_lightning.models import load_tokenizer
    from rlhf_lightning.modules import Optimization, PPOModule
    from rlhf_lightning.rewards import FunctionRewardSource

    torch.manual_seed(0)
    torch.set_num_threads(args.threads) if args.threads else None
    device = _device(args)
    tok = _tokenizer_dir(args.vocab)
    vocab = len(load_tokenizer(tok))
    prompt_len, new_tokens, samples = max(2, args.seq_len // 2), max(1, args.seq_len // 2), 2
    g = torch.Generator().manual_seed(0)
    rows = [
        {"prompt_input_ids": torch.randint(0, vocab, (prompt_len,), generator=g), "prompt_attention_mask": torch.ones(prompt_len, dtype=torch.long),
         "index": torch.tensor(i), "prompt_text": f"prompt {i}"}
        for i in range((args.warmup + args.steps) * args.batch_size)
    ]
    loader = torch.utils.data.DataLoader(rows, batch_size=args.batch_size, shuffle=False)
    sampling = SamplingConfig(max_new_tokens=new_tokens, num_samples_per_prompt=samples, stop_token_ids=[])
    module = PPOModule(
        _config(args), tok, reward=FunctionRewardSource(lambda p, c: len(c) / 100.0, name="length"), sampling=sampling,
        ppo_epochs=2, num_minibatches=2, optim=Optimization(lr=1e-5), log_samples_every_n_steps=0,
    )
    bare_times = []
    policy = copy.deepcopy(module.policy).to(device)
    for i, batch in enumerate(loader):
        _sync(device)
        start = time.perf_counter()
        generate(policy, module.tokenizer, batch["prompt_input_ids"].to(device), batch["prompt_attention_mask"].to(device),
                 max_new_tokens=new_tokens, num_samples_per_prompt=samples, seed=i)
        _sync(device)
        if i >= args.warmup:
            bare_times.append(time.perf_counter() - start)
    del policy
    memory = _Memory(device)
    times = _fit_module(module, args, loader, device)
    bare = {"times": bare_times, "peak_mb": float("nan")}
    bare_median = sorted(bare_times)[len(bare_times) // 2]
    return [
        _row("ppo", f"bare (generate {new_tokens} tokens x {samples} samples)", bare, args),
        _row("ppo", "PPOModule (rollout + 2 epochs x 2 minibatches)", {"times": times, "peak_mb": memory.peak_mb()}, args, bare_median),
    ]


SECTIONS: dict[str, Callable[[Any], list[dict[str, Any]]]] = {"dpo": bench_dpo, "rm": bench_rm, "ppo": bench_ppo}


def to_markdown(rows, args) -> str:
    device = _device(args)
    lines = [
        f"Model: llama hidden {args.hidden_size}, {args.layers} layers, vocab {args.vocab}; batch {args.batch_size} pairs, "
        f"T = {args.seq_len}; {args.steps} timed steps after {args.warmup} warmup (median); device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads") + ".",
        "",
        "| section | mode | step (ms) | pairs/s | peak memory (MiB) | step / bare |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['section']} | {r['mode']} | {r['step_ms']:.1f} | {r['pairs_per_s']:.1f} | {r['peak_mb']:.0f} | {r['overhead']:.3f} |")
    return "\n".join(lines) + "\n"


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
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rows = []
    for name in args.sections:
        rows.extend(SECTIONS[name](args))
    table = to_markdown(rows, args)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
