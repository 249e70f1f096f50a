"""Pure-numpy batching of (prompt, completion) token ids: right padding, left padding, packing.

Conventions (shared with the model): `segment_ids` is 0 on padding and 1, 2, ... for the
examples in a row; token i attends to j iff j <= i and segment_ids[i] == segment_ids[j] != 0.
`loss_mask[b, t] == 1.0` iff tokens[b, t] is a target, predicted by the logits at t - 1 of the
same segment. The first token of a segment is never a target.

Truncation rule for an example longer than `length`: the completion keeps its first tokens and
the prompt keeps its last tokens, so the completion is kept whole whenever it fits next to at
least one prompt token; otherwise the prompt keeps only its last token and the completion is cut
at the right (losing its tail, EOS included).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from rlft.errors import RlftError

Example = tuple[Sequence[int], Sequence[int]]  # (prompt_ids, completion_ids)


class TokenBatch(NamedTuple):
    """A batch of token rows; every field is a numpy array of shape [batch, length]."""

    tokens: np.ndarray  # int32
    positions: np.ndarray  # int32, restart at 0 for every segment, 0 on padding
    segment_ids: np.ndarray  # int32, 0 = padding
    loss_mask: np.ndarray  # float32, 1.0 on target tokens


@dataclasses.dataclass(frozen=True)
class TruncationStats:
    """What truncation did to a batch of examples."""

    num_examples: int
    num_truncated: int  # examples that lost at least one token
    num_completion_truncated: int  # examples that lost completion tokens
    num_tokens_dropped: int
    num_rows: int
    length: int
    num_real_tokens: int  # non-padding tokens in the batch

    @property
    def fill(self) -> float:
        """Fraction of non-padding tokens in the batch."""
        return self.num_real_tokens / max(self.num_rows * self.length, 1)


def encode_example(tokenizer, prompt: str, completion: str,
                   add_eos: bool = True) -> tuple[list[int], list[int]]:
    """Tokenizes prompt and completion separately (no special tokens); appends EOS to the completion."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    completion_ids = tokenizer.encode(completion, add_special_tokens=False)
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise RlftError("add_eos=True but the tokenizer has no EOS token.")
        completion_ids.append(tokenizer.eos_token_id)
    return list(prompt_ids), list(completion_ids)


def truncate(prompt: Sequence[int], completion: Sequence[int],
             length: int) -> tuple[list[int], list[int]]:
    """Applies the module's truncation rule so that len(prompt) + len(completion) <= length."""
    prompt, completion = list(prompt), list(completion)
    if len(prompt) + len(completion) <= length:
        return prompt, completion
    keep_c = min(len(completion), length - min(len(prompt), 1))
    keep_p = length - keep_c
    return prompt[len(prompt) - keep_p:], completion[:keep_c]


def _fill_row(batch: TokenBatch, row: int, start: int, segment: int, prompt: list[int],
              completion: list[int], full_sequence_loss: bool) -> None:
    """Writes one (already truncated) example into batch[row, start:start + n] in place."""
    n = len(prompt) + len(completion)
    sl = slice(start, start + n)
    batch.tokens[row, sl] = prompt + completion
    batch.positions[row, sl] = np.arange(n)
    batch.segment_ids[row, sl] = segment
    first_target = 1 if full_sequence_loss else max(len(prompt), 1)
    batch.loss_mask[row, start + first_target:start + n] = 1.0


def _empty(rows: int, length: int, pad_id: int) -> TokenBatch:
    """An all-padding batch of shape [rows, length]."""
    return TokenBatch(
        tokens=np.full((rows, length), pad_id, np.int32),
        positions=np.zeros((rows, length), np.int32),
        segment_ids=np.zeros((rows, length), np.int32),
        loss_mask=np.zeros((rows, length), np.float32),
    )


def _truncate_all(examples: Sequence[Example], length: int) -> tuple[list[Example], dict]:
    """Truncates every example; returns them and the truncation counts."""
    if length < 1:
        raise RlftError(f"length must be >= 1, got {length}.")
    out, truncated, c_truncated, dropped = [], 0, 0, 0
    for p, c in examples:
        tp, tc = truncate(p, c, length)
        lost = len(p) + len(c) - len(tp) - len(tc)
        truncated += lost > 0
        c_truncated += len(tc) < len(c)
        dropped += lost
        out.append((tp, tc))
    counts = dict(num_examples=len(examples), num_truncated=truncated,
                  num_completion_truncated=c_truncated, num_tokens_dropped=dropped)
    return out, counts


def _stats(batch: TokenBatch, counts: dict) -> TruncationStats:
    """Builds the stats of a filled batch."""
    rows, length = batch.tokens.shape
    return TruncationStats(**counts, num_rows=rows, length=length,
                           num_real_tokens=int((batch.segment_ids > 0).sum()))


def pad_right(examples: Sequence[Example], length: int, pad_id: int,
              full_sequence_loss: bool = False) -> tuple[TokenBatch, TruncationStats]:
    """One example per row, right-padded to [batch, length]; loss on completion tokens.

    With `full_sequence_loss`, every real token but the first is a target. Over-long examples are
    truncated by the module's rule and counted in the stats.
    """
    kept, counts = _truncate_all(examples, length)
    batch = _empty(len(kept), length, pad_id)
    for row, (p, c) in enumerate(kept):
        if p or c:
            _fill_row(batch, row, 0, 1, p, c, full_sequence_loss)
    return batch, _stats(batch, counts)


def pad_left(prompts: Sequence[Sequence[int]], length: int, pad_id: int,
             truncate_left: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pads prompts for generation; returns tokens, mask, positions, each [batch, length] int32.

    mask is 1 on prompt tokens (usable as segment_ids); positions = clip(cumsum(mask) - 1, 0).
    A prompt longer than `length` raises RlftError, or keeps its last tokens if `truncate_left`.
    """
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, p in enumerate(prompts):
        if len(p) > length and not truncate_left:
            raise RlftError(f"Prompt {row} has {len(p)} tokens, more than length={length}.")
        p = list(p)[max(len(p) - length, 0):]
        if p:
            tokens[row, length - len(p):] = p
            mask[row, length - len(p):] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
    return tokens, mask, positions


def pack(examples: Sequence[Example], length: int, pad_id: int, full_sequence_loss: bool = False,
         max_segments: int | None = None) -> tuple[TokenBatch, TruncationStats]:
    """Greedy first-fit packing of examples (in order) into rows of [num_rows, length].

    Segment ids are 1..k within a row, positions restart at 0 per segment, and loss_mask never
    crosses a segment boundary. At most `max_segments` examples share a row if given. Empty
    examples are skipped.
    """
    kept, counts = _truncate_all(examples, length)
    kept = [(p, c) for p, c in kept if p or c]
    rows: list[list[Example]] = []
    used = np.zeros(len(kept), np.int64)  # tokens per row; there are at most len(kept) rows
    count = np.zeros(len(kept), np.int64)  # segments per row
    limit = len(kept) if max_segments is None else max_segments
    for p, c in kept:
        n = len(p) + len(c)
        fits = np.flatnonzero((used[:len(rows)] + n <= length) & (count[:len(rows)] < limit))
        r = int(fits[0]) if fits.size else len(rows)
        if r == len(rows):
            rows.append([])
        rows[r].append((p, c))
        used[r] += n
        count[r] += 1
    batch = _empty(len(rows), length, pad_id)
    for r, row in enumerate(rows):
        start = 0
        for seg, (p, c) in enumerate(row, start=1):
            _fill_row(batch, r, start, seg, p, c, full_sequence_loss)
            start += len(p) + len(c)
    return batch, _stats(batch, counts)
