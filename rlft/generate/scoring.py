"""Reward-model scores of token sequences on a mesh, and the reward statistics RL normalises with.

WORKDIR/<stage>/reward_stats.json records the mean and std of a reward model's scores on a
reference set, and how texts were tokenised for it (`add_bos`: the EOS id, or `bos_id` when
present, opens each sequence; `add_eos`: EOS closes it; `max_length`: the truncation length), so
`rlft.load(...).score(texts)` reproduces the training inputs. A Hugging Face sequence-classification
model gets the same keys from its tokenizer (`rlft.api.load`), with `bos_id` and no mean/std.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rlft.data.batching import Example, TokenBatch, pad_right, truncate
from rlft.errors import RlftError
from rlft.files import read_json, write_json
from rlft.models.heads import last_token_scores
from rlft.generate.logprobs import sequence_logprobs
from rlft.parallel.distributed import barrier, is_primary, local_rows, to_host
from rlft.parallel.sharding import shard_batch

REWARD_STATS_FILE = "reward_stats.json"


@functools.partial(jax.jit, static_argnums=0)
def _last_scores(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array) -> jax.Array:
    """float32 [batch]: a ScalarModel's score at the last real token of each row."""
    return last_token_scores(nnx.merge(graphdef, params)(tokens, positions, segment_ids), segment_ids)


@functools.partial(jax.jit, static_argnums=0)
def _token_logprobs(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, positions: jax.Array,
                    segment_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """float32 [batch, length - 1]: a Decoder's log-prob of each loss_mask token (0 elsewhere)."""
    logp = sequence_logprobs(graphdef, params, tokens, positions, segment_ids)
    return jnp.where(loss_mask[:, 1:] > 0, logp, 0.0)


def _map_padded(fn: Callable[[TokenBatch], Any], examples: Sequence[Example], length: int,
                pad_id: int, mesh: Mesh, batch_size: int) -> Any:
    """fn over right-padded, batch-sharded chunks of examples; each array fn returns (one, or a tuple)
    comes back as [len(examples), ...] numpy (fn's rows, padding rows dropped)."""
    out, rows = [], local_rows(mesh, batch_size)
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)  # static shapes: one compilation
        batch, _ = pad_right(chunk[rows], length, pad_id)  # this process's rows of the chunk
        out.append(jax.tree.map(lambda x: to_host(x)[:real], fn(shard_batch(batch, mesh))))
    if not out:
        return np.zeros((0,), np.float32)
    return jax.tree.map(lambda *parts: np.concatenate(parts), *out)


def sequence_scores(graphdef: nnx.GraphDef, params: nnx.State, examples: Sequence[Example],
                    length: int, pad_id: int, mesh: Mesh, batch_size: int = 64) -> np.ndarray:
    """float32 [len(examples)]: the reward of each (prompt, completion) token example, right padded."""
    fn = lambda b: _last_scores(graphdef, params, b.tokens, b.positions, b.segment_ids)
    return _map_padded(fn, examples, length, pad_id, mesh, batch_size)


def completion_token_logprobs(graphdef: nnx.GraphDef, params: nnx.State, examples: Sequence[Example],
                              length: int, pad_id: int, mesh: Mesh,
                              batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(logprobs, mask), float32 [len(examples), length - 1]: log p of each completion token given
    everything before it (right padded; column t predicts token t + 1), and 1 where a completion
    token is (0 on prompt and padding). What perplexity reads."""
    if not examples:
        raise RlftError("completion_token_logprobs: no examples")
    fn = lambda b: (_token_logprobs(graphdef, params, b.tokens, b.positions, b.segment_ids, b.loss_mask),
                    b.loss_mask[:, 1:].astype(np.float32))
    return _map_padded(fn, examples, length, pad_id, mesh, batch_size)


def completion_logprobs(graphdef: nnx.GraphDef, params: nnx.State, examples: Sequence[Example],
                        length: int, pad_id: int, mesh: Mesh, batch_size: int = 64) -> np.ndarray:
    """float32 [len(examples)]: log p(completion | prompt) summed over completion tokens."""
    if not examples:
        return np.zeros((0,), np.float32)
    logp, _ = completion_token_logprobs(graphdef, params, examples, length, pad_id, mesh, batch_size)
    return logp.sum(axis=1)


def reward_input_length(stats: dict | None, max_positions: int) -> int:
    """The truncation length of a reward model's inputs: reward_stats.json's max_length (the
    training inputs'), at most the model's max_positions."""
    return min((stats or {}).get("max_length") or max_positions, max_positions)


def reward_examples(tokenizer, texts: Sequence[str], prompts: Sequence[str] | None, stats: dict | None,
                    max_positions: int) -> list[Example]:
    """(prompt, completion) token examples of texts as a reward model was trained on them.

    Following reward_stats.json (`stats`): `bos_id` (default: EOS) opens the prompt (add_bos) and
    EOS closes the text (add_eos, the default); each text follows its prompt when prompts are
    given; truncated to `reward_input_length` by `rlft.data.batching.truncate`.
    """
    stats = stats or {}
    bos_id = tokenizer.eos_token_id if stats.get("bos_id") is None else stats["bos_id"]
    bos = [bos_id] if stats.get("add_bos", False) else []
    eos = [tokenizer.eos_token_id] if stats.get("add_eos", True) else []
    length = reward_input_length(stats, max_positions)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    return [truncate(bos + (encode(prompts[i]) if prompts is not None else []), encode(text) + eos, length)
            for i, text in enumerate(texts)]


def write_reward_stats(stage_dir: str, scores: np.ndarray, reference: str, add_bos: bool,
                       add_eos: bool, max_length: int) -> dict:
    """Writes STAGE_DIR/reward_stats.json (mean, std, count of `scores` [n]); returns its content.

    add_bos, add_eos and max_length (the truncation length) describe the training inputs.
    """
    scores = np.asarray(scores, np.float64)
    if scores.size == 0:
        raise RlftError(f"{stage_dir}: no reference texts to compute reward statistics on")
    stats = {"mean": float(scores.mean()), "std": float(scores.std()), "count": int(scores.size),
             "reference": reference, "add_bos": bool(add_bos), "add_eos": bool(add_eos),
             "max_length": int(max_length)}
    if is_primary():  # the others wait: they read the file next
        write_json(os.path.join(stage_dir, REWARD_STATS_FILE), stats)
    barrier(f"reward stats {stage_dir}")
    return stats


def read_reward_stats(stage_dir: str) -> dict | None:
    """The stage's reward_stats.json as a dict, or None if it has none."""
    path = os.path.join(stage_dir, REWARD_STATS_FILE)
    if not os.path.isfile(path):
        return None
    stats = read_json(path)
    for key in ("mean", "std"):
        if isinstance(stats.get(key), bool) or not isinstance(stats.get(key), (int, float)):
            raise RlftError(f"{path}: {key}={stats.get(key)!r}, expected a number; the file is damaged")
    return stats


def has_reference_stats(stats: dict | None) -> bool:
    """True when reward stats record the mean and std of a reference set (an rlft reward stage's
    reward_stats.json), so scores can be normalised; a Hugging Face reward model's framing has none."""
    return bool(stats) and all(isinstance(stats.get(k), (int, float)) and not isinstance(stats.get(k), bool)
                               for k in ("mean", "std"))


def normalize_scores(scores: np.ndarray, stats: dict, eps: float = 1e-8) -> np.ndarray:
    """(scores - mean) / std with the reference statistics of `stats`."""
    return (np.asarray(scores, np.float32) - stats["mean"]) / (stats["std"] + eps)
