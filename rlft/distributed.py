"""Multi-process JAX: joining the processes of a run, and the host-side rules of such a run.

One process per host (GPU node, TPU VM worker, or a localhost process simulating one), all running
the same program on one global mesh. The rules that make that work, each in one place here:

- start-up: `initialize` joins the processes (explicit coordinator flags, `RLFT_*` variables, or
  what `jax.distributed.initialize()` detects: SLURM, TPU pods, Open MPI); CPU runs use gloo;
- files and logs are written by process 0 only (`is_primary`), Orbax checkpoints by every
  process as Orbax intends; `barrier` lets the others wait for a file process 0 writes;
- each process feeds its own rows of a global batch (`local_rows`, then
  `jax.make_array_from_process_local_data` in `rlft.sharding.shard_batch`);
- host code that needs every row of a global array (decoding completions, scores, reports) reads it
  with `to_host`, which gathers across processes.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from rlft.errors import RlftError

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "RLFT_COORDINATOR", "RLFT_NUM_PROCESSES", "RLFT_PROCESS_ID"
ENV_DISTRIBUTED = "RLFT_DISTRIBUTED"  # "detect": let jax.distributed.initialize() read the cluster


def resolve(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
            detect: bool = False, env: Mapping[str, str] | None = None) -> dict | None:
    """How to start: None (one process), {} (JAX detects the cluster) or the explicit arguments.

    Flags win over the RLFT_COORDINATOR / RLFT_NUM_PROCESSES / RLFT_PROCESS_ID variables; a SLURM
    job step with more than one task, `detect=True` or RLFT_DISTRIBUTED=detect mean "detect".
    """
    env = os.environ if env is None else env
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _int_env(env, ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _int_env(env, ENV_PROCESS_ID)
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise RlftError(f"multi-process: {', '.join(missing)} missing (give --coordinator HOST:PORT, "
                            f"--num-processes N and --process-id I together)")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise RlftError(f"multi-process: --process-id={process_id} must be in [0, --num-processes="
                            f"{num_processes})")
        if ":" not in coordinator:
            raise RlftError(f"multi-process: --coordinator={coordinator!r} must be HOST:PORT")
        return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}
    mode = env.get(ENV_DISTRIBUTED, "")
    if mode not in ("", "detect", "off"):
        raise RlftError(f"{ENV_DISTRIBUTED}={mode!r}: expected 'detect' or 'off'")
    if detect or mode == "detect":
        return {}
    if mode != "off" and _int_env(env, "SLURM_NTASKS", 1) > 1 and "SLURM_PROCID" in env:
        return {}
    return None


def _int_env(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    if name not in env:
        return default
    try:
        return int(env[name])
    except ValueError:
        raise RlftError(f"environment variable {name}={env[name]!r}: expected an integer") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, detect: bool = False) -> bool:
    """Join a multi-process run before JAX is used (see `resolve`); True if there is more than one process.

    Must run before anything touches a JAX backend (jax.devices(), an array). CPU collectives
    use gloo, so multi-process CPU runs (tests, `launch/multiprocess_cpu.sh`) work.
    """
    args = resolve(coordinator, num_processes, process_id, detect)
    if args is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**args)
    except (RuntimeError, ValueError) as e:
        where = args.get("coordinator_address", "the detected cluster")
        raise RlftError(f"multi-process: could not join {where}: {str(e).splitlines()[0]}") from None
    return jax.process_count() > 1


def is_primary() -> bool:
    """True on process 0, the one that writes files, metrics and reports."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches this point (e.g. after process 0 wrote a file others read)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def local_rows(mesh: Mesh, global_rows: int) -> slice:
    """The rows [start, stop) of a global batch that this process's devices hold.

    A batch shards its leading dimension over the mesh's batch axes (`rlft.sharding.batch_sharding`);
    the process feeds exactly these rows to `jax.make_array_from_process_local_data`.
    """
    from rlft.sharding import batch_sharding

    if jax.process_count() == 1:
        return slice(0, global_rows)
    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((global_rows,))
    spans = sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop) for s in index_map.values()})
    start, stop = spans[0][0], spans[-1][1]
    if any(end != next_start for (_, end), (next_start, _) in zip(spans, spans[1:])):
        raise RlftError(f"mesh {dict(mesh.shape)}: process {jax.process_index()} holds rows {spans} of the "
                        "batch, not one contiguous block; order the mesh's devices by process")
    return slice(start, stop)


def to_host(x: Any) -> Any:
    """numpy copies of a pytree of arrays, whole on every process (gathered when spread over processes)."""
    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree.map(one, x)


def put_global(x: Any, sharding: jax.sharding.Sharding) -> Any:
    """`jax.device_put` of a pytree that every process holds whole (numpy, or arrays on its own devices).

    One process: device_put itself. Several: each value goes through the host (device_put accepts
    host values for a sharding that spans processes, not arrays committed to one local device);
    PRNG key arrays keep their implementation.
    """
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)

    def one(a):
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(a)), impl=jax.random.key_impl(a))
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return jax.device_put(a, sharding)  # already global: a resharding
        return jax.device_put(np.asarray(a), sharding)

    return jax.tree.map(one, x)
