"""LoRA: low-rank adapters on the decoder's dense layers, trained while the base stays frozen.

An adapted projection computes  y = x·W + (alpha / rank)·(x·A)·B  with A [in, rank] and B [rank, out]
held by a Flax `nnx.LoRA` module (`nnx.LoRAParam` variables, B zero-initialised, so a fresh adapter
leaves the model unchanged). `Decoder(cfg, lora=LoraConfig(...))` adds one adapter per targeted
weight, named `<weight>_lora` beside it (`layers.0.attn.q_lora.lora_a`); everything else about the
model is unchanged, so the frozen part of a LoRA model has exactly the names of the plain model.

Training splits the LoRA model's state in two (`split_trainable`): the trainable part (adapters, plus
the scalar head of a reward model or critic) is the train state's params, optimised and
checkpointed; the frozen base is a non-donated argument of the step, and `combine` joins them
inside it. The DPO/RL reference is the same base with the adapters off (`adapters_off`: B = 0
gives x·W + 0 exactly), so the base is held once. `merge_adapters` folds trained adapters into the
base weights (export, `rlft.load`, the next stage).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from rlft.errors import RlftError
from rlft.files import read_json, write_json
from rlft.parallel.sharding import state_shardings

# Weights an adapter can target, by the attribute name of the weight in Attention / MLP.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

# The trainable part of a LoRA model: its adapters and, for a ScalarModel, the scalar head.
TRAINABLE = nnx.Any(nnx.LoRAParam, nnx.PathContains("head"))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (the update is scaled by alpha / r) and the targeted weights (LORA_TARGETS)."""

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral) or self.rank < 1:
            raise RlftError(f"lora.rank={self.rank!r}: must be an integer >= 1 (0 turns LoRA off)")
        if not (isinstance(self.alpha, numbers.Real) and 0 < self.alpha < math.inf):
            raise RlftError(f"lora.alpha={self.alpha!r}: must be a finite number > 0")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise RlftError(f"lora.targets={','.join(self.targets)!r}: expected distinct names from "
                            f"{','.join(LORA_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_section(cls, section: Any, what: str = "lora") -> "LoraConfig | None":
        """From a config section {rank, alpha, targets: "q,k,v,o"}; None when absent or rank == 0."""
        if section is None or not section.get("rank"):
            return None
        targets = section.get("targets", "q,k,v,o")
        if isinstance(targets, str):
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        try:
            return cls(rank=section.rank, alpha=section.get("alpha", 16.0), targets=tuple(targets))
        except RlftError as e:
            raise RlftError(str(e).replace("lora.", f"{what}.", 1)) from None

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def lora_section(rank: int = 0, alpha: float = 16.0, targets: str = "q,k,v,o") -> ml_collections.ConfigDict:
    """The `lora` config section of a stage (`--config.STAGE.lora.rank=8`); rank 0 = full fine-tuning."""
    return ml_collections.ConfigDict(dict(rank=rank, alpha=alpha, targets=targets))


class Adapter(nnx.LoRA):
    """`nnx.LoRA` without a base module, scaled: x [tokens, in] -> scale·(x·A)·B [tokens, out].

    A carries the logical axes of the weight's input (`in_axis`), B those of its output, so the
    adapters shard with the same rules as the weights they adapt.
    """

    def __init__(self, in_features: int, out_features: int, lora: LoraConfig, in_axis: str,
                 out_axis: str, dtype, rngs: nnx.Rngs):
        super().__init__(in_features, lora.rank, out_features, dtype=dtype, rngs=rngs,
                         a_metadata={"logical_axes": (in_axis, "lora_rank")},
                         b_metadata={"logical_axes": ("lora_rank", out_axis)})
        self.scale = lora.scale

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.scale * super().__call__(x)


def split_trainable(state: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(trainable, frozen) parts of a LoRA model's state (see TRAINABLE)."""
    return nnx.split_state(state, TRAINABLE, ...)


def combine(frozen: nnx.State | None, trainable: nnx.State) -> nnx.State:
    """The whole model state from its frozen and trainable parts (trainable alone without LoRA)."""
    return trainable if frozen is None else nnx.merge_state(frozen, trainable)


def adapters_off(frozen: nnx.State, trainable: nnx.State) -> nnx.State:
    """The model state with every adapter's B set to zero: the base model's outputs, exactly."""
    b, rest = nnx.split_state(trainable, nnx.PathContains("lora_b"), ...)
    return nnx.merge_state(frozen, rest, jax.tree.map(jnp.zeros_like, b))


def attach_adapters(graphdef: nnx.GraphDef, params: nnx.State, lora: LoraConfig, mesh, seed: int
                    ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(LoRA graphdef, trainable, frozen) of the Decoder/ScalarModel `(graphdef, params)` with adapters.

    The adapters are initialised from `seed` straight into their shardings; the base weights are
    neither copied nor re-initialised (`params` become the frozen part, placed by the sharding rules).
    """
    module = nnx.merge(graphdef, params)
    if getattr(module, "config", None) is None:
        raise RlftError(f"LoRA: {type(module).__name__} is not a Decoder or ScalarModel")
    if getattr(getattr(module, "backbone", module), "lora", None) is not None:
        raise RlftError("LoRA: the model already has adapters (merge them first)")
    make = lambda: type(module)(module.config, rngs=nnx.Rngs(seed), lora=lora)
    lora_graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = state_shardings(nnx.split_state(abstract, nnx.LoRAParam, ...)[0], mesh)
    adapters = jax.jit(lambda: nnx.state(make(), nnx.LoRAParam), out_shardings=shardings)()
    params = jax.device_put(params, state_shardings(params, mesh))  # no-op when already placed
    full = nnx.merge_state(params, adapters)
    if jax.tree.structure(full) != jax.tree.structure(abstract):
        raise RlftError("LoRA: the params do not have the structure of the model they are given with")
    trainable, frozen = split_trainable(full)
    return lora_graphdef, trainable, frozen


def merged_state(frozen: nnx.State, trainable: nnx.State, lora: LoraConfig) -> nnx.State:
    """The plain model's state (adapters folded into the weights) from a LoRA model's two parts."""
    full = combine(frozen, trainable)
    plain = jax.tree.map(lambda x: x, nnx.split_state(full, nnx.LoRAParam, ...)[1])
    nnx.replace_by_pure_dict(plain, merge_adapters(nnx.to_pure_dict(full), lora))
    return plain


LORA_FILE = "lora.json"


def write_lora_record(stage_dir: str, lora: LoraConfig, base: str | None) -> None:
    """STAGE/lora.json: the adapters' config and where the frozen base comes from.

    base: a stage or checkpoint directory (`rlft.load` reads it and merges the adapters), stored
    relative to the stage's run directory when inside it; None = adapters only (not loadable merged).
    """
    run_dir = os.path.dirname(os.path.abspath(stage_dir))
    if base is not None:
        base = os.path.abspath(base)
        if base.startswith(run_dir + os.sep):
            base = os.path.relpath(base, run_dir)
    write_json(os.path.join(stage_dir, LORA_FILE), {**lora.to_dict(), "base": base})


def read_lora_record(stage_dir: str) -> tuple[LoraConfig, str | None] | None:
    """(LoraConfig, absolute base path or None) from STAGE/lora.json; None for a full fine-tune."""
    path = os.path.join(stage_dir, LORA_FILE)
    if not os.path.isfile(path):
        return None
    record = read_json(path, dict)
    try:
        lora = LoraConfig(rank=record["rank"], alpha=record["alpha"], targets=tuple(record["targets"]))
    except (KeyError, TypeError, RlftError) as e:
        raise RlftError(f"{path}: not a valid LoRA record ({e}); the file is damaged") from None
    base = record.get("base")
    if base is not None and not os.path.isabs(base):
        base = os.path.join(os.path.dirname(os.path.abspath(stage_dir)), base)
    return lora, base


def merge_adapters(values: dict, lora: LoraConfig | None = None) -> dict:
    """A nested param dict (`nnx.to_pure_dict` layout) with every `X_lora` folded into weight X.

    W [in..., out...] += scale·(A·B) reshaped to W's shape (stacked [L, ...] weights per layer);
    the adapters are dropped, so the result has the plain model's names. The scale is the one the
    adapter was trained with (`lora.scale`).
    """
    scale = lora.scale if lora is not None else None

    def walk(tree: dict) -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(key, str) and key.endswith("_lora"):
                continue
            out[key] = walk(value) if isinstance(value, dict) else value
        for key, value in tree.items():
            if not (isinstance(key, str) and key.endswith("_lora")):
                continue
            weight_name = key[: -len("_lora")]
            if weight_name not in out or scale is None:
                raise RlftError(f"LoRA adapter {key} has no weight {weight_name} to merge into"
                                if weight_name not in out else "merge_adapters needs the LoraConfig")
            w = out[weight_name]
            a, b = jnp.asarray(value["lora_a"], jnp.float32), jnp.asarray(value["lora_b"], jnp.float32)
            delta = scale * (a @ b)  # [in, out] or [L, in, out]
            out[weight_name] = (jnp.asarray(w, jnp.float32) + delta.reshape(w.shape)).astype(w.dtype)
        return out

    return walk(values)
