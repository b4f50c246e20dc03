"""Offline sections (dpo, rm, sft): each module's full training step in every batch layout against the
bare padded Hugging Face step, interleaved in the same process.

Layouts (``layout`` of :func:`rlhf_lightning.modules.pair_forward.pair_logps`; SFT has the first two):

* ``padded``: the right-padded ``(2B, T)`` batch, as the bare step runs it;
* ``padding_free``: sequences packed first-fit into rows no longer than the batch's longest sequence;
* ``shared_prompt``: each pair as a tree (prompt once, both completions attending to it).

Shapes (``T = --seq-len``): ``default`` is the benchmark's historical pair shape — prompt T/4, chosen
completion 3T/4 (T tokens in all), rejected completion T/2 (3T/4 in all), every pair alike;
``long_prompt`` has the prompt 3x the completion, as in chat data — prompt 3T/4, chosen completion T/4,
rejected completion 3T/16; ``variable`` draws every length: prompt ~ U[T/16, 3T/8], each completion
~ U[T/16, 5T/8] (independently for chosen and rejected). SFT runs on variable-length demonstrations:
prompt ~ U[T/16, T/4] and completion ~ U[T/16, 3T/4] tokens. Variable-length batches are padded to
their longest (each pair side to its own, as the collators do).

Token counts per step: *computed* = positions the model runs (``2B x T`` padded, ``R x L`` packed);
*useful* = distinct real tokens (a pair's prompt counted once); *output positions* = positions that go
through the output layer and log-softmax (all computed positions padded; the scored ones packed).
"""

from __future__ import annotations

import argparse
import copy
import gc
import time
from typing import Any, Callable

import torch

from bench.harness import (
    _bare_result,
    _config,
    _device,
    _fit_module_timings,
    _bare_loop,
    _Memory,
    _median,
    _spawn,
    _step_cost,
    _sync,
    _token_logps_sum,
    _tokenizer_dir,
    _warm_up_kernels,
    _MMAP_THRESHOLD,
)

PAIR_SHAPES = ("default", "long_prompt", "variable")
PAIR_LAYOUTS = ("padded", "padding_free", "shared_prompt")
SFT_LAYOUTS = ("padded", "padding_free")


def pair_lengths(shape: str, seq_len: int, generator: torch.Generator | None = None) -> tuple[int, int, int]:
    """``(prompt, chosen completion, rejected completion)`` tokens of a pair of ``shape`` (``variable``
    draws them from ``generator``)."""
    if shape == "variable":
        low = max(1, seq_len // 16)
        draw = lambda high: int(torch.randint(low, max(low + 1, high + 1), (), generator=generator))  # noqa: E731
        return draw(3 * seq_len // 8), draw(5 * seq_len // 8), draw(5 * seq_len // 8)
    if shape == "default":
        prompt = seq_len // 4
        return prompt, seq_len - prompt, max(2, 3 * seq_len // 4 - prompt)
    if shape == "long_prompt":
        completion = seq_len // 4
        return seq_len - completion, completion, max(2, 3 * completion // 4)
    raise ValueError(f"unknown pair shape {shape!r}")


class PairDataset(torch.utils.data.Dataset):
    """Random preference rows of one shape (see the module docstring); chosen and rejected share the
    prompt's token ids, as real pairs do. Every row is right padded to ``seq_len``."""

    def __init__(self, n: int, seq_len: int, vocab: int, shape: str = "default", seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for i in range(n):
            prompt, chosen, rejected = pair_lengths(shape, seq_len, g)
            row = {"index": torch.tensor(i)}
            prompt_ids = torch.randint(0, vocab, (prompt,), generator=g)
            for side, completion in (("chosen", chosen), ("rejected", rejected)):
                ids = torch.zeros(seq_len, dtype=torch.long)
                ids[: prompt + completion] = torch.cat([prompt_ids, torch.randint(0, vocab, (completion,), generator=g)])
                attention = (torch.arange(seq_len) < prompt + completion).long()
                completion_mask = ((torch.arange(seq_len) >= prompt) & (attention == 1)).long()
                row.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_completion_mask": completion_mask})
            self.rows.append(row)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class DemonstrationDataset(torch.utils.data.Dataset):
    """Random variable-length demonstrations (see the module docstring), right padded to ``seq_len``."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        low = max(1, seq_len // 16)
        self.rows = []
        for i in range(n):
            prompt = int(torch.randint(low, max(low + 1, seq_len // 4 + 1), (), generator=g))
            completion = int(torch.randint(low, max(low + 1, 3 * seq_len // 4 + 1), (), generator=g))
            ids = torch.zeros(seq_len, dtype=torch.long)
            ids[: prompt + completion] = torch.randint(0, vocab, (prompt + completion,), generator=g)
            attention = (torch.arange(seq_len) < prompt + completion).long()
            self.rows.append({"index": torch.tensor(i), "input_ids": ids, "attention_mask": attention,
                              "completion_mask": ((torch.arange(seq_len) >= prompt) & (attention == 1)).long()})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _collate_trimmed(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack and cut the columns no row uses (dynamic padding to the batch's longest, as the collators
    do; each side of a pair to its own longest)."""
    batch = torch.utils.data.default_collate(rows)
    widths = {prefix: int(batch[f"{prefix}attention_mask"].sum(-1).max()) for prefix in ("", "chosen_", "rejected_")
              if f"{prefix}attention_mask" in batch}
    out = {}
    for key, value in batch.items():
        prefix = next((p for p in ("chosen_", "rejected_") if key.startswith(p)), "")
        out[key] = value[:, : widths[prefix]] if value.dim() == 2 else value
    return out


def _section(kind: str) -> str:
    return kind.split("_")[0]


def _loader(section: str, args, vocab):
    """The timed batches: ``batch_size`` pairs, or ``2 x batch_size`` demonstrations (the same number of
    sequences as a pair step), for ``warmup + steps`` steps."""
    steps = args.warmup + args.steps
    if section == "sft":
        data = DemonstrationDataset(steps * 2 * args.batch_size, args.seq_len, vocab)
        return torch.utils.data.DataLoader(data, batch_size=2 * args.batch_size, shuffle=False, collate_fn=_collate_trimmed)
    data = PairDataset(steps * args.batch_size, args.seq_len, vocab, shape=getattr(args, "shape", "default"))
    return torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=False, collate_fn=_collate_trimmed)


def _bare_step(kind: str, args, tokenizer, device) -> Callable[[dict], None]:
    """The bare padded work of a module's step, written directly against the HF model (``dpo``: policy
    forward+backward on the concatenated (2B, T) batch + reference forward under ``no_grad`` + AdamW;
    ``rm``: RM forward+backward over the 2B sequences + AdamW; ``sft``: forward+backward of the
    completion NLL over the (B, T) batch + AdamW)."""
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
    if kind == "sft":
        policy = load_causal_lm(_config(args), tokenizer=tokenizer).to(device).train()
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)

        def step(batch):
            mask = batch["completion_mask"] * batch["attention_mask"]
            logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = -_token_logps_sum(logits, batch["input_ids"], mask).sum() / mask[:, 1:].sum()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step
    raise ValueError(f"no bare step for {kind!r}")


def _module(kind: str, args, tokenizer_dir: str):
    """The LightningModule of a measurement kind: ``dpo_live``, ``dpo_precomputed``, ``rm`` or ``sft``,
    optionally with ``:<layout>`` (default ``padded``)."""
    from rlhf_lightning.modules import DPOModule, Optimization, RewardModelModule, SFTModule

    name, _, layout = kind.partition(":")
    layout = layout or "padded"
    if layout not in PAIR_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    packing = {"padding_free": layout != "padded", "shared_prompt": layout == "shared_prompt"}
    torch.manual_seed(0)
    if name in ("dpo_live", "dpo_precomputed"):
        return DPOModule(_config(args), tokenizer_dir, precompute_reference=name == "dpo_precomputed", optim=Optimization(lr=1e-5),
                         **packing)
    if name == "rm":
        return RewardModelModule(_config(args), tokenizer_dir, optim=Optimization(lr=1e-5), **packing)
    if name == "sft" and layout != "shared_prompt":
        return SFTModule(_config(args), tokenizer_dir, optim=Optimization(lr=1e-5), padding_free=packing["padding_free"])
    raise ValueError(f"unknown module kind {kind!r}")


def _measure(kind: str, args, bare: str | None = None) -> dict[str, Any]:
    """One measurement (run in a fresh process): step wall / CPU times and peak memory growth.

    ``kind`` is a module kind (see :func:`_module`) or ``"<section>_bare"``. With ``bare`` (a section
    name) the module's steps are interleaved with bare steps on the same batches — each bare step runs
    right after the module step it is compared with — so both see the same machine load; the bare
    timings come back as ``bare_times`` / ``bare_cpu_times`` (memory is then not meaningful).
    """
    import lightning as L

    torch.set_num_threads(args.threads) if args.threads else None
    device = _device(args)
    tok = _tokenizer_dir(args.vocab)
    # Everything imported and the data built before the memory baseline: only models, optimizer
    # state and activations count.
    from rlhf_lightning.models import load_tokenizer
    from rlhf_lightning.modules import DPOModule, RewardModelModule  # noqa: F401

    tokenizer = load_tokenizer(tok)
    section = "sft" if kind.startswith("sft") else "rm" if kind.startswith("rm") else "dpo"
    loader = _loader(section, args, len(tokenizer))
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


def _peak_memory(kind: str, args) -> float:
    """Peak memory of ``kind`` in its own fresh process (``warmup`` + 2 steps; on CPU with the pinned
    mmap threshold, see the entry point's docstring)."""
    memory_args = argparse.Namespace(**{**vars(args), "steps": min(args.steps, 2)})
    env = {} if _device(args).type == "cuda" else {"MALLOC_MMAP_THRESHOLD_": _MMAP_THRESHOLD}
    return _spawn(_measure, kind, memory_args, env)["peak_mb"]


def measure(kind: str, args, bare: str | None = None) -> dict[str, Any]:
    """:func:`_measure` in fresh spawned processes: one for the step times (``args.steps`` timed steps,
    interleaved with the ``bare`` section's bare steps when given), one for the peak memory."""
    timed = _spawn(_measure, kind, args, {}, bare)
    timed["peak_mb"] = _peak_memory(kind, args)
    return timed


# ------------------------------------------------------------------------------------------ token counts


def token_counts(section: str, layout: str, args, vocab: int) -> dict[str, float]:
    """Mean per step over the timed batches: ``computed``, ``useful`` and ``output`` positions (see the
    module docstring), from the same packing the modules run."""
    from rlhf_lightning.data.packing import pack_pairs, pack_sequences
    from rlhf_lightning.modules.pair_forward import concatenate_pair

    totals = {"computed": 0.0, "useful": 0.0, "output": 0.0}
    batches = list(_loader(section, args, vocab))[args.warmup :]
    for batch in batches:
        if section == "sft":
            ids, attention = batch["input_ids"], batch["attention_mask"]
            score = batch["completion_mask"] * attention
            packed = pack_sequences(ids, attention, score)
            useful = float(attention.sum())
        else:
            pair = concatenate_pair(batch)
            ids, attention = pair.input_ids, pair.attention_mask
            packed = pack_pairs(ids, attention, pair.completion_mask, pair.num_pairs, shared_prompt=layout == "shared_prompt")
            useful = float(pack_pairs(ids, attention, pair.completion_mask, pair.num_pairs).real_tokens)
        totals["useful"] += useful
        if layout == "padded":
            totals["computed"] += ids.numel()
            totals["output"] += ids.numel() if section != "rm" else 0
        else:
            totals["computed"] += packed.input_ids.numel()
            totals["output"] += len(packed.label_ids) if section != "rm" else 0
    return {k: v / len(batches) for k, v in totals.items()}


def _row(section: str, shape: str, mode: str, result: dict[str, Any], args, bare_cost: float, tokens: dict[str, float]) -> dict[str, Any]:
    cuda = _device(args).type == "cuda"
    wall = _median(result["times"])
    cpu = _median(result["cpu_times"]) if result.get("cpu_times") else float("nan")
    units = 2 * args.batch_size if section == "sft" else args.batch_size
    return {
        "section": section, "shape": shape, "mode": mode, "step_ms": 1000 * wall, "cpu_ms": 1000 * cpu,
        "per_s": units / (wall if cuda else cpu), "peak_mb": result["peak_mb"],
        "speedup": bare_cost / _step_cost(result, _device(args)), "paired": _paired_ratio_quartiles(result, cuda), **tokens,
    }


def _paired_ratio_quartiles(result: dict[str, Any], cuda: bool) -> tuple[float, float] | None:
    """First and third quartile of the per-step ratios bare step / module step, each module step paired
    with the bare step run right after it on the same batch (the spread of ``x bare padded``)."""
    key = "times" if cuda else "cpu_times"
    module, bare = result.get(key), result.get(f"bare_{key}")
    if not module or not bare or len(module) != len(bare):
        return None
    ratios = sorted(b / m for b, m in zip(bare, module))
    return ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]


def _layout_rows(section: str, shape: str, kinds: list[tuple[str, str]], args) -> list[dict[str, Any]]:
    """The bare padded row, then one row per ``(mode label, module kind)``; every module run interleaves
    its own bare steps, and its speedup is over those."""
    from rlhf_lightning.models import load_tokenizer

    args = argparse.Namespace(**{**vars(args), "shape": shape})
    device = _device(args)
    vocab = len(load_tokenizer(_tokenizer_dir(args.vocab)))
    bare_peak = _peak_memory(f"{section}_bare", args)
    rows, bare_row = [], None
    for label, kind in kinds:
        layout = kind.partition(":")[2] or "padded"
        result = measure(kind, args, bare=section)
        bare = _bare_result(result, bare_peak)
        bare_cost = _step_cost(bare, device)
        if bare_row is None:
            bare_row = _row(section, shape, "bare HF step, padded", bare, args, bare_cost, token_counts(section, "padded", args, vocab))
        rows.append(_row(section, shape, label, result, args, bare_cost, token_counts(section, layout, args, vocab)))
    return [bare_row, *rows]


def bench_dpo(args) -> list[dict[str, Any]]:
    """DPOModule (live and precomputed reference) in every layout against the bare padded step (policy
    fwd+bwd on the concatenated batch + reference fwd + AdamW), on both pair shapes."""
    rows = []
    for shape in args.pair_shapes:
        kinds = [(f"DPOModule, {ref} reference, {layout}", f"dpo_{ref}:{layout}") for ref in ("live", "precomputed") for layout in PAIR_LAYOUTS]
        rows += _layout_rows("dpo", shape, kinds, args)
    return rows


def bench_rm(args) -> list[dict[str, Any]]:
    """RewardModelModule in every layout against the bare padded RM fwd+bwd over 2B sequences + AdamW."""
    rows = []
    for shape in args.pair_shapes:
        rows += _layout_rows("rm", shape, [(f"RewardModelModule, {layout}", f"rm:{layout}") for layout in PAIR_LAYOUTS], args)
    return rows


def bench_sft(args) -> list[dict[str, Any]]:
    """SFTModule padded and padding-free against the bare padded NLL fwd+bwd + AdamW, on variable-length
    demonstrations."""
    return _layout_rows("sft", "variable", [(f"SFTModule, {layout}", f"sft:{layout}") for layout in SFT_LAYOUTS], args)


def layout_table(rows: list[dict[str, Any]], args) -> str:
    """Markdown table of the offline sections' rows."""
    cuda = _device(args).type == "cuda"
    basis = "wall" if cuda else "process CPU"
    lines = [
        f"Pairs/s (demonstrations/s for SFT) and `x bare padded` on median {basis} time per step; `x bare padded` = "
        "bare padded step time / this step's time, both measured interleaved in the same process. Token counts are "
        "means per step; waste = 1 - useful / computed (padding, and for pairs the prompt computed twice). "
        "`paired IQR`: quartiles of the per-step ratios (each module step over the bare step right after it).",
        "",
        "| section | shape | mode | tokens computed | useful | waste | output-layer positions | step wall (ms) | "
        f"step CPU (ms) | pairs/s ({'wall' if cuda else 'CPU'}) | peak memory (MiB) | x bare padded | paired IQR |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        waste = 1.0 - r["useful"] / r["computed"] if r["computed"] else float("nan")
        output = f"{r['output']:.0f}" if r["section"] != "rm" else "-"
        paired = f"{r['paired'][0]:.2f}-{r['paired'][1]:.2f}" if r.get("paired") else "-"
        lines.append(
            f"| {r['section']} | {r['shape']} | {r['mode']} | {r['computed']:.0f} | {r['useful']:.0f} | {100 * waste:.1f}% | "
            f"{output} | {r['step_ms']:.1f} | {r['cpu_ms']:.1f} | {r['per_s']:.1f} | {r['peak_mb']:.1f} | {r['speedup']:.2f}x | {paired} |"
        )
    return "\n".join(lines) + "\n"
