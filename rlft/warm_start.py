"""Initialise models from earlier stages: a language model's params as a Decoder or as the backbone
of a ScalarModel (reward model, critic), from memory or from an rlft run/stage/checkpoint directory.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from rlft.models import Decoder, ModelConfig, ScalarModel
from rlft.models.params import dotted_names, fill_params, flatten_params
from rlft.sharding import sharded_init, state_shardings

LmSource = str | nnx.State | dict  # a stage/checkpoint dir, an in-memory state or a pure dict


def decoder_state(cfg: ModelConfig, source: LmSource, mesh: Mesh) -> nnx.State:
    """Decoder params for `cfg` from `source`, checked by name and shape, placed by the sharding rules.

    An in-memory nnx.State with the Decoder's structure is re-placed, not copied to host; one in
    the other layer layout (unrolled vs `scan_layers`) is converted by name (through the host).
    """
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    if isinstance(source, nnx.State):
        if jax.tree.structure(source) == jax.tree.structure(abstract):
            state = source
        else:  # another layout, or not this model: fill_params converts or names what does not fit
            state = fill_params(abstract, flatten_params(source), "warm-start params")
    else:
        if isinstance(source, str):
            from rlft.api import load_values

            values, name = load_values(source), source
        else:
            values, name = source, "warm-start params"
        state = fill_params(abstract, dotted_names(values), name)
    return jax.device_put(state, state_shardings(abstract, mesh))


def scalar_model_from_lm(cfg: ModelConfig, source: LmSource, mesh: Mesh, head_init_std: float = 0.0,
                         seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) of a ScalarModel whose backbone is the LM `source` and whose head is new.

    The head is zero (head_init_std=0) or normal(0, head_init_std) from `seed`.
    """
    graphdef, params = sharded_init(
        lambda: ScalarModel(cfg, rngs=nnx.Rngs(seed), head_init_std=head_init_std), mesh)
    params["backbone"] = decoder_state(cfg, source, mesh)
    return graphdef, params
