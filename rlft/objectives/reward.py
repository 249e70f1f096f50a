"""Reward modelling: the Bradley–Terry loss on pair rewards read at the last real token, as (sum, count).

Preference batches hold pairs: every field is [batch, 2, length] with row 0 the chosen and row 1
the rejected sequence of a pair (`rlft.data.preferences.pad_pairs`), so a pair never straddles
two devices or two micro-batches.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rlft.models.heads import last_token_scores
from rlft.ops import flatten_pairs

Array = jax.Array


def bradley_terry_loss(chosen: Array, rejected: Array, margin: float | Array = 0.0,
                       center_weight: float = 0.0) -> tuple[Array, Array, dict]:
    """(loss sum, pair count, aux sums) for rewards chosen, rejected float32 [batch].

    loss = sum_i -log σ(r_c - r_r - margin) + center_weight · sum_i (r_c + r_r)², so that
    loss / count = mean BT loss + center_weight · mean((r_c + r_r)²).
    aux: "correct" (pairs with r_c > r_r), "margin" (sum of r_c - r_r), "chosen", "rejected"
    (sums of the rewards), "bt_loss" (the Bradley–Terry part alone), "center" (sum of (r_c + r_r)²).
    """
    chosen = chosen.astype(jnp.float32)
    rejected = rejected.astype(jnp.float32)
    diff = chosen - rejected
    bt = -jnp.sum(jax.nn.log_sigmoid(diff - margin))
    center = jnp.sum(jnp.square(chosen + rejected))
    loss = bt + center_weight * center if center_weight else bt
    count = jnp.asarray(chosen.shape[0], jnp.float32)
    aux = {"correct": jnp.sum((diff > 0).astype(jnp.float32)), "margin": jnp.sum(diff),
           "chosen": jnp.sum(chosen), "rejected": jnp.sum(rejected), "bt_loss": bt, "center": center}
    return loss, count, aux


def pair_rewards(graphdef: nnx.GraphDef, params: nnx.State, batch: Any) -> tuple[Array, Array]:
    """(chosen, rejected) rewards float32 [batch] of a ScalarModel on a pair batch [batch, 2, length]."""
    flat = flatten_pairs(batch)
    scores = nnx.merge(graphdef, params)(flat["tokens"], flat["positions"], flat["segment_ids"])
    rewards = last_token_scores(scores, flat["segment_ids"])
    n = rewards.shape[0] // 2
    return rewards[:n], rewards[n:]


def reward_loss(graphdef: nnx.GraphDef, params: nnx.State, batch: Any, margin: float = 0.0,
                center_weight: float = 0.0) -> tuple[Array, Array, dict]:
    """`bradley_terry_loss` of a ScalarModel's last-token rewards on a pair batch [batch, 2, length]."""
    chosen, rejected = pair_rewards(graphdef, params, batch)
    return bradley_terry_loss(chosen, rejected, margin, center_weight)
