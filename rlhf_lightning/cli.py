"""The ``rlhf-lightning`` console script.

Subcommands:

* ``fit`` / ``validate`` / ``test`` — LightningCLI: ``rlhf-lightning fit --config configs/dpo.yaml``.
  Any module and DataModule from ``rlhf_lightning`` (or your own) is chosen with ``class_path``.
* ``data`` — write the embedded world (JSONL + tokenizer) to a folder: ``rlhf-lightning data --out outputs/world``.
* ``pipeline`` — the whole embedded pipeline, SFT -> RM -> PPO / DPO / MODPO / Fine-Grained RLHF.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI

__all__ = ["RLHFLightningCLI", "main", "cli_main", "run_cli"]

from rlhf_lightning.console import EXTRA_COMMANDS, run_extra_command

log = logging.getLogger(__name__)


class RLHFLightningCLI(LightningCLI):
    """LightningCLI with the conventions of this project.

    * The DataModule's ``tokenizer`` follows the module's unless set explicitly, so YAML names it once.
    * The full config is saved next to the logs (overwriting on resume).
    * ``--ckpt_path``: a missing, empty or unreadable file, or a checkpoint of another module class, is a
      clear error; settings that differ from the checkpoint's are listed with the value used.
    """

    _cli_args: list[str] | None = None

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

    def _parse_ckpt_path(self) -> None:
        """Resuming with ``--ckpt_path``: Lightning replaces the model's configuration with the one stored
        in the checkpoint. Here, first, a missing / empty checkpoint or one written by another module class
        is a clear error; then every setting where the two disagree is listed at WARNING with the value
        used: the checkpoint's, except model settings given explicitly on the command line
        (``--model.init_args.<key>=...``), which win."""
        from rlhf_lightning.checkpointing import CheckpointError, check_checkpoint_file, describe_config_changes

        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        check_checkpoint_file(ckpt_path)
        if not ckpt_path or not os.path.isfile(ckpt_path):
            return
        before = self.config[subcommand].get("model")
        before_class = _get(before, "class_path")
        try:
            # mmap: only the hyperparameters are read here, not every weight (Lightning loads it again).
            checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
        except Exception as error:  # truncated / not a checkpoint
            raise CheckpointError(f"Checkpoint file {ckpt_path} cannot be read ({type(error).__name__}: {error}).") from None
        saved_class = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
        if saved_class and before_class and _short(saved_class) != _short(before_class):
            raise CheckpointError(
                f"Checkpoint {ckpt_path} was written by {saved_class}, but this run's model is {before_class}; resume "
                "with the same model class_path, or start a new run from its exported weights (`model: <run>/hf/final`)."
            )
        before_args = _plain(_get(before, "init_args")) or {}
        super()._parse_ckpt_path()
        after = self.config[subcommand].get("model")
        explicit = _explicit_model_args(self._cli_args)
        for key in explicit:  # explicit command-line settings win over the checkpoint's
            if key in before_args:
                after["init_args"][key] = before["init_args"][key]
        lines = describe_config_changes(_strip_private(checkpoint.get("hyper_parameters") or {}), before_args, explicit)
        if lines:
            log.warning(
                "Resuming from %s: %d model setting(s) differ from the checkpoint's:\n%s",
                ckpt_path, len(lines), "\n".join(lines),
            )


def _get(node: Any, key: str) -> Any:
    if node is None:
        return None
    return node.get(key) if hasattr(node, "get") else getattr(node, key, None)


def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def _plain(node: Any) -> Any:
    """A jsonargparse Namespace (nested) as plain dicts."""
    if node is None:
        return None
    if hasattr(node, "as_dict"):
        return node.as_dict()
    return dict(node) if isinstance(node, dict) else node


def _strip_private(hparams: dict) -> dict:
    return {k: v for k, v in hparams.items() if not k.startswith("_")}


def _explicit_model_args(argv: list[str] | None) -> set[str]:
    """Top-level model init_args keys set on the command line: ``--model.init_args.beta=0.5``,
    ``--model.beta 0.5``, ``--model.init_args.optim.lr=...`` (-> ``optim``)."""
    keys = set()
    for word in argv if argv is not None else sys.argv[1:]:
        if not isinstance(word, str) or not word.startswith("--model."):
            continue
        name = word[len("--model."):].split("=", 1)[0]
        if name.startswith("init_args."):
            name = name[len("init_args."):]
        if name and name not in ("class_path", "init_args"):
            keys.add(name.split(".", 1)[0])
    return keys


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says everything (file, line, field, step): printed without a traceback."""
    from rlhf_lightning.callbacks.hf_export import NonFiniteWeightsError
    from rlhf_lightning.checkpointing import CheckpointError
    from rlhf_lightning.data.records import RecordError
    from rlhf_lightning.modules.base import NonFiniteError

    return (RecordError, NonFiniteError, NonFiniteWeightsError, CheckpointError, FileNotFoundError)


def cli_main(args: list[str] | None = None, *, run: bool = True) -> RLHFLightningCLI:
    """Build (and by default run) the LightningCLI; ``args`` defaults to ``sys.argv[1:]``."""
    RLHFLightningCLI._cli_args = list(args) if isinstance(args, (list, tuple)) else None
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
    run_cli(argv)


def run_cli(argv: list[str] | None = None) -> None:
    """:func:`cli_main`, with the errors of :func:`_user_errors` printed as one message and exit status 1."""
    try:
        cli_main(argv)
    except _user_errors() as error:
        # A clear message, exit status 1; RLHF_LIGHTNING_TRACEBACK=1 shows the traceback as well.
        if os.environ.get("RLHF_LIGHTNING_TRACEBACK"):
            raise
        print(f"rlhf-lightning: error: {type(error).__name__}: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
