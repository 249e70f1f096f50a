"""Supervised fine-tuning: the masked cross-entropy as (sum, count).

Batches are any pytree with the fields tokens, positions, segment_ids (int32 [batch, length]) and
loss_mask (float32 [batch, length]; 1.0 where tokens[b, t] is a target predicted by the logits at
t - 1), e.g. `rlft.data.batching.TokenBatch` or a dict with those keys.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rlft.generate.logprobs import next_tokens, token_logprobs
from rlft.ops import batch_field, first_argmax

Array = jax.Array


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
    # hits[:, t]: the logits at t put their first maximum on tokens[:, t + 1]; the last column
    # (no next token) is dropped.
    hits = first_argmax(jax.lax.stop_gradient(logits).astype(jnp.float32)) == next_tokens(tokens)
    correct = jnp.sum(hits[:, :-1].astype(jnp.float32) * mask[:, 1:])
    input_tokens = jnp.sum((batch_field(batch, "segment_ids") > 0).astype(jnp.float32))
    return loss_sum, count, {"correct": correct, "input_tokens": input_tokens}

