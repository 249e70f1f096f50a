"""Parameter pytrees by name: flatten an nnx.State to dotted names and fill one back, checked.

Two layouts name a decoder's blocks: unrolled ("layers.3.attn.q" [D, H, Dh], one entry per block)
and scanned (`ModelConfig.scan_layers`: "layers.attn.q" [L, D, H, Dh]). `stack_layers` and
`unstack_layers` convert between them, and `fill_params` accepts either, so Hugging Face imports,
warm starts and exported checkpoints work with both.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx

from rlft.errors import RlftError

# "layers.3.attn.q" or "backbone.layers.3.attn.q" -> (prefix, layer, rest).
_PER_LAYER = re.compile(r"^((?:.+\.)?layers)\.(\d+)\.(.+)$")
# "layers.attn.q" (a stacked [L, ...] parameter of a scanned decoder) -> (prefix, rest).
_STACKED = re.compile(r"^((?:.+\.)?layers)\.(?!\d+\.)(.+)$")


def flatten_params(state: nnx.State) -> dict[str, jax.Array]:
    """{"layers.0.attn.q": array, ...} for every variable of the state."""
    return {".".join(str(k) for k in path): var[...] for path, var in nnx.to_flat_state(state)}


def dotted_names(tree: dict, prefix: str = "") -> dict:
    """{"layers.0.attn.q": array, ...} from a nested dict (the `nnx.to_pure_dict` layout)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(dotted_names(value, name + "."))
        else:
            out[name] = value
    return out


def stack_layers(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-layer names -> stacked: {"layers.{i}.X": [...]} for i < L becomes {"layers.X": [L, ...]}.

    Other names pass through. The layers of each parameter must be numbered 0..L-1 without gaps.
    """
    out, groups = {}, {}
    for name, value in values.items():
        m = _PER_LAYER.match(name)
        if m is None:
            out[name] = value
        else:
            groups.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = value
    for name, by_layer in groups.items():
        if sorted(by_layer) != list(range(len(by_layer))):
            raise RlftError(f"parameter {name}: layers {sorted(by_layer)} are not numbered 0..{len(by_layer) - 1}")
        out[name] = np.stack([np.asarray(by_layer[i]) for i in range(len(by_layer))])
    return out


def unstack_layers(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stacked names -> per-layer: {"layers.X": [L, ...]} becomes {"layers.{i}.X": [...]} for i < L.

    Other names (including per-layer ones) pass through, so an unrolled model's dict is unchanged.
    """
    out = {}
    for name, value in values.items():
        m = _STACKED.match(name)
        if m is None:
            out[name] = value
            continue
        for i, layer in enumerate(np.asarray(value)):
            out[f"{m[1]}.{i}.{m[2]}"] = layer
    return out


def fill_params(abstract: nnx.State, values: dict[str, np.ndarray], source: str) -> nnx.State:
    """A state shaped like `abstract` (from nnx.eval_shape) holding `values` by dotted name.

    `values` may name the blocks in either layout (unrolled or stacked); they are converted to the
    layout of `abstract`. Every name must be present with the expected shape; extra names are an
    error too, so that a checkpoint that does not fit the config is reported instead of half-loaded.
    """
    flat = nnx.to_flat_state(abstract)
    expected = {".".join(str(k) for k in path): var for path, var in flat}
    if any(_STACKED.match(n) for n in expected) and any(_PER_LAYER.match(n) for n in values):
        values = stack_layers(values)
    elif any(_PER_LAYER.match(n) for n in expected) and any(_STACKED.match(n) for n in values):
        values = unstack_layers(values)
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
