"""Data: loading rows from files/folders/the Hub, preference formats, tokenization, collators."""

from dpolab.data.collate import PreferenceBatch, collate_preference, pad_token_id_for
from dpolab.data.loading import Record, data_fingerprint, load_records
from dpolab.data.preference import (
    DataReport,
    PreferenceData,
    PreferenceExample,
    TokenizedPair,
    load_preference_data,
    parse_preference,
    split_implicit_prompt,
    tokenize_preference,
)

__all__ = [
    "DataReport",
    "PreferenceBatch",
    "PreferenceData",
    "PreferenceExample",
    "Record",
    "TokenizedPair",
    "collate_preference",
    "data_fingerprint",
    "load_preference_data",
    "load_records",
    "pad_token_id_for",
    "parse_preference",
    "split_implicit_prompt",
    "tokenize_preference",
]
