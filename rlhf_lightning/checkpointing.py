"""Checkpoints that can be trusted: atomic writes, a checkpoint at preemption (SIGTERM), and clear
errors when resuming from the wrong file.

* :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file in the target folder and
  renames it into place: a failed write (disk full, killed process) leaves no partial file, and a
  previous checkpoint of the same name stays intact. Every module installs it at fit start when the
  strategy uses Lightning's plain ``TorchCheckpointIO`` (one device, DDP).
* :class:`PreemptionCheckpoint` (added by every module through ``configure_callbacks``) saves
  ``<checkpoint dir>/preempted.ckpt`` when Lightning stops on SIGTERM — what a cluster scheduler sends
  before preemption — and makes the process exit with status 143 (128 + SIGTERM) instead of 0, so
  schedulers and scripts see that the run did not finish; resume with ``--ckpt_path <that file>``.
* :func:`check_checkpoint_file` and :func:`describe_hparam_changes` give the messages for a missing,
  empty or unreadable checkpoint, and for a resume whose configuration differs from the checkpoint's.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = [
    "AtomicCheckpointIO",
    "PreemptionCheckpoint",
    "CheckpointError",
    "check_checkpoint_file",
    "describe_hparam_changes",
    "describe_config_changes",
    "SIGTERM_EXIT_CODE",
]

log = logging.getLogger(__name__)

SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM: the shell's convention for "terminated by SIGTERM"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: missing, empty, unreadable, or of another module."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are atomic on local filesystems (temporary file + ``os.replace``);
    remote paths (``s3://...``) use the parent's write."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = os.fspath(path)
        if "://" in path:
            return super().save_checkpoint(checkpoint, path, storage_options)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(staging, 0o666 & ~_umask())  # mkstemp makes it 0o600; a checkpoint is a normal file
            os.replace(staging, path)
        except BaseException:
            if os.path.exists(staging):
                os.remove(staging)
            raise


def install_atomic_checkpoint_io(trainer: L.Trainer) -> None:
    """Swap the strategy's plain ``TorchCheckpointIO`` for :class:`AtomicCheckpointIO` (others are kept)."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    strategy = trainer.strategy
    if type(strategy) not in (SingleDeviceStrategy, DDPStrategy):  # sharded strategies write their own way
        return
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


class PreemptionCheckpoint(OnExceptionCheckpoint):
    """Save ``preempted.ckpt`` when the run stops on SIGTERM, then exit with status 143.

    Args:
        dirpath: folder of the checkpoint; default: the ``ModelCheckpoint`` folder, else
            ``<default_root_dir>/checkpoints``.

    Only SIGTERM triggers it: other exceptions (a bad record, a non-finite loss) leave no checkpoint,
    so resuming never starts from the same failure.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "preempted") -> None:
        super().__init__(dirpath=dirpath or "", filename=filename)
        self._explicit_dirpath = dirpath
        self._last_path: str | None = None

    def path_for(self, trainer: L.Trainer) -> str:
        folder = self._explicit_dirpath
        if folder is None:
            callback = trainer.checkpoint_callback
            folder = getattr(callback, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(folder, self.filename + self.FILE_EXTENSION)

    @property
    def ckpt_path(self) -> str | None:
        """The checkpoint this callback wrote in this process (None before a SIGTERM)."""
        return self._last_path

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = self.path_for(trainer)
        trainer.save_checkpoint(path)
        self._last_path = path
        exception.code = SIGTERM_EXIT_CODE
        log.warning(
            "Received SIGTERM at global step %d: saved %s; exiting with status %d. Resume with --ckpt_path %s.",
            trainer.global_step, path, SIGTERM_EXIT_CODE, path,
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pass  # keep the checkpoint (the parent deletes it at teardown after a clean run)


_KEYWORD_PATHS = ("last", "best", "hpc")


def check_checkpoint_file(path: str | os.PathLike | None) -> None:
    """Raise :class:`CheckpointError` naming ``path`` when it does not exist, is a folder, or is empty."""
    if path is None:
        return
    path = os.fspath(path)
    if path in _KEYWORD_PATHS or "://" in path:
        return
    if not os.path.exists(path):
        raise CheckpointError(f"Checkpoint file not found: {path} (--ckpt_path); check the path.")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, ".metadata")):  # not a distributed checkpoint
        raise CheckpointError(f"Checkpoint path {path} is a folder, not a .ckpt file.")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise CheckpointError(
            f"Checkpoint file {path} is empty (0 bytes): it was never fully written. Resume from an earlier checkpoint."
        )


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    if hasattr(value, "__dataclass_fields__"):
        return _flatten({name: getattr(value, name) for name in value.__dataclass_fields__}, prefix)
    return {prefix[:-1]: value}


# Settings whose checkpoint value wins on resume: they live in the optimizer / scheduler state.
_CHECKPOINT_WINS = ("optim.",)


def describe_hparam_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """One line per hyperparameter whose value differs between a checkpoint and this run, saying which
    value is used (the run's, except optimizer / schedule settings, restored from the checkpoint)."""
    old, new = _flatten(dict(saved)), _flatten(dict(current))
    lines = []
    for key in sorted(set(old) | set(new)):
        if key.startswith("_") or old.get(key, "<unset>") == new.get(key, "<unset>"):
            continue
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if _same(a, b):
            continue
        if key.startswith(_CHECKPOINT_WINS):
            used = (
                "this run's value builds the optimizer, but the optimizer and scheduler state restored from the "
                "checkpoint keep the checkpoint's learning rate, betas and weight decay"
            )
        else:
            used = "this run's value is used"
        lines.append(f"  {key}: checkpoint {a!r}, this run {b!r} -> {used}")
    return lines


def describe_config_changes(saved: Mapping[str, Any], requested: Mapping[str, Any], explicit: set[str]) -> list[str]:
    """Lines for a CLI resume: each model setting whose checkpoint value differs from this run's config,
    and which one is used — this run's for settings given explicitly on the command line (``explicit``,
    top-level keys), the checkpoint's for the rest (Lightning restores the checkpoint's configuration)."""
    old, new = _flatten(dict(saved)), _flatten(dict(requested))
    lines = []
    for key in sorted(set(old) & set(new)):
        a, b = old[key], new[key]
        if _same(a, b) or key.split(".", 1)[0] in explicit:  # explicit ones: reported by the module at load
            continue
        lines.append(
            f"  {key}: checkpoint {a!r}, this run's config {b!r} -> the checkpoint's value is used "
            f"(give --model.init_args.{key}=... on the command line to override it)"
        )
    return lines


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b or str(a) == str(b)
