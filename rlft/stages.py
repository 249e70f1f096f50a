"""Reusable experiment stages: a resumable SFT/pretraining stage and log-likelihood scoring.

A stage owns a sub-directory of the run (checkpoints/, metrics.jsonl, tensorboard/); running it
again resumes from its latest checkpoint, and a finished stage just returns its final params.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rlft.checkpoints import Checkpointer
from rlft.data.batching import Example, TokenBatch, pad_right
from rlft.data.loader import epoch_batches
from rlft.logging import MetricsLogger
from rlft.objectives.sft import token_logprobs
from rlft.sharding import batch_sharding, shard_batch
from rlft.steps import (abstract_train_state, compile_step, init_sharded_train_state, make_optimizer,
                        sft_step)
from rlft.train_loop import DATA_POSITION, restore_or_init, train


def sft_stage_config(steps: int, batch_size: int, learning_rate: float, **overrides) -> ml_collections.ConfigDict:
    """The config section every SFT-like stage reads (see `run_sft_stage`)."""
    section = dict(steps=steps, batch_size=batch_size, accum_steps=1, learning_rate=learning_rate,
                   warmup_steps=max(steps // 20, 1), weight_decay=0.01, clip_norm=1.0,
                   max_length=64, full_sequence_loss=False, save_every=max(steps // 4, 1), keep=2)
    section.update(overrides)
    return ml_collections.ConfigDict(section)


STAGES_FILE = "stages.json"


def record_stage(workdir: str, name: str, kind: str = "lm") -> None:
    """Append a stage to WORKDIR/stages.json; `rlft.load(WORKDIR)` loads the last stage's model."""
    path = os.path.join(workdir, STAGES_FILE)
    stages = json.load(open(path)) if os.path.isfile(path) else []
    stages = [s for s in stages if s["name"] != name] + [{"name": name, "kind": kind}]
    with open(path, "w") as f:
        json.dump(stages, f, indent=2)


def run_sft_stage(name: str, workdir: str, graphdef: nnx.GraphDef, params: nnx.State,
                  examples: Sequence[Example], cfg: ml_collections.ConfigDict, mesh: Mesh,
                  seed: int, pad_id: int) -> nnx.State:
    """Train `params` on (prompt, completion) token examples for cfg.steps; returns final params.

    Resumes from WORKDIR/NAME/checkpoints when present (params, optimizer, step, RNG, data order).
    """
    stage_dir = os.path.join(workdir, name)
    record_stage(workdir, name, "lm")
    tx = make_optimizer(cfg.learning_rate, cfg.warmup_steps, cfg.steps, cfg.weight_decay, cfg.clip_norm)
    abstract = abstract_train_state(graphdef, params, tx, mesh)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    checkpointer = Checkpointer(os.path.join(stage_dir, "checkpoints"), cfg.save_every, cfg.keep)
    state, extra = restore_or_init(checkpointer, abstract,
                                   lambda: init_sharded_train_state(graphdef, params, tx, seed, mesh))
    start = int(jax.device_get(state.step))
    if start >= cfg.steps:
        checkpointer.close()
        return state.params

    def host_batch(indices: np.ndarray) -> TokenBatch:
        batch, _ = pad_right([examples[i] for i in indices], cfg.max_length, pad_id,
                             full_sequence_loss=cfg.full_sequence_loss)
        return batch

    batches = ((i, host_batch(idx)) for i, idx in
               epoch_batches(len(examples), cfg.batch_size, seed, start_index=extra[DATA_POSITION]))
    template = host_batch(np.arange(cfg.batch_size))
    step = compile_step(sft_step, shardings, jax.tree.map(lambda x: batch_sharding(mesh, x.ndim), template),
                        mesh, graphdef=graphdef, tx=tx, accum_steps=cfg.accum_steps)
    with MetricsLogger(stage_dir, cfg.steps, desc=name, start_step=start) as logger:
        state = train(step, state, batches, mesh, checkpointer, logger, cfg.steps)
    checkpointer.close()
    return state.params


@functools.partial(jax.jit, static_argnums=0)
def _completion_logprob(graphdef: nnx.GraphDef, params: nnx.State, batch: TokenBatch) -> jax.Array:
    logits = nnx.merge(graphdef, params)(batch.tokens, batch.positions, batch.segment_ids)
    return jnp.sum(token_logprobs(logits, batch.tokens) * batch.loss_mask, axis=-1)


def completion_logprobs(graphdef: nnx.GraphDef, params: nnx.State, examples: Sequence[Example],
                        length: int, pad_id: int, mesh: Mesh, batch_size: int = 64) -> np.ndarray:
    """log p(completion | prompt) summed over completion tokens, float32 [len(examples)]."""
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)  # static shapes: one compilation
        batch, _ = pad_right(chunk, length, pad_id)
        out.append(np.asarray(_completion_logprob(graphdef, params, shard_batch(batch, mesh)))[:real])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
