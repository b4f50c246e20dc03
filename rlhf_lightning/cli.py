"""The ``rlhf-lightning`` console script.

Subcommands:

* ``fit`` / ``validate`` / ``test`` — LightningCLI: ``rlhf-lightning fit --config configs/dpo.yaml``.
  Any module and DataModule from ``rlhf_lightning`` (or your own) is chosen with ``class_path``.
* ``data`` — write the embedded world (JSONL + tokenizer) to a folder: ``rlhf-lightning data --out outputs/world``.
* ``pipeline`` — the whole embedded pipeline, SFT -> RM -> PPO / DPO / MODPO / Fine-Grained RLHF.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

__all__ = ["RLHFLightningCLI", "main", "cli_main"]

from rlhf_lightning.console import EXTRA_COMMANDS, run_extra_command


class RLHFLightningCLI(LightningCLI):
    """LightningCLI with the conventions of this project.

    * The DataModule's ``tokenizer`` follows the module's unless set explicitly, so YAML names it once.
    * The full config is saved next to the logs (overwriting on resume).
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="Shortcut for trainer.default_root_dir (checkpoints, logs and exports go there).",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("run_dir"):
            # One switch moves everything a run writes: checkpoints, exports and logger output.
            config["trainer"]["default_root_dir"] = config["run_dir"]
            loggers = config["trainer"].get("logger")
            for logger in loggers if isinstance(loggers, list) else [loggers]:
                init_args = logger.get("init_args") if hasattr(logger, "get") else None
                if init_args is not None and "save_dir" in init_args:
                    init_args["save_dir"] = config["run_dir"]
        model_args = config.get("model", {}).get("init_args", {}) if isinstance(config.get("model"), dict) else {}
        data = config.get("data")
        if data is not None and "init_args" in data:
            data_args = data["init_args"]
            if "tokenizer" in data_args and data_args.get("tokenizer") is None:
                tokenizer = model_args.get("tokenizer")
                if tokenizer is None and isinstance(model_args.get("model"), str):
                    tokenizer = model_args.get("model")
                data_args["tokenizer"] = tokenizer


def cli_main(args: list[str] | None = None, *, run: bool = True) -> RLHFLightningCLI:
    """Build (and by default run) the LightningCLI; ``args`` defaults to ``sys.argv[1:]``."""
    return RLHFLightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> None:
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in EXTRA_COMMANDS:
        raise SystemExit(run_extra_command(words[0], words[1:]))
    cli_main(argv)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
