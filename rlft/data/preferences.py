"""Preference pairs (prompt, chosen, rejected) from human ratings or any TFDS dataset, and their batches.

Sources, picked by `data.pairs`:

- "human_ratings": the VADER human-rated sentences of `data.source`. Two sentences of the same
  split whose mean ratings differ by at least `data.min_gap` make a pair, the higher rated one
  chosen; the prompt is the fixed `data.prompt` ("" for reward models). Pairs are sampled with a
  numpy Generator seeded by (data.seed, split), only from that split's sentences; a training
  (validation) pair never uses a sentence whose text also occurs in the validation or test (test)
  split, so held-out texts cannot leak through duplicates.
- "tfds:NAME": any TFDS dataset with explicit prompt/chosen/rejected text fields, named by
  `data.prompt_field` ("" = no prompt), `data.chosen_field`, `data.rejected_field` (a dotted name
  reads a nested feature), read with `tfds.data_source` from `data.data_dir`.

A pair batch (`pad_pairs`) is a `TokenBatch` whose fields are [batch, 2, length]: row 0 the chosen,
row 1 the rejected sequence, each right padded, loss_mask on completion tokens.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import ml_collections
import numpy as np

from rlft.data.batching import Example, TokenBatch, TruncationStats, pad_right
from rlft.errors import RlftError

HUMAN_RATINGS = "human_ratings"
TFDS_PREFIX = "tfds:"
SPLIT_ORDER = ("train", "validation", "test")  # a split excludes texts of the splits after it


class PreferencePair(NamedTuple):
    """One comparison: the prompt and two completions, `chosen` preferred over `rejected`."""

    prompt: str
    chosen: str
    rejected: str


EncodedPair = tuple[Example, Example]  # ((prompt ids, chosen ids), (prompt ids, rejected ids))


def preference_data_config(**overrides) -> ml_collections.ConfigDict:
    """The `data` section that `load_pairs` reads (fields are described in the module docstring).

    pairs_per_sentence: human-rating pairs per sentence of the split; max_pairs caps any source
    (0 = no cap).
    """
    section = dict(pairs=HUMAN_RATINGS, source="movie_reviews", data_dir="", min_gap=1.0,
                   pairs_per_sentence=4.0, max_pairs=0, prompt="", seed=0,
                   prompt_field="prompt", chosen_field="chosen", rejected_field="rejected")
    section.update(overrides)
    return ml_collections.ConfigDict(section)


def split_seed(seed: int, split: str) -> list[int]:
    """The numpy seed sequence of one split: [seed, crc32(split)]."""
    return [int(seed), zlib.crc32(split.encode())]


def rating_pairs(rows: Sequence[Mapping], num_pairs: int, min_gap: float, seed: Sequence[int] | int,
                 prompt: str = "", exclude_texts: frozenset[str] = frozenset()) -> list[PreferencePair]:
    """Up to `num_pairs` distinct pairs of rows (text, rating) with |rating gap| >= min_gap.

    Deterministic in (rows, seed); the higher-rated text is chosen; rows whose text is in
    `exclude_texts` and pairs of identical texts are never used.
    """
    if min_gap <= 0:
        raise RlftError(f"data.min_gap={min_gap}: must be > 0 (equal ratings give no preference)")
    rows = [r for r in rows if r["text"] not in exclude_texts]
    texts = [r["text"] for r in rows]
    ratings = np.array([float(r["rating"]) for r in rows], np.float64)
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, int]] = set()
    pairs: list[PreferencePair] = []
    n = len(rows)
    for _ in range(64):  # rounds of candidates; stops early once enough pairs are found
        if len(pairs) >= num_pairs or n < 2:
            break
        draws = rng.integers(0, n, size=(max(2 * (num_pairs - len(pairs)), 64), 2))
        for i, j in draws:
            if len(pairs) >= num_pairs:
                break
            key = (min(i, j), max(i, j))
            if i == j or key in seen or abs(ratings[i] - ratings[j]) < min_gap or texts[i] == texts[j]:
                continue
            seen.add(key)
            hi, lo = (i, j) if ratings[i] > ratings[j] else (j, i)
            pairs.append(PreferencePair(prompt, texts[hi], texts[lo]))
    return pairs


def _field(example: Mapping, name: str, config_field: str, dataset: str) -> str:
    """The text at dotted `name` of a TFDS example, decoded; RlftError naming the config field."""
    value = example
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            keys = sorted(example) if isinstance(example, Mapping) else []
            raise RlftError(f"data.{config_field}={name!r}: no such field in {dataset} "
                            f"(top-level fields: {keys})")
        value = value[part]
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    raise RlftError(f"data.{config_field}={name!r} in {dataset} is not a text field "
                    f"(got {type(value).__name__})")


def tfds_pairs(name: str, split: str, data_dir: str | None, prompt_field: str, chosen_field: str,
               rejected_field: str, max_pairs: int = 0) -> list[PreferencePair]:
    """Pairs from a TFDS dataset with explicit text fields, in the dataset's order (first max_pairs)."""
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                  builder_kwargs={"file_format": tfds.core.FileFormat.ARRAY_RECORD})
    except Exception as e:  # DatasetNotFoundError, unknown split, unreachable download, ...
        raise RlftError(f"data.pairs='tfds:{name}': could not open split {split!r} "
                        f"(data_dir={data_dir or 'TFDS default'}): {e}") from None
    count = len(source) if not max_pairs else min(max_pairs, len(source))
    dataset = f"tfds:{name}[{split}]"
    pairs = []
    for index in range(count):
        example = source[index]
        prompt = _field(example, prompt_field, "prompt_field", dataset) if prompt_field else ""
        pairs.append(PreferencePair(prompt, _field(example, chosen_field, "chosen_field", dataset),
                                    _field(example, rejected_field, "rejected_field", dataset)))
    return pairs


def human_rating_pairs(cfg: ml_collections.ConfigDict, split: str) -> list[PreferencePair]:
    """Pairs of one split of the human-rated sentences (see the module docstring)."""
    from rlft.data.human_ratings import load_split

    if split not in SPLIT_ORDER:
        raise RlftError(f"unknown split {split!r}; expected one of {list(SPLIT_ORDER)}")
    data_dir = cfg.data_dir or None
    rows = load_split(cfg.source, split, data_dir)
    later = SPLIT_ORDER[SPLIT_ORDER.index(split) + 1:]
    exclude = frozenset(r["text"] for s in later for r in load_split(cfg.source, s, data_dir))
    num_pairs = int(round(cfg.pairs_per_sentence * len(rows)))
    if cfg.max_pairs:
        num_pairs = min(num_pairs, cfg.max_pairs)
    return rating_pairs(rows, num_pairs, cfg.min_gap, split_seed(cfg.seed, split), cfg.prompt, exclude)


def load_pairs(cfg: ml_collections.ConfigDict, split: str) -> list[PreferencePair]:
    """The preference pairs of `split` from the source named by cfg.pairs (a `data` section)."""
    if cfg.pairs == HUMAN_RATINGS:
        return human_rating_pairs(cfg, split)
    if cfg.pairs.startswith(TFDS_PREFIX) and cfg.pairs[len(TFDS_PREFIX):]:
        return tfds_pairs(cfg.pairs[len(TFDS_PREFIX):], split, cfg.data_dir, cfg.prompt_field,
                          cfg.chosen_field, cfg.rejected_field, cfg.max_pairs)
    raise RlftError(f"data.pairs={cfg.pairs!r}: expected {HUMAN_RATINGS!r} or 'tfds:NAME'")


def encode_pairs(tokenizer, pairs: Sequence[PreferencePair], add_eos: bool = True,
                 bos_id: int | None = None) -> list[EncodedPair]:
    """Token ids of each pair: the prompt (after `bos_id` if given) and each completion (+ EOS)."""
    if add_eos and tokenizer.eos_token_id is None:
        raise RlftError("add_eos=True but the tokenizer has no EOS token")
    eos = [tokenizer.eos_token_id] if add_eos else []
    bos = [] if bos_id is None else [bos_id]
    encoded = []
    for p in pairs:
        prompt = bos + tokenizer.encode(p.prompt, add_special_tokens=False)
        chosen = tokenizer.encode(p.chosen, add_special_tokens=False) + eos
        rejected = tokenizer.encode(p.rejected, add_special_tokens=False) + eos
        encoded.append(((prompt, chosen), (prompt, rejected)))
    return encoded


def pad_pairs(pairs: Sequence[EncodedPair], length: int,
              pad_id: int) -> tuple[TokenBatch, TruncationStats]:
    """A pair batch: TokenBatch fields [batch, 2, length] (chosen, rejected), right padded.

    Over-long sequences are truncated by `rlft.data.batching`'s rule; the stats count all
    2 * batch sequences.
    """
    flat, stats = pad_right([p[0] for p in pairs] + [p[1] for p in pairs], length, pad_id)
    n = len(pairs)
    stacked = TokenBatch(*(np.stack([x[:n], x[n:]], axis=1) for x in flat))
    return stacked, stats
