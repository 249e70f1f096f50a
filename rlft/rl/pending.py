"""Asynchronous RL (rl.max_staleness = K > 0): the K rollouts sampled ahead of the update.

Step t trains on the rollout of step t, which the policy after step t − K − 1 sampled (the initial
policy for t <= K + 1; async/staleness = (t − 1) − that version), while the rollout of step t + K is
sampled by the current policy: the host scores step t's rollout while the device samples, and
the update does not wait for a sampler of its own policy. The K rollouts in flight are
`PGState.pending`, checkpointed with the state, so a resumed run trains on exactly the rollouts
an uninterrupted one would (the determinism rule: a rollout is a pure function of (the policy
version that sampled it, the seed, its step), none of timing).

A rollout here is {"sequences": Sequences [rows, ...], "version": int32 []} (scored when it is
consumed: a reward is a deterministic function of the completions, so a resumed run gets the same
scores); pending stacks K of them on a leading axis, oldest first.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlft.parallel.sharding import MeshJit, batch_axes, batch_sharding, replicated

Array = jax.Array


def rollout_abstract(sequences: Any) -> dict:
    """The abstract rollout (ShapeDtypeStructs) of abstract Sequences [rows, ...]."""
    return {"sequences": sequences, "version": jax.ShapeDtypeStruct((), jnp.int32)}


def pending_abstract(rollout: dict, k: int) -> dict:
    """K rollouts stacked: every leaf [K, ...]."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((k, *a.shape), a.dtype), rollout)


def _rollout_shardings(rollout: dict, mesh: Mesh) -> dict:
    """Rows over the mesh's batch axes (as pg_step's batch), the version replicated."""
    return jax.tree.map(lambda a: batch_sharding(mesh, a.ndim) if a.ndim else replicated(mesh), rollout)


def pending_shardings(pending: dict, mesh: Mesh) -> dict:
    """Leading K axis replicated, rows over the batch axes."""
    def one(a):
        if a.ndim == 1:
            return replicated(mesh)
        return NamedSharding(mesh, PartitionSpec(None, batch_axes(mesh) or None, *([None] * (a.ndim - 2))))
    return jax.tree.map(one, pending)


class PendingOps:
    """The jitted moves of the pending rollouts on `mesh` (stack, oldest, push)."""

    def __init__(self, rollout: dict, k: int, mesh: Mesh):
        pending = pending_abstract(rollout, k)
        stacked, single = pending_shardings(pending, mesh), _rollout_shardings(rollout, mesh)
        self.empty = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), pending),
                             out_shardings=stacked)
        self.stack = MeshJit(jax.jit(lambda *rs: jax.tree.map(lambda *x: jnp.stack(x), *rs),
                                     out_shardings=stacked), mesh)
        self.oldest = MeshJit(jax.jit(lambda p: jax.tree.map(lambda a: a[0], p), out_shardings=single), mesh)
        self.push = MeshJit(jax.jit(lambda p, r: jax.tree.map(lambda a, b: jnp.concatenate([a[1:], b[None]]), p, r),
                                    out_shardings=stacked), mesh)
        self.shardings = stacked
