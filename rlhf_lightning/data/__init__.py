"""Records -> token batches: validation of JSONL / in-memory records, tokenization with an explicit
truncation policy and a disk cache, padding collators, and one LightningDataModule per record kind."""

from rlhf_lightning.data.collators import DemonstrationCollator, PreferenceCollator, PromptCollator, pad_sequences
from rlhf_lightning.data.datamodules import DemonstrationDataModule, PreferenceDataModule, PromptDataModule, RLHFDataModule
from rlhf_lightning.data.records import RECORD_KINDS, LoadedRecords, Location, RecordError, load_records
from rlhf_lightning.data.tokenization import (
    TRUNCATION_POLICIES,
    TokenizeConfig,
    TokenizedData,
    TokenizedDataset,
    load_tokenized,
    tokenize_records,
)

__all__ = [
    "DemonstrationCollator",
    "DemonstrationDataModule",
    "LoadedRecords",
    "Location",
    "PreferenceCollator",
    "PreferenceDataModule",
    "PromptCollator",
    "PromptDataModule",
    "RECORD_KINDS",
    "RLHFDataModule",
    "RecordError",
    "TRUNCATION_POLICIES",
    "TokenizeConfig",
    "TokenizedData",
    "TokenizedDataset",
    "load_records",
    "load_tokenized",
    "pad_sequences",
    "tokenize_records",
]
