"""Device mesh, logical-axis rules, and the shardings of states and batches.

Parameters carry logical axis names (`logical_axes` metadata on each nnx.Param); `RULES` maps each
name to mesh axes. A name without a rule is an error, never a silent replication, and so is a
dimension that the mesh axes do not divide. Batches shard their leading dimension over
('data', 'fsdp'); FSDP shards the `embed` dimension of parameters and optimizer state.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlft.errors import RlftError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or tuple of axes, or None = replicated on purpose).
RULES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "length": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "positions": None,
    "layers": None,
    "lora_rank": None,  # the rank of LoRA adapters: small, replicated
}
# The mesh axes that shard weights (every rule but the batch's).
WEIGHT_AXES = tuple(sorted({a for name, entry in RULES.items() if name != "batch"
                            for a in (entry if isinstance(entry, tuple) else (entry,)) if a}))


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one axis may be -1, meaning "all remaining devices".

    A mapping (an experiment's `mesh` section) may also hold `rollout`: that many devices, the
    last ones of each process, are left to the RL sampler (`rollout_mesh`) and the mesh spans the others.
    """
    sizes = [shape[a] for a in MESH_AXES] if isinstance(shape, Mapping) else list(shape)
    if len(sizes) != len(MESH_AXES):
        raise RlftError(f"mesh: expected sizes for {MESH_AXES}, got {list(sizes)}")
    devices = list(devices if devices is not None else jax.devices())
    if isinstance(shape, Mapping) and shape.get("rollout"):
        devices = _split_rollout(devices, _rollout_count(shape, devices))[0]
    if sizes.count(-1) > 1:
        raise RlftError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise RlftError(f"mesh: {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise RlftError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                        f"{len(devices)} are available")
    # Auto axes: shardings propagate through the program as with pjit (not sharding-in-types).
    return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _rollout_count(shape: Mapping[str, int | float], devices: Sequence[jax.Device]) -> int:
    """The sampler's device count from `mesh.rollout`: a count, or a fraction in (0, 1) of the
    devices (rounded to a multiple of the processes, at least one per process)."""
    given, available = shape.get("rollout", 0), len(devices)
    processes = len({d.process_index for d in devices})
    count = given
    if not isinstance(given, bool) and isinstance(given, (int, float)):
        if 0 < given < 1:
            count = processes * max(1, round(given * available / processes))
        elif float(given).is_integer():
            count = int(given)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < available:
        raise RlftError(f"mesh.rollout={given!r}: must be a device count in [0, {available - 1}] or a fraction in "
                        f"(0, 1) leaving the trainer at least one (devices left to the RL sampler, out of "
                        f"{available}; 0 = sampler and trainer share every device)")
    if count % processes:
        raise RlftError(f"mesh.rollout={count}: must be a multiple of the {processes} processes (each process "
                        f"gives the sampler the same number of its devices)")
    return count


def _split_rollout(devices: Sequence[jax.Device], count: int) -> tuple[list, list]:
    """(trainer's devices, sampler's devices): the last count / P devices of each of the P processes
    sample, so both meshes hold the same processes in the same order and a batch's rows stay in
    their process when they move between them (`rlft.parallel.transfer.reshard`)."""
    by_process: dict[int, list] = {}
    for device in devices:
        by_process.setdefault(device.process_index, []).append(device)
    share = count // len(by_process)
    train = [d for group in by_process.values() for d in group[:len(group) - share]]
    sampler = [d for group in by_process.values() for d in group[len(group) - share:]]
    return train, sampler


def rollout_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh | None:
    """The RL sampler's own mesh: `shape["rollout"]` devices (the last ones of each process) as
    (data N, fsdp 1, tensor 1), disjoint from `make_mesh(shape)`'s; None when `rollout` is 0 or
    absent (colocated)."""
    devices = list(devices if devices is not None else jax.devices())
    count = _rollout_count(shape, devices) if shape.get("rollout") else 0
    return make_mesh((count, 1, 1), _split_rollout(devices, count)[1]) if count else None


def local_device_mesh() -> Mesh:
    """A (data 1, fsdp 1, tensor 1) mesh of this process's first device: where a model used outside
    a run (rlft.load, a reward model before a stage places it) computes."""
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])


def logical_to_spec(axes: Sequence[str | None], rules: Mapping[str, Any] = RULES, what: str = "") -> PartitionSpec:
    """PartitionSpec for logical axis names; an unknown name is an error naming `what`."""
    spec = []
    for name in axes:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise RlftError(f"sharding: logical axis {name!r} of {what or 'an array'} has no rule; "
                            f"known axes: {sorted(rules)}")
        spec.append(rules[name])
    return PartitionSpec(*spec)


def mesh_rules(mesh: Mesh, rules: Mapping[str, Any] = RULES) -> dict[str, Any]:
    """`rules` with the mesh axes that `mesh` lacks dropped (those dimensions are replicated)."""
    def keep(entry):
        names = tuple(n for n in (entry if isinstance(entry, tuple) else (entry,))
                      if n in mesh.axis_names)
        return (names if isinstance(entry, tuple) else names[0]) if names else None

    return {name: keep(entry) for name, entry in rules.items()}


def _mesh_size(mesh: Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


def checked_sharding(mesh: Mesh, shape: Sequence[int], axes: Sequence[str | None],
                     rules: Mapping[str, Any] = RULES, what: str = "") -> NamedSharding:
    """NamedSharding for an array of `shape` with logical `axes`, checking divisibility."""
    if len(axes) != len(shape):
        raise RlftError(f"sharding: {what} has shape {tuple(shape)} but logical axes {tuple(axes)}")
    spec = logical_to_spec(axes, rules, what)
    for dim, name, entry in zip(shape, axes, spec):
        if dim % _mesh_size(mesh, entry):
            raise RlftError(f"sharding: {what} dimension {name}={dim} is not divisible by mesh axes "
                            f"{entry} of size {_mesh_size(mesh, entry)}; change the mesh or the model")
    return NamedSharding(mesh, spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, Any] = RULES) -> nnx.State:
    """A state-shaped tree of NamedShardings derived from each variable's `logical_axes`."""

    def one(path, var):
        name = ".".join(str(getattr(k, "key", k)) for k in path)
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            raise RlftError(f"sharding: parameter {name} has no logical_axes metadata")
        return var.replace(value=checked_sharding(mesh, var.shape, axes, rules, name))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def sharded_init(make_module: Callable[[], nnx.Module], mesh: Mesh,
                 rules: Mapping[str, Any] = RULES) -> tuple[nnx.GraphDef, nnx.State]:
    """Initialise a module directly into its shardings: no host ever holds the full parameters.

    `make_module` builds the module from fixed seeds (e.g. `lambda: Decoder(cfg, rngs=nnx.Rngs(0))`),
    so the result is the same on every mesh.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(make_module))
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.state(make_module()), out_shardings=shardings)()
    return graphdef, state


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch is split over: those of ('data', 'fsdp') the mesh has."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_shards(mesh: Mesh | None) -> int:
    """How many parts a batch is split into: the product of the mesh's batch axes (1 without a mesh)."""
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading dimension over the mesh's batch axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh) or None, *([None] * (ndim - 1))))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a pytree of per-process host arrays [local_batch, ...] as global batch-sharded arrays.

    Each process passes its own slice of the global batch; with one process this is the batch.
    """
    data_size = _mesh_size(mesh, BATCH_AXES)

    def one(x):
        x = np.asarray(x)
        global_rows = x.shape[0] * jax.process_count()
        if global_rows % data_size:
            raise RlftError(f"batch size {global_rows} is not divisible by the data-parallel mesh size "
                            f"{data_size} (mesh {dict(mesh.shape)})")
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(one, batch)


def constrain_activation(x: jax.Array, feature_axis: str) -> jax.Array:
    """Pin a [tokens, features] activation: tokens over the batch axes, features as `feature_axis`'s weights.

    Active only while tracing under `jax.set_mesh` (as `MeshJit` traces the train steps) on a mesh
    that shards weights (fsdp or tensor > 1); a no-op otherwise (data parallel: nothing to fix, and
    the constraints cost compile time). The features keep the non-batch mesh axes their logical
    axis maps to (`tensor` for heads/mlp/vocab; nothing for embed, whose `fsdp` sharding is for
    weights only). Without it, XLA's partitioner met an FSDP-sharded weight by all-gathering the
    whole global batch's activations (docs/big_models.md). A dimension the axes do not divide is
    left unconstrained.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
        return x
    if all(mesh.shape[a] == 1 for a in WEIGHT_AXES if a in mesh.shape):
        return x  # weights replicated (data parallel only): nothing pulls activations off the batch
    rules = mesh_rules(mesh)
    tokens = batch_axes(mesh) or None
    entry = rules[feature_axis]
    names = tuple(n for n in (entry if isinstance(entry, tuple) else (entry,)) if n and n not in BATCH_AXES)
    features = names or None
    spec = [axes if axes is None or dim % _mesh_size(mesh, axes) == 0 else None
            for dim, axes in zip(x.shape, (tokens, features))]
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


class MeshJit:
    """A `jax.jit` function that is traced, lowered and called with `mesh` set (`jax.set_mesh`).

    The mesh in context lets the model constrain its activations (`constrain_activation`);
    everything else is the jitted function's (call it, or `.lower(...)` it to inspect).
    """

    def __init__(self, jitted: Callable, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self.jitted(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args, **kwargs)


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding (scalars, RNG keys, step counters)."""
    return NamedSharding(mesh, PartitionSpec())
