"""Deterministic, restartable batch order: batch i is a pure function of (seed, epoch, index).

A resumed run asks for the batches from its data position (the number of batches consumed) and
gets exactly the batches an uninterrupted run would have seen next.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from rlft.errors import RlftError


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation [num_examples] seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def epoch_batches(num_examples: int, batch_size: int, seed: int,
                  start_index: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Endless (index, example indices [batch_size]) from batch `start_index` on.

    Each epoch is a fresh shuffle; the last num_examples % batch_size examples of an epoch are
    dropped, so every batch has the same shape.
    """
    if batch_size < 1 or num_examples < batch_size:
        raise RlftError(f"batch_size={batch_size} must be between 1 and the number of examples "
                        f"({num_examples})")
    if start_index < 0:
        raise RlftError(f"start_index must be >= 0, got {start_index}")
    per_epoch = num_examples // batch_size
    index = start_index
    epoch, order = -1, None
    while True:
        if index // per_epoch != epoch:
            epoch = index // per_epoch
            order = epoch_permutation(num_examples, seed, epoch)
        j = index % per_epoch
        yield index, order[j * batch_size:(j + 1) * batch_size]
        index += 1
