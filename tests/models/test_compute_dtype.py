"""bfloat16 compute: parameters stay float32, logits stay float32 and close to the float32 forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlft.models import Decoder, ModelConfig, positions_from_mask


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bfloat16_compute_tracks_float32(family):
    if family == "gpt2":
        cfg = ModelConfig.gpt2(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_positions=32)
    else:
        cfg = ModelConfig.llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    bf16_graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(cfg.replace(dtype="bfloat16"),
                                                                rngs=nnx.Rngs(0))))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 12)), jnp.int32)
    mask = jnp.ones_like(tokens).at[1, :4].set(0)
    positions = positions_from_mask(mask)
    f32 = nnx.merge(graphdef, params)(tokens, positions, mask)
    bf16 = nnx.merge(bf16_graphdef, params)(tokens, positions, mask)
    assert bf16.dtype == jnp.float32
    real = np.asarray(mask, bool)
    diff = np.abs(np.asarray(bf16) - np.asarray(f32))[real]
    assert 0 < diff.max() < 0.05  # bfloat16 really was used, and stays close
