"""Supervised fine-tuning: token log-probabilities and the masked cross-entropy as (sum, count).

Batches are any pytree with the fields tokens, positions, segment_ids (int32 [batch, length]) and
loss_mask (float32 [batch, length]; 1.0 where tokens[b, t] is a target predicted by the logits at
t - 1), e.g. `rlft.data.batching.TokenBatch` or a dict with those keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def batch_field(batch: Any, name: str) -> Any:
    """batch[name] for a mapping, batch.name otherwise (NamedTuple, dataclass)."""
    return batch[name] if isinstance(batch, Mapping) else getattr(batch, name)


def token_logprobs(logits: Array, tokens: Array, temperature: float = 1.0) -> Array:
    """[B, T] log p(tokens[:, t] | tokens[:, :t]) from logits [B, T, V]; entry 0 is 0.

    logits[:, t - 1] predicts tokens[:, t]; computed in float32 as logit - logsumexp, without
    materialising the full log-softmax.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    targets = tokens[:, 1:]
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    logp = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.concatenate([jnp.zeros_like(logp[:, :1]), logp], axis=1)


def sft_loss(graphdef: nnx.GraphDef, params: nnx.State, batch: Any) -> tuple[Array, Array, dict]:
    """(cross-entropy summed over loss_mask tokens, number of such tokens, aux sums).

    aux: "correct" (argmax hits on target tokens), "input_tokens" (non-padding tokens processed).

    All three are sums (float32 scalars), so micro-batches and devices add up exactly.
    """
    tokens = batch_field(batch, "tokens")
    model = nnx.merge(graphdef, params)
    logits = model(tokens, batch_field(batch, "positions"), batch_field(batch, "segment_ids"))
    mask = batch_field(batch, "loss_mask").astype(jnp.float32)
    logp = token_logprobs(logits, tokens)
    loss_sum = -jnp.sum(logp * mask)
    count = jnp.sum(mask)
    hits = jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]
    correct = jnp.sum(hits.astype(jnp.float32) * mask[:, 1:])
    input_tokens = jnp.sum((batch_field(batch, "segment_ids") > 0).astype(jnp.float32))
    return loss_sum, count, {"correct": correct, "input_tokens": input_tokens}
