"""Parameter pytrees by name: flatten an nnx.State to dotted names and fill one back, checked."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from rlft.errors import RlftError


def flatten_params(state: nnx.State) -> dict[str, jax.Array]:
    """{"layers.0.attn.q": array, ...} for every variable of the state."""
    return {".".join(str(k) for k in path): var[...] for path, var in nnx.to_flat_state(state)}


def fill_params(abstract: nnx.State, values: dict[str, np.ndarray], source: str) -> nnx.State:
    """A state shaped like `abstract` (from nnx.eval_shape) holding `values` by dotted name.

    Every name must be present with the expected shape; extra names are an error too, so that a
    checkpoint that does not fit the config is reported instead of half-loaded.
    """
    flat = nnx.to_flat_state(abstract)
    expected = {".".join(str(k) for k in path): var for path, var in flat}
    missing = sorted(set(expected) - set(values))
    extra = sorted(set(values) - set(expected))
    if missing or extra:
        raise RlftError(f"{source}: parameters do not match the model config "
                        f"(missing: {missing[:5]}, unexpected: {extra[:5]})")
    leaves = []
    for path, var in flat:
        name = ".".join(str(k) for k in path)
        value = np.asarray(values[name])
        if value.shape != var.shape:
            raise RlftError(f"{source}: parameter {name} has shape {value.shape}, "
                            f"the config expects {var.shape}")
        leaves.append((path, var.replace(value=jax.numpy.asarray(value, var.dtype))))
    return nnx.from_flat_state(leaves)
