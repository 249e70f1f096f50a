"""Moving arrays between two meshes on disjoint devices: the trainer's and the RL sampler's.

    reshard(tree, shardings) -> tree placed on `shardings` (another mesh's), in one process or several

In one process `jax.device_put` does this. In a multi-process run JAX moves an array between
shardings only when both span the same devices ("cross-host reshard ... should have the same set
of devices"), and the sampler's devices are not the trainer's. `rlft.parallel.sharding.rollout_mesh`
gives every process the same share of sampler devices, so each process can build its pieces of the
target from data it already holds:

- a target piece whose rows some local source shard covers (a batch sharded over the data axes:
  the rows of a process are the same in both meshes) is a local copy;
- otherwise (a parameter sharded across processes, FSDP) the array is first replicated on its own
  mesh (one all-gather of the trainer's collectives), then every piece is a local slice.

Whether an array needs the all-gather is decided from the two shardings alone (the global device
to index maps), so every process makes the same choice and joins the same collectives.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec


def _covers(outer: tuple, inner: tuple, shape: tuple) -> bool:
    """The index (tuple of slices) `outer` contains `inner`, both into an array of `shape`."""
    for o, i, n in zip(outer, inner, shape):
        o_start, o_stop, _ = o.indices(n)
        i_start, i_stop, _ = i.indices(n)
        if not (o_start <= i_start and i_stop <= o_stop):
            return False
    return True


def _local_sources(x: jax.Array, target: jax.sharding.Sharding) -> bool:
    """Every process holds, on its own devices, a source shard covering each of its target pieces."""
    shape = x.shape
    source = x.sharding.devices_indices_map(shape)
    for device, index in target.devices_indices_map(shape).items():
        mine = [i for d, i in source.items() if d.process_index == device.process_index]
        if not any(_covers(i, index, shape) for i in mine):
            return False
    return True


def _assemble(x: jax.Array, target: jax.sharding.Sharding) -> jax.Array:
    """`x` on `target` from this process's own shards of `x` (`_local_sources` holds)."""
    shape, pieces = x.shape, []
    shards = x.addressable_shards
    for device, index in target.addressable_devices_indices_map(shape).items():
        shard = next(s for s in shards if _covers(s.index, index, shape))
        relative = tuple(slice(i.indices(n)[0] - s.indices(n)[0], i.indices(n)[1] - s.indices(n)[0])
                         for i, s, n in zip(index, shard.index, shape))
        pieces.append(jax.device_put(shard.data[relative], device))
    return jax.make_array_from_single_device_arrays(shape, target, pieces)


def _replicated_on_own_mesh(x: jax.Array) -> jax.Array:
    sharding = x.sharding
    if not isinstance(sharding, NamedSharding):
        raise ValueError(f"reshard: a multi-process array needs a NamedSharding, got {sharding}")
    return jax.jit(lambda a: a, out_shardings=NamedSharding(sharding.mesh, PartitionSpec()))(x)


def _one(x: Any, target: jax.sharding.Sharding) -> Any:
    if (not isinstance(x, jax.Array) or (x.is_fully_addressable and target.is_fully_addressable)
            or x.sharding.device_set == target.device_set):  # what jax.device_put moves itself
        return jax.device_put(x, target)
    if not _local_sources(x, target):
        x = _replicated_on_own_mesh(x)
    return _assemble(x, target)


def reshard(tree: Any, shardings: Any) -> Any:
    """`tree` placed on `shardings` (a matching tree of shardings, or one sharding for every leaf),
    whichever devices and processes its arrays are on now (module doc). Values unchanged."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: _one(x, shardings), tree)
    return jax.tree.map(_one, tree, shardings)
