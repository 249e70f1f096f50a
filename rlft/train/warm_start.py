"""Trained weights by path (`load_values`: a stage, a LoRA stage merged onto its base, a Hugging Face
checkpoint), and models initialised from them: a language model's params as a Decoder or as the backbone
of a ScalarModel (reward model, critic), from memory or from an rlft run/stage/checkpoint directory.
"""

from __future__ import annotations

import os

import jax
from flax import nnx
from jax.sharding import Mesh

from rlft.errors import RlftError
from rlft.models import Decoder, ModelConfig, ScalarModel, hf
from rlft.models.lora import merge_adapters, read_lora_record
from rlft.models.params import dotted_names, fill_params, flatten_params, stack_layers, unstack_layers
from rlft.parallel.sharding import sharded_init, state_shardings
from rlft.train.checkpoints import MODEL_CONFIG_FILE, load_params
from rlft.train.stages import read_stages

LmSource = str | nnx.State | dict  # a stage/checkpoint dir, an in-memory state or a pure dict


def run_dir_of(path: str) -> str | None:
    """The rlft run directory holding `path` (the first ancestor with model_config.json)."""
    current = os.path.abspath(path)
    for _ in range(5):
        if os.path.isfile(os.path.join(current, MODEL_CONFIG_FILE)):
            return current
        current = os.path.dirname(current)
    return None


def load_values(path: str) -> dict:
    """The params saved at `path` (a stage, checkpoints or step dir, or a Hugging Face checkpoint
    dir) as a nested dict of arrays.

    The `nnx.to_pure_dict` layout of the stage's plain model: a LoRA stage's adapters (its
    checkpoints hold nothing else, plus a reward model's head) are merged into the base recorded
    in its lora.json, which is loaded the same way (so LoRA stages on LoRA stages work too). A
    Hugging Face sequence-classification checkpoint gives a ScalarModel's values ({"backbone",
    "head"}), like a reward stage; a causal LM a Decoder's.
    """
    if hf.is_hf_scalar_checkpoint(path):
        return nnx.to_pure_dict(hf.load_hf_scalar_checkpoint(path)[1])
    if hf.is_hf_checkpoint(path):
        return nnx.to_pure_dict(hf.load_hf_checkpoint(path)[1])
    values, _ = load_params(path)
    run_dir = run_dir_of(path)
    if run_dir is None:
        return values
    stage = os.path.relpath(os.path.abspath(path), run_dir).split(os.sep)[0]
    lora = read_lora_record(os.path.join(run_dir, stage))
    if lora is None:
        return values
    kind = next((s["kind"] for s in read_stages(run_dir) if s["name"] == stage), "lm")
    return _merged_lora_values(values, *lora, stage=stage, kind=kind)


def _merged_lora_values(adapters: dict, lora, base: str | None, *, stage: str, kind: str) -> dict:
    """A LoRA stage's checkpoint (adapters, + head) joined with its recorded base, adapters merged."""
    if base is None:
        raise RlftError(f"stage {stage} was trained with LoRA without a recorded base model, so only its "
                        f"adapters are saved; it cannot be loaded as a merged model")
    if not os.path.exists(base):
        raise RlftError(f"stage {stage} is a LoRA stage on the base {base}, which no longer exists")
    base_values = load_values(base)
    base_values = base_values if kind == "lm" else {"backbone": base_values}
    # The stage and its base may differ in layer layout (`model.scan_layers`): merge per layer,
    # then give the result the stage's layout.
    stacked = dotted_names(adapters) != unstack_layers(dotted_names(adapters))
    per_layer = lambda tree: _nested(unstack_layers(dotted_names(tree)))
    merged = merge_adapters(_deep_merge(per_layer(base_values), per_layer(adapters)), lora)
    return _nested(stack_layers(dotted_names(merged))) if stacked else merged


def _nested(values: dict) -> dict:
    """{"a.b.c": x} -> {"a": {"b": {"c": x}}} (the inverse of `dotted_names`)."""
    out: dict = {}
    for name, value in values.items():
        *parents, leaf = name.split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def _deep_merge(a: dict, b: dict) -> dict:
    """Nested dicts: b's entries added to (or replacing) a's."""
    out = dict(a)
    for key, value in b.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


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
