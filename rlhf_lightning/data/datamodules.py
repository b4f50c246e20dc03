"""LightningDataModules for the three record kinds: demonstrations (SFT), preference pairs (RM, DPO, MODPO)
and prompts (PPO, Fine-Grained RLHF).

They differ only in the record kind and the collator; everything else — sources, validation split,
tokenizer resolution, tokenization with caching, DataLoaders — lives in :class:`RLHFDataModule`.

Tokenizer resolution, first that applies: an object set with ``set_tokenizer()`` (or assigned to
``.tokenizer``); the ``tokenizer`` name/path given to ``__init__``; the attached LightningModule's
``tokenizer`` attribute (every rlhf-lightning module has one), so a YAML config names it only once.

Under DDP every rank tokenizes the same data (deterministically). With ``cache_dir`` set, ``prepare_data``
(run once per node) writes the cache and the ranks' ``setup`` read it. The training order is a
:class:`~rlhf_lightning.data.sampler.ResumableSampler` keyed by ``(seed, epoch)`` whose position is
saved in checkpoints (``state_dict``), so a resumed run continues with the very next batch; under data
parallelism each rank takes its share of the same order (the sampler is a ``DistributedSampler``, so
Lightning keeps it).
"""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader

from rlhf_lightning.data.collators import DemonstrationCollator, PreferenceCollator, PromptCollator
from rlhf_lightning.data.records import RecordSource
from rlhf_lightning.data.samplers import LengthGroupedSampler, example_lengths
from rlhf_lightning.data.sampler import ResumableSampler
from rlhf_lightning.data.tokenization import TokenizeConfig, TokenizedData, TokenizedDataset, Truncation, load_tokenized

__all__ = ["RLHFDataModule", "DemonstrationDataModule", "PreferenceDataModule", "PromptDataModule"]

log = logging.getLogger(__name__)


class RLHFDataModule(L.LightningDataModule):
    """Shared machinery of the record DataModules; use a subclass (it fixes ``kind`` and the collator)."""

    kind: ClassVar[str]
    collator_class: ClassVar[type]

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        val_fraction: float = 0.0,
        tokenizer: str | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        truncation: Truncation = "keep_end",
        pad_to_multiple_of: int | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 0,
        shuffle: bool = True,
        dataset: Any = None,
        val_dataset: Any = None,
        limit_train_records: int | None = None,
        group_by_length: bool = False,
        min_completion_tokens: int = 4,
        drop_short_completions: bool = False,
        drop_identical_pairs: bool = False,
        max_unknown_rate: float = 0.01,
        test_file: str | None = None,
        test_dataset: Any = None,
    ):
        """
        Args:
            train_file: JSONL file of training records (one JSON object per line; blank lines are skipped).
            val_file: JSONL file of validation records; without it, ``val_fraction`` of the training
                records are held out.
            val_fraction: fraction of training records held out for validation when there is no
                ``val_file`` / ``val_dataset`` (a deterministic split by ``seed``); 0 = no validation.
            tokenizer: tokenizer name or local directory. Optional: a tokenizer object may be supplied with
                ``set_tokenizer()``, and otherwise the LightningModule's ``tokenizer`` is used.
            batch_size: training batch size (per device).
            val_batch_size: validation batch size; defaults to ``batch_size``.
            max_length: maximum prompt + completion tokens (for prompt data: the prompt limit when
                ``max_prompt_length`` is not set); ``None`` = no limit.
            max_prompt_length: maximum prompt tokens; ``None`` = whatever ``max_length`` leaves.
            truncation: records over the limits: ``"keep_end"`` cuts the start of the prompt and then
                the end of the completion; ``"error"`` raises naming the record; ``"drop"`` skips it
                (counted and logged).
            pad_to_multiple_of: round padded lengths up to a multiple of this (e.g. 8 on GPUs).
            num_workers: DataLoader worker processes (collation is cheap: 0 is usually fine).
            cache_dir: folder for the tokenized-data cache, keyed by data content, tokenizer and
                length settings; ``None`` = tokenize in memory only.
            seed: seed of the train/validation split.
            shuffle: shuffle training records every epoch.
            dataset: training records given in memory instead of ``train_file``: a
                ``datasets.Dataset`` or a list of dicts.
            val_dataset: validation records in memory instead of ``val_file``.
            limit_train_records: keep only the first N training records (after the split) for short runs.
            group_by_length: shuffled training batches of similar lengths (sorted within shuffled
                windows of 50 batches, :class:`~rlhf_lightning.data.samplers.LengthGroupedSampler`, as
                resumable as the default order): less padding for modules run with ``padding_free: false``.
                Single process only: under data parallelism the default (resumable) order is used.
            min_completion_tokens: records whose completion truncation cuts below this many tokens are
                counted and warned about (once, with the count).
            drop_short_completions: drop those records instead.
            drop_identical_pairs: drop preference pairs whose chosen and rejected tokens are identical
                (they are always counted and warned about).
            max_unknown_rate: warn when more than this share of the tokens is the tokenizer's unknown token.
            test_file: JSONL file of test records, for ``rlhf-lightning test`` (``trainer.test``): each
                module runs its validation step on them and logs ``test/<metric>``.
            test_dataset: test records in memory instead of ``test_file``.
        """
        super().__init__()
        if train_file is not None and dataset is not None:
            raise ValueError("Give either train_file or dataset, not both.")
        if val_file is not None and val_dataset is not None:
            raise ValueError("Give either val_file or val_dataset, not both.")
        if test_file is not None and test_dataset is not None:
            raise ValueError("Give either test_file or test_dataset, not both.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError("batch sizes must be positive")
        if limit_train_records is not None and limit_train_records < 1:
            raise ValueError(f"limit_train_records must be positive or None, got {limit_train_records}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive or None, got {pad_to_multiple_of}")
        self.tokenize_config = TokenizeConfig(  # validates the limits
            max_length,
            max_prompt_length,
            truncation,
            min_completion_tokens=min_completion_tokens,
            drop_short_completions=drop_short_completions,
            drop_identical_pairs=drop_identical_pairs,
            max_unknown_rate=max_unknown_rate,
        )
        self.train_file = train_file
        self.val_file = val_file
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.pad_to_multiple_of = pad_to_multiple_of
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.seed = seed
        self.shuffle = shuffle
        self.dataset = dataset
        self.val_dataset = val_dataset
        self.limit_train_records = limit_train_records
        self.group_by_length = group_by_length
        self.test_file = test_file
        self.test_dataset = test_dataset
        self.test_set: TokenizedDataset | None = None
        self.tokenizer_name: str | None = None
        self._tokenizer: Any = None
        self.tokenizer = tokenizer
        self.train_set: TokenizedDataset | None = None
        self.val_set: TokenizedDataset | None = None
        self.num_dropped = 0
        self.score_names: list[str] = []
        self._train_sampler: ResumableSampler | None = None
        self._resume_state: dict[str, int] | None = None

    # ------------------------------------------------------------------------------------------ tokenizer

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (loaded on first use; see the module docstring for where it comes from)."""
        if self._tokenizer is None:
            if self.tokenizer_name is not None:
                from rlhf_lightning.models import load_tokenizer

                self._tokenizer = load_tokenizer(self.tokenizer_name, padding_side="right")
            else:
                module = self.trainer.lightning_module if self.trainer is not None else None
                self._tokenizer = getattr(module, "tokenizer", None)
            if self._tokenizer is None:
                raise ValueError(
                    f"{type(self).__name__} needs a tokenizer: pass tokenizer=<name or path>, call "
                    "set_tokenizer(tokenizer), or attach it to a LightningModule that has a `tokenizer` attribute."
                )
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        if value is None or isinstance(value, (str, os.PathLike)):
            self.tokenizer_name = None if value is None else os.fspath(value)
            self._tokenizer = None
        else:
            self._tokenizer = value

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use this tokenizer object (e.g. the module's own); call before ``setup``."""
        self.tokenizer = tokenizer

    def _pad_token_id(self) -> int:
        tokenizer = self.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("The tokenizer has neither a pad nor an EOS token id to pad with.")
        return pad

    # ------------------------------------------------------------------------------------ loading / setup

    @property
    def is_loaded(self) -> bool:
        return self.train_set is not None or self.val_set is not None

    def _tokenized(self, source: RecordSource) -> TokenizedData:
        data = load_tokenized(source, self.kind, self.tokenizer, self.tokenize_config, cache_dir=self.cache_dir)
        self.num_dropped += data.num_dropped
        return data

    def load(self) -> None:
        """Load, validate and tokenize every source once (idempotent); ``setup`` calls it."""
        if self.is_loaded:
            return
        train_source = self.train_file if self.train_file is not None else self.dataset
        val_source = self.val_file if self.val_file is not None else self.val_dataset
        if train_source is None and val_source is None:
            raise ValueError(f"{type(self).__name__} has no data: set train_file (or dataset) and/or val_file.")
        self.num_dropped = 0
        train = self._tokenized(train_source) if train_source is not None else None
        val = self._tokenized(val_source) if val_source is not None else None
        if val is None and train is not None and self.val_fraction > 0:
            train, val = self._split(train)
        if train is not None and self.limit_train_records is not None:
            train = train.select(range(min(self.limit_train_records, len(train))))
        if train is not None and val is not None and train.score_names != val.score_names:
            raise ValueError(f"Train and validation score objectives differ: {train.score_names} vs {val.score_names}")
        reference = train if train is not None else val
        self.score_names = list(reference.score_names)
        self.train_set = TokenizedDataset(train) if train is not None else None
        self.val_set = TokenizedDataset(val) if val is not None else None

    def _split(self, data: TokenizedData) -> tuple[TokenizedData, TokenizedData]:
        n = len(data)
        num_val = max(1, round(n * self.val_fraction))
        if num_val >= n:
            raise ValueError(f"val_fraction={self.val_fraction} leaves no training records out of {n}.")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        # Sorted so each split keeps the file's order (its `index` then follows file order too).
        return data.select(sorted(order[num_val:])), data.select(sorted(order[:num_val]))

    def prepare_data(self) -> None:
        # Runs on one process per node before `setup`: fill the disk cache so the other ranks only read it.
        if self.cache_dir is not None:
            self.load()

    def setup(self, stage: str | None = None) -> None:
        if stage == "test":  # `rlhf-lightning test` needs only the test records
            self.load_test()
            return
        self.load()

    def load_test(self) -> None:
        """Load, validate and tokenize the test records once (idempotent)."""
        if self.test_set is not None:
            return
        source = self.test_file if self.test_file is not None else self.test_dataset
        if source is None:
            raise ValueError(f"{type(self).__name__} has no test data: set test_file (or test_dataset) to run `test`.")
        data = self._tokenized(source)
        self.test_set = TokenizedDataset(data)
        if not self.is_loaded:
            self.score_names = list(data.score_names)

    # ---------------------------------------------------------------------------------------- dataloaders

    def collator(self):
        """The batch collator (a picklable callable, so ``num_workers > 0`` works)."""
        return self.collator_class(pad_token_id=self._pad_token_id(), pad_to_multiple_of=self.pad_to_multiple_of)

    def _loader(self, dataset: TokenizedDataset, batch_size: int, shuffle: bool, sampler: ResumableSampler | None = None) -> DataLoader:
        loader_class, extra = (DataLoader, {}) if sampler is None else (ResumableDataLoader, {"state_owner": self})
        return loader_class(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle if sampler is None else None,
            sampler=sampler,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # The loader's own seed comes from this generator, not from the global RNG (which a resumed
            # process does not share, and which training code may use).
            generator=torch.Generator().manual_seed(self.seed),
            **extra,
        )

    def _trainer_or_none(self):
        try:
            return self.trainer
        except RuntimeError:
            return None

    def train_dataloader(self) -> DataLoader:
        """Training batches in the order of :class:`~rlhf_lightning.data.sampler.ResumableSampler` (keyed by
        ``(seed, epoch)``, resumed at the checkpoint's position); each data-parallel rank takes its share."""
        self.load()
        if self.train_set is None:
            raise ValueError(f"{type(self).__name__} has no training data: set train_file or dataset.")
        trainer = self._trainer_or_none()
        num_replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if self.shuffle and self.group_by_length and num_replicas == 1:
            lengths = example_lengths(self.train_set.data.features)
            self._train_sampler = LengthGroupedSampler(lengths, self.batch_size, seed=self._order_seed())
        else:
            self._train_sampler = ResumableSampler(
                len(self.train_set), seed=self._order_seed(), shuffle=self.shuffle, num_replicas=num_replicas, rank=rank
            )
        if self._resume_state is not None:
            if self._resume_state["num_replicas"] == num_replicas:
                self._train_sampler.resume_at(self._resume_state["epoch"], self._resume_state["position"])
            else:
                log.warning(
                    "The checkpoint was written by %d process(es), this run has %d: epoch %d restarts from its "
                    "first batch (the records already trained on this epoch are seen again).",
                    self._resume_state["num_replicas"], num_replicas, self._resume_state["epoch"],
                )
            self._resume_state = None
        return self._loader(self.train_set, self.batch_size, shuffle=self.shuffle, sampler=self._train_sampler)

    def _order_seed(self) -> int:
        """The seed of the training order: this DataModule's ``seed`` combined with the run's global seed
        (``seed_everything`` / ``seed_everything:`` in YAML), so runs with different seeds see different orders."""
        return self.seed * 1_000_003 + int(os.environ.get("PL_GLOBAL_SEED", 0))

    # ------------------------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """Where the training data order stands: ``(seed, epoch, position)`` — position = the records of
        this epoch already trained on (Lightning's count of processed batches x ``batch_size``)."""
        sampler = getattr(self, "_train_sampler", None)
        trainer = self._trainer_or_none()
        if sampler is None or trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"train_sampler": sampler.state(done * self.batch_size) | {"epoch": trainer.current_epoch}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training order where the checkpoint left it (applied when the loader is built)."""
        state = state_dict.get("train_sampler") if state_dict else None
        if not state:
            return
        train_size = len(self.train_set) if self.train_set is not None else state["n"]
        if state.get("seed") != self._order_seed() or state.get("shuffle") != self.shuffle or state.get("n") != train_size:
            log.warning(
                "The checkpoint's data order (seed=%s, shuffle=%s, %s records) differs from this run's (seed=%s, "
                "shuffle=%s, %s records): the epoch restarts from its first batch in this run's order.",
                state.get("seed"), state.get("shuffle"), state.get("n"), self._order_seed(), self.shuffle, train_size,
            )
            return
        self._resume_state = {"epoch": int(state["epoch"]), "position": int(state["position"]),
                              "num_replicas": int(state.get("num_replicas", 1))}
        sampler = getattr(self, "_train_sampler", None)
        if sampler is not None and sampler.num_replicas == self._resume_state["num_replicas"]:
            sampler.resume_at(self._resume_state["epoch"], self._resume_state["position"])

    def val_dataloader(self) -> DataLoader | list:
        self.load()
        if self.val_set is None:
            return []  # Lightning skips validation
        return self._loader(self.val_set, self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The ``test_file`` / ``test_dataset`` records (loaded on first use), in file order."""
        self.load_test()
        return self._loader(self.test_set, self.val_batch_size, shuffle=False)


class ResumableDataLoader(DataLoader):
    """The training DataLoader: Lightning sees it as stateful (``state_dict`` / ``load_state_dict``) and keeps
    its state with the loop state, so a mid-epoch resume is exact even when the loaders are passed to
    ``fit`` directly; the state is the owning DataModule's (the position of its resumable order)."""

    def __init__(self, *args: Any, state_owner: "RLHFDataModule | None" = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state_owner = state_owner

    def state_dict(self) -> dict[str, Any]:
        return self.state_owner.state_dict() if self.state_owner is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.state_owner is not None:
            self.state_owner.load_state_dict(state_dict)


class DemonstrationDataModule(RLHFDataModule):
    """Demonstrations for SFT: records ``{"prompt", "completion"}`` or chat ``{"messages": [...]}``.

    Batches: ``input_ids``, ``attention_mask``, ``completion_mask`` ``(B, T)`` right padded (the completion
    mask is 1 on completion tokens including EOS), ``index (B,)``.
    """

    kind = "demonstration"
    collator_class = DemonstrationCollator


class PreferenceDataModule(RLHFDataModule):
    """Preference pairs for reward modeling, DPO and MODPO: records ``{"prompt", "chosen", "rejected"}`` with
    optional ``margin`` and ``chosen_scores`` / ``rejected_scores`` (``{objective: float}``).

    Batches: ``{chosen,rejected}_{input_ids,attention_mask,completion_mask}`` right padded, ``index (B,)``,
    ``margin (B,)`` when records have it, ``chosen_scores`` / ``rejected_scores`` ``(B, K)`` when records have
    scores; column k is objective ``score_names[k]`` (sorted names, fixed at load time).
    """

    kind = "pair"
    collator_class = PreferenceCollator


class PromptDataModule(RLHFDataModule):
    """Prompts for PPO and Fine-Grained RLHF: records ``{"prompt"}`` (or chat ``messages``) plus any extra
    fields, which reach the batch as lists (e.g. facts a reward function checks against).

    Batches (LEFT padded, ready for ``generate``): ``prompt_input_ids``, ``prompt_attention_mask`` ``(B, P)``,
    ``index (B,)``, ``prompt_text: list[str]``. The Trainer's ``max_steps`` decides how long PPO runs; the
    loader simply starts a new (reshuffled) epoch whenever the prompts run out.
    """

    kind = "prompt"
    collator_class = PromptCollator
