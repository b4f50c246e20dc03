"""Peak memory of LoRA training: LoRA-DPO (reference = the base model with adapters disabled) against
LoRA-SFT on the same model, and full fine-tuning DPO with a live reference copy for comparison.

    python scripts/benchmark_memory.py                          # 103M-parameter Llama, CPU, ~3 min
    python scripts/benchmark_memory.py --hidden-size 2048 --layers 8 --out memory.md

Each mode runs in its own fresh (spawned) process: build the module, then ``--steps`` training steps
through Lightning on random token batches: DPO on ``B`` pairs of ``T`` tokens, SFT on the same ``2B``
sequences (chosen and rejected as ``2B`` demonstrations per step), so both forward the same tokens and
DPO adds only the reference forward (no gradient). Reported: the process's resident-set high-water
mark (``ru_maxrss``), absolute and as growth over the resident size after imports and data, with
glibc's mmap threshold pinned to 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so tensor buffers go back to the
OS on free and the high-water mark follows live tensors (weights, gradients, optimizer state,
activations) rather than allocator caching. On CUDA, ``max_memory_allocated`` instead.

The model is chosen large enough that its weights dominate (the default: Llama, hidden 1024, 6 layers,
vocabulary 1000: 103M parameters, 0.41 GB in float32, against activations of 4 x 64 tokens): what LoRA's
"one copy of the weights" claim is about. ``benchmark.py`` runs this as its ``lora_memory`` section.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/bench

from bench.harness import _config as harness_config, emit_table  # noqa: E402

MODES = ("sft_lora", "dpo_lora", "dpo_full")
LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
_MMAP_THRESHOLD = str(64 * 1024)


def _config(args) -> dict[str, Any]:
    return harness_config(args, head_dim=64)


class _Rows(torch.utils.data.Dataset):
    """Random preference pairs (``chosen_*`` / ``rejected_*``); with ``demonstrations`` each pair becomes
    two demonstration rows (``input_ids`` ...: its chosen, then its rejected sequence), so SFT forwards
    exactly the tokens DPO does."""

    def __init__(self, n: int, seq_len: int, vocab: int, demonstrations: bool = False):
        g = torch.Generator().manual_seed(0)
        prompt = seq_len // 4
        self.rows = []
        for i in range(n):
            row: dict[str, torch.Tensor] = {"index": torch.tensor(i)}
            for side, length in (("chosen", seq_len), ("rejected", 3 * seq_len // 4)):
                ids = torch.randint(3, vocab, (seq_len,), generator=g)
                attention = (torch.arange(seq_len) < length).long()
                completion = ((torch.arange(seq_len) >= prompt) & (attention == 1)).long()
                row.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_completion_mask": completion})
            if demonstrations:
                for side in ("chosen", "rejected"):
                    self.rows.append({"index": torch.tensor(len(self.rows)), "input_ids": row[f"{side}_input_ids"],
                                      "attention_mask": row[f"{side}_attention_mask"],
                                      "completion_mask": row[f"{side}_completion_mask"]})
            else:
                self.rows.append(row)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _module(mode: str, args, tokenizer_dir: str):
    from rlhf_lightning.modules import DPOModule, Optimization, SFTModule

    torch.manual_seed(0)
    optim = Optimization(lr=1e-5)
    peft = LORA if mode.endswith("_lora") else None
    if mode == "sft_lora":
        return SFTModule(_config(args), tokenizer_dir, peft=peft, optim=optim)
    return DPOModule(_config(args), tokenizer_dir, peft=peft, optim=optim)


def measure(mode: str, args) -> dict[str, Any]:
    """One mode in this process: peak memory (MB) and the policy's trainable / total parameter counts."""
    import lightning as L

    from rlhf_lightning.models import load_tokenizer, trainable_parameter_share
    from rlhf_lightning.modules import DPOModule, SFTModule  # noqa: F401  (imports before the baseline)
    from rlhf_lightning.synthetic.tokenizer import build_word_level_tokenizer

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    tokenizer_dir = tempfile.mkdtemp(prefix="bench-mem-tok-")
    try:
        build_word_level_tokenizer([f"w{i}" for i in range(args.vocab)], tokenizer_dir)
        vocab = len(load_tokenizer(tokenizer_dir))
        sft = mode.startswith("sft")
        rows = _Rows(args.steps * args.batch_size, args.seq_len, vocab, demonstrations=sft)
        loader = torch.utils.data.DataLoader(rows, batch_size=2 * args.batch_size if sft else args.batch_size)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device) / 2**20
        start_rss = _rss_mb()
        module = _module(mode, args, tokenizer_dir)
        trainable, total = trainable_parameter_share(module.policy)  # the policy's own (a live reference copy apart)
        trainer = L.Trainer(
            accelerator=device.type, devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            default_root_dir=tokenizer_dir,
        )
        trainer.fit(module, train_dataloaders=loader)
        if device.type == "cuda":
            peak, growth = torch.cuda.max_memory_allocated(device) / 2**20, torch.cuda.max_memory_allocated(device) / 2**20 - start
        else:
            peak, growth = _max_rss_mb(), _max_rss_mb() - start_rss
    finally:
        shutil.rmtree(tokenizer_dir, ignore_errors=True)
    return {"mode": mode, "peak_mb": peak, "growth_mb": growth, "trainable": trainable, "total": total, "device": str(device)}


def _child(mode, args, queue):
    try:
        queue.put(measure(mode, args))
    except BaseException as error:  # report, don't hang the parent
        queue.put({"error": repr(error)})


def spawn(mode: str, args) -> dict[str, Any]:
    """:func:`measure` in a fresh spawned interpreter (with the pinned mmap threshold on CPU)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = _MMAP_THRESHOLD
    try:
        process = ctx.Process(target=_child, args=(mode, args, queue))
        process.start()
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    result = queue.get()
    process.join()
    if "error" in result:
        raise RuntimeError(f"{mode}: {result['error']}")
    return result


def rows(args) -> list[dict[str, Any]]:
    """Every mode, each in its own process; ``vs sft_lora`` ratios on both the peak and the growth."""
    results = {mode: spawn(mode, args) for mode in args.modes}
    base = results.get("sft_lora")
    out = []
    for mode, r in results.items():
        row = dict(r)
        row["trainable_share"] = r["trainable"] / r["total"]
        if base is not None:
            row["peak_vs_sft_lora"] = r["peak_mb"] / base["peak_mb"]
            row["growth_vs_sft_lora"] = r["growth_mb"] / base["growth_mb"]
        out.append(row)
    return out


def to_markdown(results: list[dict[str, Any]], args) -> str:
    full = [r for r in results if not r["mode"].endswith("_lora")]
    params = full[0]["total"] if full else (results[0]["total"] - results[0]["trainable"] if results else 0)
    lines = [
        f"Model: Llama, hidden {args.hidden_size}, {args.layers} layers, vocab {args.vocab} "
        f"({params / 1e6:.1f}M parameters, {4 * params / 2**30:.2f} GiB in float32; {results[0]['device'] if results else '?'}, "
        f"{args.threads} thread(s)); {args.batch_size} pairs (SFT: {2 * args.batch_size} sequences) x {args.seq_len} tokens, "
        f"{args.steps} steps; "
        f"LoRA {LORA}.",
        "",
        "| mode | trainable params | share of the policy | peak RSS MB | growth MB | peak / LoRA-SFT | growth / LoRA-SFT |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['trainable']:,} | {100 * r['trainable_share']:.2f}% | {r['peak_mb']:.0f} | {r['growth_mb']:.0f} | "
            f"{r.get('peak_vs_sft_lora', float('nan')):.3f} | {r.get('growth_vs_sft_lora', float('nan')):.3f} |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step (SFT: twice as many sequences)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    table = to_markdown(rows(args), args)
    emit_table(table, args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
