"""Shared helpers of the reward and DPO tests: a tiny GPT-2 config, random params, pair batches,
and a stage run interrupted mid-way."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from rlft.data.preferences import pad_pairs
from rlft.models import ModelConfig

CFG = ModelConfig.gpt2(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_positions=64)


def random_params(make_model, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, random numpy params) shaped like make_model(); no init is compiled (slow on CPU)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
    rng = np.random.default_rng(seed)

    def one(path, x):
        value = rng.normal(0.0, 0.05, x.shape).astype(np.float32)
        return value + 1.0 if "scale" in jax.tree_util.keystr(path) else value

    return graphdef, jax.tree_util.tree_map_with_path(one, abstract)


def random_pair_batch(pairs: int, length: int, seed: int = 0) -> dict:
    """Pair batch fields [pairs, 2, length]: a shared prompt, two completions, right padded."""
    rng = np.random.default_rng(seed)
    fields = {"tokens": np.zeros((pairs, 2, length), np.int32),
              "positions": np.zeros((pairs, 2, length), np.int32),
              "segment_ids": np.zeros((pairs, 2, length), np.int32),
              "loss_mask": np.zeros((pairs, 2, length), np.float32)}
    for i in range(pairs):
        prompt = rng.integers(2, CFG.vocab_size, int(rng.integers(1, length // 3))).tolist()
        for j in range(2):
            completion = rng.integers(2, CFG.vocab_size, int(rng.integers(1, length - len(prompt) + 1)))
            n = len(prompt) + len(completion)
            fields["tokens"][i, j, :n] = prompt + completion.tolist()
            fields["positions"][i, j, :n] = np.arange(n)
            fields["segment_ids"][i, j, :n] = 1
            fields["loss_mask"][i, j, len(prompt):n] = 1.0
    return fields


def interrupt_pair_stage(run, workdir, monkeypatch) -> None:
    """Run `run(workdir)` (a pair stage) until KeyboardInterrupt at its third training batch.

    Batches come from `rlft.train.stages.pad_pairs`: the template batch, then batches 0 and 1; the
    fourth call raises, as Ctrl-C would there. The patch is undone before returning.
    """
    calls = {"n": 0}

    def interrupting(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return pad_pairs(*args, **kw)

    monkeypatch.setattr("rlft.train.stages.pad_pairs", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run(workdir)
    monkeypatch.undo()
