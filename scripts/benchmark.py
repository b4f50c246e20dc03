"""Throughput and peak memory of the method modules against the bare compute they wrap.

    python scripts/benchmark.py                                   # every section, small defaults
    python scripts/benchmark.py --sections dpo rm --hidden-size 256 --layers 4 --batch-size 8 \
        --seq-len 256 --steps 20 --out bench.md

Each section times its module's full training step (Lightning loop, loss, logging, optimizer) on
random token batches and, in the same process, the *bare* cost of the same work written directly
with the Hugging Face model on the padded batch: for DPO one policy forward + backward on the
concatenated (2B, T) batch, one reference forward under ``no_grad`` and an AdamW step; for the reward
model one RM forward + backward over 2B sequences and an AdamW step; for SFT one forward + backward of
the completion NLL. Bare steps are interleaved with the module's (each right after the module step on
the same batch), so a change in machine load hits both alike. Warmup steps are excluded from timing.

The offline sections (dpo, rm, sft; ``scripts/bench/offline.py``) run each module in every batch
layout — padded, padding-free, shared prompt — on a default and a long-prompt pair shape (SFT on
variable-length demonstrations) and count the tokens each layout computes. The on-policy sections
(ppo, fine_grained; ``scripts/bench/onpolicy.py``) time generation and the phases of a PPO step.
``scripts/bench/harness.py`` holds the shared timers, memory probe and process spawning.

Step cost: on CUDA the median wall time (synchronised); on CPU the median *process CPU time* of a
step (``time.process_time``) — on a shared machine other processes stretch wall time by whatever
load they bring, while the CPU time a step burns is what the step itself costs. Both columns are
printed; ``step / bare`` = module step / bare step and ``x bare padded`` = bare step / module step, on
the basis just named.

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
import os
import sys
from typing import Any, Callable

import torch

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_SCRIPTS), _SCRIPTS]  # the package, and scripts/bench

from bench.harness import _device, _median, _step_cost, emit_table  # noqa: E402
from bench.offline import (  # noqa: E402
    PAIR_SHAPES,
    _measure,
    _row,
    bench_dpo,
    bench_rm,
    bench_sft,
    layout_table,
    token_counts,
)
from bench.onpolicy import _measure_onpolicy, _onpolicy_row, bench_fine_grained, bench_ppo, update_forward_rows  # noqa: E402

__all__ = ["SECTIONS", "build_parser", "main", "to_markdown"]

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
    "dpo": bench_dpo, "rm": bench_rm, "sft": bench_sft, "ppo": bench_ppo, "fine_grained": bench_fine_grained,
    "lora_memory": bench_lora_memory,
}


def to_markdown(rows, args) -> str:
    """The header, the offline sections' layout table, then the on-policy table and its phase tables."""
    device = _device(args)
    offline = [r for r in rows if "speedup" in r]
    rows = [r for r in rows if "speedup" not in r]
    lines = [
        f"Model: llama hidden {args.hidden_size}, {args.layers} layers, vocab {args.vocab}; batch {args.batch_size} pairs, "
        f"T = {args.seq_len}; {args.steps} timed steps after {args.warmup} warmup (median); device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {args.threads or torch.get_num_threads()} torch threads") + ".",
        "",
        f"Peak memory: {'CUDA max_memory_allocated growth' if device.type == 'cuda' else 'resident-set high-water-mark growth (mmap threshold 64 KiB)'}.",
        "",
    ]
    if offline:
        lines += [layout_table(offline, args)]
    if not rows:
        return "\n".join(lines)
    lines += [
        f"`step / bare` compares median {'wall' if device.type == 'cuda' else 'process CPU'} time per step.",
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
    parser.add_argument("--pair-shapes", nargs="+", default=list(PAIR_SHAPES), choices=list(PAIR_SHAPES),
                        help="dpo/rm: pair length shapes (scripts/bench/offline.py)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per pair sequence (shapes: scripts/bench/offline.py)")
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
    emit_table(table, args.out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
