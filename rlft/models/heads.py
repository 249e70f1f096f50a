"""Scalar heads on the decoder: reward models and value functions (critics), and the read-out of
a reward model's score at the last real token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rlft.models.config import ModelConfig
from rlft.models.decoder import Decoder
from rlft.models.lora import LoraConfig

Array = jax.Array


def last_token_index(segment_ids: Array) -> Array:
    """int32 [batch]: the slot of the last non-padding token of each row (0 for an empty row).

    Works for right padding, left padding and packing alike (the last slot with segment_ids > 0).
    """
    real = segment_ids > 0
    length = segment_ids.shape[-1]
    from_end = jnp.argmax(real[..., ::-1], axis=-1)
    return jnp.where(jnp.any(real, axis=-1), length - 1 - from_end, 0).astype(jnp.int32)


def last_token_scores(scores: Array, segment_ids: Array) -> Array:
    """float32 [batch]: scores [batch, length] read at the last real token of each row."""
    index = last_token_index(segment_ids)
    return jnp.take_along_axis(scores, index[:, None], axis=-1)[:, 0].astype(jnp.float32)


class ScalarHead(nnx.Module):
    """hidden [batch, length, d_model] -> float32 [batch, length]; zero-initialised by default."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, init_std: float = 0.0):
        kernel = init_std * jax.random.normal(rngs.params(), (d_model,), jnp.float32)
        self.kernel = nnx.Param(kernel, logical_axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((), jnp.float32), logical_axes=())

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return jnp.einsum("btd,d->bt", hidden.astype(jnp.float32), self.kernel[...]) + self.bias[...]


class ScalarModel(nnx.Module):
    """A decoder backbone with a scalar head: a reward model or a critic.

    `__call__` returns a score per position, float32 [batch, length]; a reward is read at the
    last real token (`last_token_scores`), a value at every completion token.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, head_init_std: float = 0.0,
                 lora: LoraConfig | None = None):
        self.backbone = Decoder(cfg, rngs=rngs, lora=lora)
        self.head = ScalarHead(cfg.d_model, rngs=rngs, init_std=head_init_std)

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        return self.head(self.backbone.hidden(tokens, positions, segment_ids)[0])
