"""``python -m rlhf_lightning.synthetic --out DIR`` (also ``rlhf-lightning data``): write the embedded world."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from rlhf_lightning.synthetic.scorers import GOLD_OBJECTIVES
from rlhf_lightning.synthetic.world import WorldConfig, write_world

__all__ = ["build_parser", "main"]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    defaults = WorldConfig()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write the embedded world (demonstrations, preference pairs, prompts, tokenizer) as JSONL. "
        "An existing world with the same settings is reused.",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of every generator (default: %(default)s)")
    parser.add_argument("--n-demonstrations", type=int, default=defaults.n_demonstrations, help="SFT train records (default: %(default)s)")
    parser.add_argument("--n-val-demonstrations", type=int, default=defaults.n_val_demonstrations, help="SFT val records (default: %(default)s)")
    parser.add_argument("--n-pairs", type=int, default=defaults.n_pairs, help="train pairs per objective (default: %(default)s)")
    parser.add_argument("--n-val-pairs", type=int, default=defaults.n_val_pairs, help="noise-free val pairs per objective (default: %(default)s)")
    parser.add_argument("--n-prompts", type=int, default=defaults.n_prompts, help="train prompts (default: %(default)s)")
    parser.add_argument("--n-eval-prompts", type=int, default=defaults.n_eval_prompts, help="eval prompts (default: %(default)s)")
    parser.add_argument("--label-noise", type=float, default=defaults.label_noise, help="flip rate of train pair labels (default: %(default)s)")
    parser.add_argument(
        "--objectives", nargs="+", default=list(GOLD_OBJECTIVES), choices=GOLD_OBJECTIVES,
        help="objectives that get pair files (default: all)",
    )
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if the manifest matches")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), write the world, print ``{name: path}`` as JSON."""
    args = build_parser(prog).parse_args(argv)
    start = time.perf_counter()
    try:
        paths = write_world(
            args.out,
            seed=args.seed,
            n_demonstrations=args.n_demonstrations,
            n_val_demonstrations=args.n_val_demonstrations,
            n_pairs=args.n_pairs,
            n_val_pairs=args.n_val_pairs,
            n_prompts=args.n_prompts,
            n_eval_prompts=args.n_eval_prompts,
            label_noise=args.label_noise,
            objectives=args.objectives,
            overwrite=args.overwrite,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(paths, indent=2))
    print(f"world ready in {args.out} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
