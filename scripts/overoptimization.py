"""Reward-model over-optimisation on the embedded world: Gao et al. 2022's curves and Coste et al. 2023's ensembles.

    python scripts/overoptimization.py --run-dir runs/overopt                 # the study (~20 CPU-minutes per PPO seed)
    python scripts/overoptimization.py --run-dir runs/overopt --stages report # re-fit and re-plot saved results
    python scripts/overoptimization.py --run-dir /tmp/oo --quick --world-dir W --sft-dir S   # CI smoke

Stages (each reuses what an earlier run left in ``--run-dir``):

1. ``world`` / ``sft``: an embedded world whose sentiment pairs carry ``--label-noise`` (default 0.25, Coste
   et al.'s setting) and a small SFT policy (the pipeline's ``--quick`` one); or ``--world-dir`` / ``--sft-dir``.
2. ``proxies``: proxy reward models (``configs/reward_model.yaml``) trained on the first ``pairs`` training
   pairs, at a few data amounts and model sizes, plus the ensemble members (same data, other seeds, so
   other initialisations and data orders). Held-out accuracy against gold on the noise-free val pairs.
3. ``bon``: best-of-n. ``--bon-samples`` completions per prompt are drawn once from the SFT policy and scored
   by every proxy and the gold scorer; every n <= N is then evaluated exactly from those draws
   (:func:`rlhf_lightning.evaluation.best_of_n_rows`), for each proxy and each ensemble objective: the mean of
   the members, the worst case (WCO, min) and uncertainty-weighted (UWO, mean - lambda var), members first
   standardised on the SFT draws. KL is best-of-n's analytic ``log n - (n - 1) / n``.
4. ``ppo``: PPO (``configs/ppo.yaml``, fixed KL coefficient ``--kl-coef``, no adaptive controller) against each
   objective in ``--ppo-objectives``, scored every ``--eval-every`` rollouts on held-out prompts by gold, by the
   proxy it optimises, and by its Monte-Carlo KL to the SFT policy (``scripts/gold_curves.py``).
5. ``report``: Gao's functional forms fitted by least squares to the gold gain over the start (d = sqrt(KL)):
   best-of-n ``d (alpha - beta d)``, RL ``d (alpha - beta log d)``; ``bon.csv``, ``ppo.csv``, ``fits.csv``,
   ``bon_peaks.csv`` (gold's peak over n and the paired drop after it), ``proxies.csv``, ``overoptimization.png``,
   ``ppo_vs_rollouts.png`` (gold and proxy vs sqrt(KL) per proxy and per ensemble objective)
   and ``summary.md``.

The proxy is drawn in gold units: its gain times the least-squares slope of gold on that proxy over the SFT
draws (what the proxy *predicts* gold gains). Where it keeps rising while gold flattens or falls, the proxy
is being over-optimised. Departures from the papers: the gold reward is the world's programmatic sentiment
scorer (Gao et al. use a 6B reward model as gold), proxies are 0.01-0.3M-parameter models trained from
scratch on up to a few thousand pairs, and PPO runs a few hundred rollouts on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from gold_curves import GoldCurve, fit_config, read_prompts, read_runs, write_csv  # noqa: E402

from rlhf_lightning.callbacks import AdaptiveKLController  # noqa: E402
from rlhf_lightning.evaluation import best_of_n, best_of_n_expectation, best_of_n_rows  # noqa: E402
from rlhf_lightning.pipeline import QUICK_WORLD, fit_stage, materialize_config, run_stage, stage_export_dir  # noqa: E402
from rlhf_lightning.rewards import (  # noqa: E402
    EnsembleRewardSource, FunctionRewardSource, RewardModelSource, aggregate_ensemble,
)

STAGES = ("world", "sft", "proxies", "bon", "ppo", "report")
OBJECTIVE = "sentiment"  # the gold objective the proxies are trained for
ENSEMBLE_AGGREGATIONS = {"ens_mean": "mean", "ens_wco": "min", "ens_uwo": "uncertainty"}

# Proxy reward-model sizes (configs/reward_model.yaml's is "s"): hidden, intermediate, layers, heads, kv heads.
SIZES = {
    "xs": (32, 64, 1, 4, 2),
    "s": (64, 128, 2, 4, 2),
    "m": (128, 256, 3, 4, 2),
}


class Proxy(NamedTuple):
    """One proxy reward model: trained on the first ``pairs`` training pairs, at ``size``, with ``seed``."""

    name: str
    pairs: int
    size: str
    seed: int

    @staticmethod
    def parse(spec: str) -> "Proxy":
        """``"pairs:size:seed"`` (e.g. ``"1000:s:0"``); the name is ``n<pairs>_<size>_seed<seed>``."""
        try:
            pairs, size, seed = spec.split(":")
            proxy = Proxy(f"n{int(pairs)}_{size}_seed{int(seed)}", int(pairs), size, int(seed))
        except ValueError:
            raise ValueError(f"a proxy is 'pairs:size:seed' (e.g. 1000:s:0), got {spec!r}") from None
        if proxy.size not in SIZES:
            raise ValueError(f"proxy size {proxy.size!r} in {spec!r}: choose from {sorted(SIZES)}")
        if proxy.pairs < 1:
            raise ValueError(f"proxy {spec!r} needs at least one training pair")
        return proxy


QUICK = dict(proxies=["150:xs:0"], ensemble=["150:xs:0", "150:xs:1"], bon_prompts=16, bon_samples=64,
             ppo_objectives=[], ppo_steps=0, min_rm_steps=30, eval_prompts=16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="outputs/overoptimization")
    parser.add_argument("--world-dir", default=None, help="an existing world (default: <run-dir>/world, written)")
    parser.add_argument("--sft-dir", default=None, help="an existing SFT policy (default: <run-dir>/sft, trained)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--label-noise", type=float, default=0.25, help="flip rate of the world's training pairs")
    parser.add_argument("--world-pairs", type=int, default=4000, help="training pairs the world writes")
    parser.add_argument("--proxies", nargs="+", default=None,
                        help="'pairs:size:seed' of each single proxy (default: 250, 1000, 4000 pairs at size s; "
                             "1000 pairs at sizes xs and m; seed 0)")
    parser.add_argument("--ensemble", nargs="+", default=None,
                        help="'pairs:size:seed' of each ensemble member (default: 1000 pairs, size s, seeds 0-3)")
    parser.add_argument("--rm-epochs", type=float, default=4.0, help="passes over its pairs per proxy")
    parser.add_argument("--min-rm-steps", type=int, default=None, help="at least this many steps (default 80)")
    parser.add_argument("--uwo-lambda", type=float, default=1.0, help="lambda of UWO (members standardised)")
    parser.add_argument("--bon-prompts", type=int, default=None,
                        help="prompts for best-of-n (default 192): the evaluation prompts, then training prompts")
    parser.add_argument("--bon-samples", type=int, default=None, help="draws per prompt, the largest n (default 256)")
    parser.add_argument("--ppo-objectives", nargs="*", default=None,
                        help="proxy names and/or ens_mean / ens_wco / ens_uwo to run PPO against "
                             "(default: the 250-, 1000- and 4000-pair proxies and the three ensembles)")
    parser.add_argument("--ppo-steps", type=int, default=None, help="rollouts per PPO run (default 120)")
    parser.add_argument("--eval-every", type=int, default=10, help="rollouts between PPO evaluations")
    parser.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts per PPO evaluation (default 64)")
    parser.add_argument("--kl-coef", type=float, default=0.01, help="PPO's fixed KL coefficient")
    parser.add_argument("--lr", type=float, default=1e-4, help="PPO learning rate")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0, help="world, SFT and best-of-n sampling seed")
    parser.add_argument("--ppo-seed", type=int, default=0, help="PPO's seed (training and rollouts)")
    parser.add_argument("--quick", action="store_true", help=f"CI smoke settings: {QUICK}")
    args = parser.parse_args(argv)
    defaults = dict(proxies=["250:s:0", "1000:s:0", "4000:s:0", "1000:xs:0", "1000:m:0"],
                    ensemble=[f"1000:s:{seed}" for seed in range(4)], bon_prompts=192, bon_samples=256,
                    ppo_objectives=["n250_s_seed0", "n1000_s_seed0", "n4000_s_seed0", *ENSEMBLE_AGGREGATIONS], ppo_steps=120,
                    min_rm_steps=80, eval_prompts=64)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    args.proxy_list = [Proxy.parse(s) for s in args.proxies]
    args.member_list = [Proxy.parse(s) for s in args.ensemble]
    if args.member_list and len(args.member_list) < 2:
        parser.error("--ensemble needs at least 2 members (or none)")
    known = {p.name for p in args.proxy_list + args.member_list} | (set(ENSEMBLE_AGGREGATIONS) if args.member_list else set())
    unknown = [o for o in args.ppo_objectives if o not in known]
    if unknown:
        parser.error(f"--ppo-objectives {unknown} name no proxy or ensemble; known: {sorted(known)}")
    if args.bon_samples < 1 or args.bon_prompts < 1:
        parser.error("--bon-samples and --bon-prompts must be >= 1")
    return args


# ---- stages 1-2: world, SFT policy, proxies -----------------------------------------------------------


def prepare_base(args, run_dir: Path) -> tuple[Path, Path]:
    """The world and the SFT policy: given, found in ``run_dir``, or made there."""
    from rlhf_lightning.synthetic import write_world

    world = Path(args.world_dir) if args.world_dir else run_dir / "world"
    if not args.world_dir:
        sizes = dict(QUICK_WORLD, n_pairs=args.world_pairs)
        write_world(world, seed=args.seed, label_noise=args.label_noise, objectives=(OBJECTIVE,), **sizes)
    sft = Path(args.sft_dir) if args.sft_dir else stage_export_dir(run_dir / "sft")
    if not (sft / "config.json").exists():
        if args.sft_dir:
            raise FileNotFoundError(f"--sft-dir {sft} holds no HF model (config.json)")
        if world != run_dir / "world":
            raise FileNotFoundError(f"no SFT policy in {sft}: train one on {world} first, or pass --sft-dir")
        print(f"[overopt] training the SFT policy (the pipeline's --quick stage) into {sft}", flush=True)
        run_stage("sft", run_dir, quick=True, seed=args.seed, quiet=True)
    return world, sft


def train_proxy(proxy: Proxy, args, world: Path, run_dir: Path) -> Path:
    """Fit one proxy reward model (reused when its export exists); returns its HF export."""
    subset = run_dir / "pairs" / f"{OBJECTIVE}_first{proxy.pairs}.jsonl"
    if not subset.exists():
        with open(world / f"pairs_{OBJECTIVE}_train.jsonl") as handle:
            lines = [line for line in handle if line.strip()][: proxy.pairs]
        if len(lines) < proxy.pairs:
            raise ValueError(f"proxy {proxy.name} wants {proxy.pairs} pairs; {world} has {len(lines)} (--world-pairs)")
        subset.parent.mkdir(parents=True, exist_ok=True)
        subset.write_text("".join(lines))
    steps = max(args.min_rm_steps, math.ceil(args.rm_epochs * proxy.pairs / 32))
    hidden, intermediate, layers, heads, kv_heads = SIZES[proxy.size]
    overrides = [
        f"--seed_everything={proxy.seed}", f"--model.init_args.tokenizer={world}/tokenizer",
        f"--model.init_args.model.hidden_size={hidden}", f"--model.init_args.model.intermediate_size={intermediate}",
        f"--model.init_args.model.num_hidden_layers={layers}", f"--model.init_args.model.num_attention_heads={heads}",
        f"--model.init_args.model.num_key_value_heads={kv_heads}",
        f"--data.init_args.train_file={subset}", f"--data.init_args.val_file={world}/pairs_{OBJECTIVE}_val.jsonl",
        f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}",
        f"--model.init_args.optim.warmup_steps={max(1, steps // 10)}", "--trainer.logger=false",
    ]
    stage_dir = run_dir / "proxies" / proxy.name
    started = time.perf_counter()
    export = fit_stage(materialize_config("reward_model.yaml", run_dir), stage_dir, overrides, quiet=True)
    print(f"[overopt] proxy {proxy.name}: {steps} steps ({time.perf_counter() - started:.0f} s)", flush=True)
    return export


def proxy_accuracy(source: RewardModelSource, val_file: Path) -> float:
    """Fraction of the noise-free validation pairs the proxy orders as gold does."""
    with open(val_file) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    prompts = [r["prompt"] for r in records]
    chosen = source(prompts, [r["chosen"] for r in records])
    rejected = source(prompts, [r["rejected"] for r in records])
    return float((chosen > rejected).float().mean())


def load_proxies(args, world: Path, run_dir: Path, train: bool) -> tuple[dict[str, RewardModelSource], list[dict]]:
    """Every proxy and member as a reward source (trained first with ``train``), and a table row per model."""
    sources, rows = {}, []
    for proxy in dict.fromkeys(args.proxy_list + args.member_list):  # ordered, a shared model once
        export = train_proxy(proxy, args, world, run_dir) if train else stage_export_dir(run_dir / "proxies" / proxy.name)
        if not (export / "config.json").exists():
            raise FileNotFoundError(f"proxy {proxy.name} has no export in {export}: run the 'proxies' stage")
        source = RewardModelSource(str(export), batch_size=256, name=proxy.name)
        source.model_dir = str(export)
        sources[proxy.name] = source
        parameters = sum(p.numel() for p in source.model.parameters())
        rows.append({"proxy": proxy.name, "pairs": proxy.pairs, "size": proxy.size, "seed": proxy.seed,
                     "parameters": parameters, "val_accuracy": proxy_accuracy(source, world / f"pairs_{OBJECTIVE}_val.jsonl"),
                     "member": proxy in args.member_list, "single": proxy in args.proxy_list})
    return sources, rows


# ---- stage 3: best-of-n ----------------------------------------------------------------------------


def standardized(grids: dict[str, torch.Tensor], names: Sequence[str]) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """``(K, P, N)`` member scores, each standardised to mean 0 / std 1 over the SFT draws, and the constants."""
    stats = [(float(grids[n].mean()), float(grids[n].std())) for n in names]
    return torch.stack([(grids[n] - mu) / sd for n, (mu, sd) in zip(names, stats)]), stats


def run_bon(args, world: Path, sft: Path, sources: dict, run_dir: Path) -> dict[str, torch.Tensor]:
    """Draw ``--bon-samples`` completions per prompt from the SFT policy once and score them by every proxy,
    the gold scorer and length; saves and returns the ``(P, N)`` grids (``bon_grids.pt``)."""
    from rlhf_lightning.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(sft), padding_side="left")
    policy = load_causal_lm(str(sft), tokenizer=tokenizer)
    # Held-out prompts first; when more are asked for, the training prompts (never seen in SFT; best-of-n
    # trains nothing) fill up the rest.
    prompts = read_prompts(str(world / "prompts_eval.jsonl"), args.bon_prompts)
    prompts += read_prompts(str(world / "prompts_train.jsonl"), args.bon_prompts - len(prompts))
    started = time.perf_counter()
    result = best_of_n(policy, tokenizer, prompts, selectors=sources, scorers=[OBJECTIVE], num_samples=args.bon_samples,
                       ns=[1], max_new_tokens=args.max_new_tokens, batch_size=max(1, 1024 // args.bon_samples),
                       seed=args.seed)
    print(f"[overopt] best-of-n: {len(result.samples)} draws scored in {time.perf_counter() - started:.0f} s", flush=True)
    shape = (len(prompts), args.bon_samples)
    grids = dict(result.scores)
    for key, column in (("gold", f"gold/{OBJECTIVE}"), ("length", "length")):
        grids[key] = torch.tensor([s[column] for s in result.samples], dtype=torch.float64).view(shape)
    torch.save(grids, run_dir / "bon_grids.pt")
    (run_dir / "bon_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in result.samples[: 8 * shape[1]]))
    return grids


def bon_rows(grids: dict[str, torch.Tensor], args) -> tuple[list[dict], list[dict], dict]:
    """Best-of-n rows for every proxy, every ensemble objective and the gold scorer itself (the ceiling); per
    selector, the gold peak over n and the paired drop from it to the largest n; the members' standardisation
    (reused by PPO's ensemble rewards)."""
    P, N = grids["gold"].shape
    ns = [n for n in (2**k for k in range(20)) if n <= N]
    selection = {p.name: grids[p.name] for p in dict.fromkeys(args.proxy_list + args.member_list)}  # members too
    members = [p.name for p in args.member_list]
    standard: dict[str, Any] = {}
    if members:
        stacked, stats = standardized(grids, members)
        standard = {"members": members, "stats": stats, "uwo_lambda": args.uwo_lambda}
        for name, aggregation in ENSEMBLE_AGGREGATIONS.items():
            flat = aggregate_ensemble(stacked.view(len(members), -1), aggregation, uncertainty_coef=args.uwo_lambda)
            selection[name] = flat.view(P, N)
    selection["gold"] = grids["gold"]
    rows, peaks = [], []
    for name, grid in selection.items():
        # The proxy in gold standard deviations: one proxy SD over the SFT draws counts as one gold SD.
        scale = float(grids["gold"].std() / grid.std())
        for row in best_of_n_rows({name: grid}, {"gold": grids["gold"], "proxy": grid, "length": grids["length"]}, ns):
            row["proxy_scale"] = scale
            row["prompts"] = P
            row["proxy_in_gold_sd"] = scale * row["proxy"]
            rows.append(row)
        # Does gold fall after its peak? Paired over prompts: E[gold | best of n_peak] - E[gold | best of N].
        per_prompt = torch.stack([best_of_n_expectation(grid, grids["gold"], n) for n in ns])  # (len(ns), P)
        peak = int(per_prompt.mean(dim=1).argmax())
        drop = per_prompt[peak] - per_prompt[-1]
        peaks.append({"selector": name, "n_peak": ns[peak], "gold_peak": float(per_prompt[peak].mean()),
                      "gold_at_max_n": float(per_prompt[-1].mean()), "drop": float(drop.mean()),
                      "drop_se": float(drop.std() / math.sqrt(P)) if P > 1 else math.nan})
    return rows, peaks, standard


# ---- stage 4: PPO against each objective -------------------------------------------------------------


def reward_for(objective: str, sources: dict, standard: dict, args) -> Any:
    """The reward source PPO optimises for ``objective``: one proxy, or an ensemble of standardised members."""
    if objective not in ENSEMBLE_AGGREGATIONS:
        return sources[objective]
    members = []
    for name, (mu, sd) in zip(standard["members"], standard["stats"]):
        score = lambda p, c, source=sources[name], mu=mu, sd=sd: ((source(p, c) - mu) / sd).tolist()  # noqa: E731
        members.append(FunctionRewardSource(score, name=name, batched=True))
    return EnsembleRewardSource(members, ENSEMBLE_AGGREGATIONS[objective], uncertainty_coef=standard["uwo_lambda"],
                                name=objective)


def run_ppo(objective: str, args, world: Path, sft: Path, sources: dict, standard: dict, out: Path) -> list[dict]:
    """One PPO run against ``objective``; returns its evaluation rows (step, gold, proxy, KL, ...)."""
    reward = reward_for(objective, sources, standard, args)
    curve = GoldCurve(read_prompts(str(world / "prompts_eval.jsonl"), args.eval_prompts), args.eval_every,
                      weights={OBJECTIVE: 1.0}, max_new_tokens=args.max_new_tokens, scorers={"proxy": reward})
    overrides = [
        f"--seed_everything={args.ppo_seed}", f"--model.init_args.seed={args.ppo_seed}", f"--trainer.max_steps={args.ppo_steps}",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={out / 'runs' / f'{objective}_seed{args.ppo_seed}'}", f"--model.init_args.policy={sft}",
        f"--model.init_args.tokenizer={world}/tokenizer", "--model.init_args.log_samples_every_n_steps=0",
        # the config's reward model is replaced below (set_reward); point it at a proxy so that it loads
        f"--model.init_args.reward.init_args.model={next(iter(sources.values())).model_dir}",
        f"--data.init_args.train_file={world}/prompts_train.jsonl", "--data.init_args.val_file=null",
        f"--model.init_args.kl_coef={args.kl_coef}", f"--model.init_args.optim.lr={args.lr}",
        f"--model.init_args.sampling.max_new_tokens={args.max_new_tokens}",
    ]

    def set_reward(module) -> None:
        module.reward_fn = reward

    started = time.perf_counter()
    print(f"[overopt] PPO against {objective}: {args.ppo_steps} rollouts, kl_coef {args.kl_coef}", flush=True)
    config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "ppo.yaml")
    fit_config(config, overrides, curve, on_module=set_reward,
               edit_callbacks=lambda cbs: [c for c in cbs if not isinstance(c, AdaptiveKLController)])
    print(f"[overopt] PPO against {objective} done in {time.perf_counter() - started:.0f} s", flush=True)
    return [{"objective": objective, "seed": args.ppo_seed, **row} for row in curve.rows]


# ---- stage 5: Gao's fits, plots and summary -------------------------------------------------------


def fit_gao(d: Sequence[float], gain: Sequence[float], form: str) -> dict[str, float]:
    """Least-squares fit of Gao et al.'s form to the gold gain over the start, ``gain(d)`` with d = sqrt(KL).

    ``form="bon"``: ``gain = d (alpha - beta d)``; ``form="rl"``: ``gain = d (alpha - beta log d)`` (d log d -> 0
    at d = 0). Both are linear in (alpha, beta) with no intercept. Returns alpha, beta, R^2 (1 - SS_res / SS_tot
    around the mean gain), the number of points and the d where the fitted curve peaks (inf if it never turns).
    """
    if form not in ("bon", "rl"):
        raise ValueError(f"form must be 'bon' or 'rl', got {form!r}")
    x = torch.tensor(list(d), dtype=torch.float64)
    y = torch.tensor(list(gain), dtype=torch.float64)
    if len(x) < 3:
        raise ValueError(f"fitting needs at least 3 points, got {len(x)}")
    second = x * x if form == "bon" else torch.where(x > 0, x * torch.log(x.clamp(min=1e-12)), torch.zeros_like(x))
    design = torch.stack([x, -second], dim=1)
    alpha, beta = torch.linalg.lstsq(design, y[:, None]).solution.flatten().tolist()
    residual = y - design @ torch.tensor([alpha, beta], dtype=torch.float64)
    total = ((y - y.mean()) ** 2).sum()
    r2 = float(1 - (residual**2).sum() / total) if total > 0 else math.nan
    if beta <= 0:
        peak = math.inf
    else:
        peak = alpha / (2 * beta) if form == "bon" else math.exp(alpha / beta - 1)
    return {"alpha": alpha, "beta": beta, "r2": r2, "points": len(x), "peak_d": peak}


def fit_rows(bon_rows: list[dict], ppo_rows: list[dict]) -> list[dict]:
    """One fit per best-of-n selector and per PPO objective."""
    fits = []
    for name in dict.fromkeys(r["selector"] for r in bon_rows):
        rows = sorted((r for r in bon_rows if r["selector"] == name), key=lambda r: r["n"])
        base = rows[0]["gold"]
        fit = fit_gao([r["sqrt_kl"] for r in rows], [r["gold"] - base for r in rows], "bon")
        best = max(rows, key=lambda r: r["gold"])
        fits.append({"method": "best-of-n", "objective": name, **fit, "gold_start": base, "gold_end": rows[-1]["gold"],
                     "gold_best": best["gold"], "d_best": best["sqrt_kl"], "d_end": rows[-1]["sqrt_kl"]})
    for run in dict.fromkeys((r["objective"], r["seed"]) for r in ppo_rows):
        rows = sorted((r for r in ppo_rows if (r["objective"], r["seed"]) == run), key=lambda r: r["step"])
        base = rows[0]["gold"]
        d = [math.sqrt(max(r["kl_to_reference"], 0.0)) for r in rows]
        fit = fit_gao(d, [r["gold"] - base for r in rows], "rl")
        best = max(rows, key=lambda r: r["gold"])
        fits.append({"method": "ppo", "objective": run[0], "seed": run[1], **fit, "gold_start": base, "gold_end": rows[-1]["gold"],
                     "gold_best": best["gold"], "d_best": math.sqrt(max(best["kl_to_reference"], 0.0)), "d_end": d[-1]})
    return fits


def plot(bon_rows: list[dict], ppo_rows: list[dict], fits: list[dict], scales: dict[str, float], path: Path,
         proxies: list[Proxy]) -> None:
    """Gold (solid) and proxy in gold standard deviations (dashed) vs sqrt(KL); fits dotted. Rows: best-of-n, PPO; columns:
    proxies by data amount, proxies by size, ensemble objectives."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    singles = [p.name for p in proxies]
    by_data = sorted({p.name for p in proxies if p.size == "s"}, key=lambda n: next(p.pairs for p in proxies if p.name == n))
    order = list(SIZES)
    by_size = [p.name for p in sorted(proxies, key=lambda p: order.index(p.size)) if p.pairs == 1000]
    groups = [("proxies by data (size s)", by_data or singles), ("proxies by size (1000 pairs)", by_size),
              ("ensembles and the gold scorer itself", [*ENSEMBLE_AGGREGATIONS, "gold"])]
    fit_of = {(f["method"], f["objective"], f.get("seed", 0)): f for f in fits}
    figure, axes = plt.subplots(2, 3, figsize=(14, 7.5), squeeze=False)
    for col, (title, names) in enumerate(groups):
        for row_index, (method, rows_all) in enumerate((("best-of-n", bon_rows), ("ppo", ppo_rows))):
            axis = axes[row_index][col]
            key = "selector" if method == "best-of-n" else "objective"
            for i, name in enumerate(names):
                seeds = sorted({r.get("seed", 0) for r in rows_all if r[key] == name})
                for j, seed in enumerate(seeds):  # best-of-n: one set of draws; PPO: one line per seed
                    rows = [r for r in rows_all if r[key] == name and r.get("seed", 0) == seed]
                    rows.sort(key=lambda r: r["n"] if method == "best-of-n" else r["step"])
                    d = [r["sqrt_kl"] if method == "best-of-n" else math.sqrt(max(r["kl_to_reference"], 0.0)) for r in rows]
                    gold = [r["gold"] - rows[0]["gold"] for r in rows]
                    proxy = [scales.get(name, 1.0) * (r["proxy"] - rows[0]["proxy"]) for r in rows]
                    colour = f"C{i}"
                    axis.plot(d, gold, "-o", color=colour, markersize=3, alpha=1.0 if j == 0 else 0.5,
                              label=f"{name} gold" if j == 0 else None)
                    axis.plot(d, proxy, "--", color=colour, alpha=0.7 if j == 0 else 0.35, label=f"{name} proxy" if j == 0 else None)
                    fit = fit_of.get((method, name, seed))
                    if fit is not None and len(d) > 1:
                        grid = torch.linspace(0, max(d), 50, dtype=torch.float64)
                        second = grid**2 if method == "best-of-n" else grid * torch.log(grid.clamp(min=1e-12))
                        axis.plot(grid, fit["alpha"] * grid - fit["beta"] * second, ":", color=colour, alpha=0.8)
            axis.axhline(0, color="gray", linewidth=0.5)
            axis.set_title(f"{'Best-of-n' if method == 'best-of-n' else 'PPO'}: {title}", fontsize=9)
            axis.set_xlabel("d = sqrt(KL to SFT)  [sqrt nats]")
            axis.set_ylabel(f"gain over start (gold {OBJECTIVE} units)")
            axis.grid(alpha=0.3)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=6, ncol=2)
    figure.suptitle("Gain over the start: gold (solid), proxy scaled to gold's SD on the SFT draws (dashed); "
                    "Gao et al.'s fits to gold (dotted)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    if not ppo_rows:
        return
    # PPO's KL is not monotone in rollouts (it jumps, then wanders): the same runs against rollouts.
    objectives = list(dict.fromkeys(r["objective"] for r in ppo_rows))
    columns = 4
    rows_needed = math.ceil((len(objectives) + 1) / columns)
    figure, grid = plt.subplots(rows_needed, columns, figsize=(4 * columns, 3.3 * rows_needed), squeeze=False)
    panels = [axis for row in grid for axis in row]
    kl_axis = panels[len(objectives)]
    for i, name in enumerate(objectives):
        axis = panels[i]
        for j, seed in enumerate(sorted({r["seed"] for r in ppo_rows if r["objective"] == name})):
            rows = sorted((r for r in ppo_rows if r["objective"] == name and r["seed"] == seed), key=lambda r: r["step"])
            steps = [r["step"] for r in rows]
            colour = f"C{j}"
            axis.plot(steps, [r["gold"] for r in rows], "-o", color=colour, markersize=3, label=f"gold, seed {seed}")
            axis.plot(steps, [rows[0]["gold"] + scales.get(name, 1.0) * (r["proxy"] - rows[0]["proxy"]) for r in rows],
                      "--", color=colour, alpha=0.7, label=f"proxy, seed {seed}")
            kl_axis.plot(steps, [r["kl_to_reference"] for r in rows], "-" if j == 0 else "--", color=f"C{i}", linewidth=1,
                         label=name if j == 0 else None)
        axis.set_title(f"PPO against {name}", fontsize=9)
        axis.set(xlabel="rollouts", ylabel=f"gold {OBJECTIVE}")
        axis.axhline(rows[0]["gold"], color="gray", linewidth=0.5)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    kl_axis.set_title("KL to SFT (solid seed 0, dashed seed 1)", fontsize=9)
    kl_axis.set(xlabel="rollouts", ylabel="nats / completion")
    kl_axis.grid(alpha=0.3)
    kl_axis.legend(fontsize=6)
    for axis in panels[len(objectives) + 1:]:
        axis.axis("off")
    figure.suptitle("PPO: gold (solid) and the proxy in gold SDs from the start (dashed)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path.with_name("ppo_vs_rollouts.png"), dpi=100)
    plt.close(figure)


def summarize(proxy_rows: list[dict], bon_rows: list[dict], peaks: list[dict], ppo_rows: list[dict], fits: list[dict],
              args) -> str:
    lines = ["## Proxies", "", "| proxy | pairs | size | seed | parameters | held-out accuracy vs gold |", "|---|---|---|---|---|---|"]
    for r in proxy_rows:
        lines.append(f"| {r['proxy']} | {r['pairs']} | {r['size']} | {r['seed']} | {r['parameters']} | {r['val_accuracy']:.3f} |")
    lines += ["", "## Fits of Gao et al.'s forms (gain of gold over the start, d = sqrt(KL))", "",
              "| method | objective | alpha | beta | R^2 | points | fitted peak d | gold start | best gold (at d) | gold at end (d) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for f in fits:
        seed = f" (seed {f['seed']})" if f["method"] == "ppo" else ""
        lines.append(f"| {f['method']} | {f['objective']}{seed} | {f['alpha']:+.3f} | {f['beta']:+.3f} | {f['r2']:.3f} | {f['points']} "
                     f"| {f['peak_d']:.2f} | {f['gold_start']:+.3f} | {f['gold_best']:+.3f} ({f['d_best']:.2f}) "
                     f"| {f['gold_end']:+.3f} ({f['d_end']:.2f}) |")
    if bon_rows:
        ns = sorted({r["n"] for r in bon_rows})
        lines += ["", "## Best-of-n: gold (proxy gain in gold SDs, added to gold at n=1) by n", "",
                  "| objective | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
        for name in dict.fromkeys(r["selector"] for r in bon_rows):
            rows = {r["n"]: r for r in bon_rows if r["selector"] == name}
            lines.append(f"| {name} | " + " | ".join(
                f"{rows[n]['gold']:+.3f} ({rows[n]['proxy_in_gold_sd'] - rows[1]['proxy_in_gold_sd'] + rows[1]['gold']:+.3f})"
                for n in ns) + " |")
        se = max(r["gold_se"] for r in bon_rows)
        lines += ["", f"Standard error of a gold entry over the {int(bon_rows[0]['prompts'])} prompts: at most {se:.3f}."]
    if peaks:
        lines += ["", "## Best-of-n: does gold fall after its peak? (paired over prompts)", "",
                  "| objective | n at gold's peak | gold at peak | gold at largest n | drop | s.e. of drop |", "|---|---|---|---|---|---|"]
        for r in peaks:
            lines.append(f"| {r['selector']} | {r['n_peak']} | {r['gold_peak']:+.3f} | {r['gold_at_max_n']:+.3f} | "
                         f"{r['drop']:+.3f} | {r['drop_se']:.3f} |")
    if ppo_rows:
        lines += ["", "## PPO: gold's peak and the last three evaluations", "",
                  "| objective | seed | gold at start | best gold (rollout) | mean gold, last 3 evaluations | proxy at best -> mean of last 3 "
                  "| KL at end | length at end | fluency at end |", "|---|---|---|---|---|---|---|---|---|"]
        for name, seed in dict.fromkeys((r["objective"], r["seed"]) for r in ppo_rows):
            rows = sorted((r for r in ppo_rows if (r["objective"], r["seed"]) == (name, seed)), key=lambda r: r["step"])
            best = max(rows, key=lambda r: r["gold"])
            last = rows[-3:]
            mean = lambda key: sum(r[key] for r in last) / len(last)  # noqa: E731
            lines.append(f"| {name} | {seed} | {rows[0]['gold']:+.3f} | {best['gold']:+.3f} ({best['step']}) | {mean('gold'):+.3f} "
                         f"| {best['proxy']:+.2f} -> {mean('proxy'):+.2f} | {rows[-1]['kl_to_reference']:.1f} "
                         f"| {rows[-1]['response_length']:.1f} | {rows[-1]['fluency']:.2f} |")
        lines += ["", "## PPO: gold / proxy (raw) / KL by rollout", ""]
        steps = sorted({r["step"] for r in ppo_rows})
        lines += ["| objective | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---|" * len(steps)]
        for name, seed in dict.fromkeys((r["objective"], r["seed"]) for r in ppo_rows):
            rows = {r["step"]: r for r in ppo_rows if (r["objective"], r["seed"]) == (name, seed)}
            lines.append(f"| {name} (seed {seed}) | " + " | ".join(
                f"{rows[s]['gold']:+.2f} / {rows[s]['proxy']:+.2f} / {rows[s]['kl_to_reference']:.1f}" if s in rows else ""
                for s in steps) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    world, sft = prepare_base(args, run_dir)
    if not {"proxies", "bon", "ppo", "report"} & set(args.stages):
        return 0
    sources, proxy_rows = load_proxies(args, world, run_dir, train="proxies" in args.stages)
    write_csv(str(run_dir / "proxies.csv"), proxy_rows)
    for r in proxy_rows:
        print(f"[overopt] {r['proxy']}: {r['parameters']} parameters, held-out accuracy {r['val_accuracy']:.3f}", flush=True)

    standard_file = run_dir / "ensemble_standardization.json"
    if "bon" in args.stages:
        grids = run_bon(args, world, sft, sources, run_dir)
    elif (run_dir / "bon_grids.pt").exists():
        grids = torch.load(run_dir / "bon_grids.pt")
    else:
        grids = None
    if grids is not None:  # every n and every ensemble objective from the one set of draws
        rows, peaks, standard = bon_rows(grids, args)
        write_csv(str(run_dir / "bon.csv"), rows, first=["selector", "n", "kl_bon", "sqrt_kl", "gold", "proxy"])
        write_csv(str(run_dir / "bon_peaks.csv"), peaks)
        standard_file.write_text(json.dumps(standard, indent=1))
    if "ppo" in args.stages and args.ppo_objectives and args.ppo_steps > 0:
        if not standard_file.exists():
            raise FileNotFoundError(f"{standard_file} is missing: run the 'bon' stage first (it standardises the members)")
        standard = json.loads(standard_file.read_text())
        for objective in args.ppo_objectives:
            out = run_dir / "ppo" / f"{objective}_seed{args.ppo_seed}"
            rows = run_ppo(objective, args, world, sft, sources, standard, run_dir / "ppo")
            write_csv(str(out / "curves.csv"), rows, first=["objective", "seed", "step", "gold", "proxy", "kl_to_reference"])

    if "report" in args.stages:
        bon = read_runs([str(run_dir)], "bon.csv") if (run_dir / "bon.csv").exists() else []
        ppo_dirs = [str(p) for p in sorted((run_dir / "ppo").glob("*")) if (p / "curves.csv").exists()]
        ppo = read_runs(ppo_dirs, "curves.csv") if ppo_dirs else []
        for row in ppo:  # curves written before PPO seeds were recorded are seed 0
            seed = row.get("seed")
            row["seed"] = 0 if seed is None or seed != seed else int(seed)
        if ppo:
            write_csv(str(run_dir / "ppo.csv"), ppo, first=["objective", "seed", "step", "gold", "proxy", "kl_to_reference"])
        fits = fit_rows(bon, ppo)
        write_csv(str(run_dir / "fits.csv"), fits, first=["method", "objective", "alpha", "beta", "r2"])
        scales = {r["selector"]: r["proxy_scale"] for r in bon}
        plot(bon, ppo, fits, scales, run_dir / "overoptimization.png", args.proxy_list)
        peaks = read_runs([str(run_dir)], "bon_peaks.csv") if (run_dir / "bon_peaks.csv").exists() else []
        summary = summarize(proxy_rows, bon, peaks, ppo, fits, args)
        (run_dir / "summary.md").write_text(summary)
        print(summary, flush=True)
        print(f"[overopt] wrote bon.csv, fits.csv, proxies.csv, overoptimization.png, summary.md to {run_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
