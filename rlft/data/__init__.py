"""Offline data: VADER human-rated sentences (TFDS), preference pairs, BPE tokenizers, numpy batching.

Names are re-exported lazily, so `rlft.data.batching` does not import TFDS or transformers.
"""

import importlib

_EXPORTS = {
    "batching": ["TokenBatch", "TruncationStats", "encode_example", "pack", "pad_left",
                 "pad_right", "truncate"],
    "human_ratings": ["SOURCES", "HumanRatedSentences", "load_split", "malformed_counts",
                      "parse_ground_truth", "parse_rater_file", "split_of"],
    "preferences": ["PreferencePair", "encode_pairs", "load_pairs", "pad_pairs", "preference_data_config",
                    "rating_pairs", "tfds_pairs"],
    "tokenizer": ["EOS_TOKEN", "PAD_TOKEN", "load_tokenizer", "train_tokenizer"],
}
_MODULE_OF = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    """Imports the submodule that defines `name` on first access."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
