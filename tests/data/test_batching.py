"""Tests for numpy batching: right padding, left padding and packing."""

import numpy as np
import pytest

from rlft.data.batching import encode_example, pack, pad_left, pad_right, truncate
from rlft.errors import RlftError

PAD = 0


def _attends(seg: np.ndarray) -> np.ndarray:
    """The model's attention rule for one row: [length, length] bool."""
    i, j = np.indices((len(seg), len(seg)))
    return (j <= i) & (seg[:, None] == seg[None, :]) & (seg[:, None] != 0)


def test_pad_right_masks_prompt_and_padding():
    batch, stats = pad_right([([5, 6, 7], [8, 9]), ([5], [8, 9, 10])], length=6, pad_id=PAD)
    np.testing.assert_array_equal(batch.tokens, [[5, 6, 7, 8, 9, PAD], [5, 8, 9, 10, PAD, PAD]])
    np.testing.assert_array_equal(batch.positions, [[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 0, 0]])
    np.testing.assert_array_equal(batch.segment_ids, [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(batch.loss_mask, [[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0]])
    assert batch.tokens.dtype == np.int32 and batch.loss_mask.dtype == np.float32
    assert (stats.num_examples, stats.num_truncated, stats.num_real_tokens) == (2, 0, 9)
    full, _ = pad_right([([5, 6, 7], [8, 9])], length=6, pad_id=PAD, full_sequence_loss=True)
    np.testing.assert_array_equal(full.loss_mask, [[0, 1, 1, 1, 1, 0]])


def test_truncation_keeps_completion_and_is_counted():
    assert truncate([1, 2, 3, 4], [7, 8], 4) == ([3, 4], [7, 8])  # prompt cut from the left
    assert truncate([1, 2], [7, 8, 9, 10], 3) == ([2], [7, 8])  # completion too long
    examples = [([1, 2, 3, 4], [7, 8]), ([1], [7]), ([1, 2], [7, 8, 9, 10])]
    batch, stats = pad_right(examples, length=4, pad_id=PAD)
    assert (stats.num_truncated, stats.num_completion_truncated, stats.num_tokens_dropped) == (2, 1, 4)
    np.testing.assert_array_equal(batch.tokens[0], [3, 4, 7, 8])
    np.testing.assert_array_equal(batch.loss_mask[0], [0, 0, 1, 1])


def test_pad_left_positions():
    tokens, mask, positions = pad_left([[5, 6, 7], [8], []], length=4, pad_id=PAD)
    np.testing.assert_array_equal(tokens, [[PAD, 5, 6, 7], [PAD, PAD, PAD, 8], [PAD] * 4])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(positions, [[0, 0, 1, 2], [0, 0, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(RlftError, match="length=2"):
        pad_left([[1, 2, 3]], length=2, pad_id=PAD)
    tokens, _, _ = pad_left([[1, 2, 3]], length=2, pad_id=PAD, truncate_left=True)
    np.testing.assert_array_equal(tokens, [[2, 3]])


def test_pack_keeps_segments_apart():
    examples = [([1, 2], [3, 4]), ([5], [6, 7, 8, 9, 10]), ([11], [12]), ([13, 14, 15], [16, 17, 18, 19])]
    batch, stats = pack(examples, length=8, pad_id=PAD)
    # First fit: row 0 = examples 1 and 3, row 1 = example 2, row 2 = example 4 (fits nowhere else).
    assert batch.tokens.shape == (3, 8) and stats.num_rows == 3 and stats.num_truncated == 0
    np.testing.assert_array_equal(batch.tokens[0], [1, 2, 3, 4, 11, 12, PAD, PAD])
    np.testing.assert_array_equal(batch.segment_ids[0], [1, 1, 1, 1, 2, 2, 0, 0])
    np.testing.assert_array_equal(batch.positions[0], [0, 1, 2, 3, 0, 1, 0, 0])
    np.testing.assert_array_equal(batch.loss_mask[0], [0, 0, 1, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(batch.segment_ids[2], [1, 1, 1, 1, 1, 1, 1, 0])
    # Loss never crosses a segment: each target's predecessor is in the same segment.
    seg, target = batch.segment_ids, batch.loss_mask[:, 1:] > 0
    assert np.all(seg[:, 1:][target] == seg[:, :-1][target]) and batch.loss_mask[:, 0].sum() == 0
    att = _attends(seg[0])
    assert not att[4:6, :4].any() and att[5, 4] and att[3, :4].all() and not att[:, 6:].any()


def test_pack_counts_truncations_and_respects_max_segments():
    examples = [([1, 2, 3], [4, 5, 6, 7]), ([8], [9])] * 2  # 7 tokens each > length 6 for the first
    batch, stats = pack(examples, length=6, pad_id=PAD, max_segments=2)
    assert (stats.num_examples, stats.num_truncated, stats.num_tokens_dropped) == (4, 2, 2)
    assert batch.segment_ids.max() <= 2
    assert stats.num_real_tokens == int((batch.segment_ids > 0).sum()) == 16
    assert 0 < stats.fill <= 1


class _FakeTokenizer:
    eos_token_id = 1000

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


def test_encode_example_appends_eos():
    p, c = encode_example(_FakeTokenizer(), "ab", "c")
    assert (p, c) == ([97, 98], [99, 1000])
    assert encode_example(_FakeTokenizer(), "ab", "c", add_eos=False)[1] == [99]
