"""Entry point of the ``rlhf-lightning`` console script.

Dispatches ``data`` and ``pipeline`` without importing Lightning (so ``rlhf-lightning data`` starts
instantly) and hands every other subcommand (``fit``, ``validate``, ``test``) to the LightningCLI.
"""

from __future__ import annotations

import importlib
import os
import sys

EXTRA_COMMANDS = {
    "data": "rlhf_lightning.synthetic.__main__:main",
    "pipeline": "rlhf_lightning.pipeline:main",
}


def run_extra_command(name: str, argv: list[str]) -> int:
    module_name, attr = EXTRA_COMMANDS[name].split(":")
    return int(getattr(importlib.import_module(module_name), attr)(argv) or 0)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in EXTRA_COMMANDS:
        raise SystemExit(run_extra_command(words[0], words[1:]))
    from rlhf_lightning.cli import run_cli

    run_cli(argv)
