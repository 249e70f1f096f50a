"""Multi-process JAX: joining the processes of a run, and the host-side rules of such a run.

One process per host (GPU node, TPU VM worker, or a localhost process simulating one), all running
the same program on one global mesh. The rules that make that work, each in one place here:

- start-up: `initialize` joins the processes (explicit coordinator flags, `RLFT_*` variables, or
  what `jax.distributed.initialize()` detects: SLURM, TPU pods, Open MPI); CPU runs use gloo.
  Joining (`initialize`, then the run's first `collective`, e.g. a `barrier`) waits at most
  RLFT_INIT_TIMEOUT seconds (default 300) for the other processes; a process that failed at
  start-up then shows as one `rlft: error:` line naming it, not as JAX's abort or a gloo
  DEADLINE_EXCEEDED traceback;
- files and logs are written by process 0 only (`is_primary`), Orbax checkpoints by every
  process as Orbax intends; `barrier` lets the others wait for a file process 0 writes (other
  steps all processes take together go inside `with collective(name):`);
- each process feeds its own rows of a global batch (`local_rows`, then
  `jax.make_array_from_process_local_data` in `rlft.parallel.sharding.shard_batch`);
- host code that needs every row of a global array (decoding completions, scores, reports) reads it
  with `to_host`, which gathers across processes.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import threading
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from rlft.errors import RlftError

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "RLFT_COORDINATOR", "RLFT_NUM_PROCESSES", "RLFT_PROCESS_ID"
ENV_DISTRIBUTED = "RLFT_DISTRIBUTED"  # "detect": let jax.distributed.initialize() read the cluster
ENV_INIT_TIMEOUT = "RLFT_INIT_TIMEOUT"  # seconds a process waits for the others to join (default 300)
DEFAULT_INIT_TIMEOUT = 300  # jax.distributed.initialize's own default
_JAX_TIMEOUT_MARGIN = 60  # JAX's deadline is later than ours, so that ours (an RlftError) is what happens

# Set by `initialize` in a run of several processes until its first `collective` (joining ends there):
# {"coordinator": HOST:PORT, "timeout": seconds}.
_joining: dict | None = None


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


def init_timeout(env: Mapping[str, str] | None = None) -> int:
    """Seconds a process waits for the others to join a run: RLFT_INIT_TIMEOUT, default 300."""
    env = os.environ if env is None else env
    timeout = _int_env(env, ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT)
    if timeout < 1:
        raise RlftError(f"environment variable {ENV_INIT_TIMEOUT}={env[ENV_INIT_TIMEOUT]!r}: expected a "
                        "positive number of seconds")
    return timeout


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, detect: bool = False) -> bool:
    """Join a multi-process run before JAX is used (see `resolve`); True if there is more than one process.

    Must run before anything touches a JAX backend (jax.devices(), an array). CPU collectives
    use gloo, so multi-process CPU runs (tests, `launch/multiprocess_cpu.sh`) work.

    Waits at most `init_timeout()` seconds (RLFT_INIT_TIMEOUT) for every process to join. JAX ends
    a process that waited too long with an abort (SIGABRT and a C++ stack trace), which no Python
    code can catch; so a watchdog ends it first, with the `rlft: error: ...` line and status 2 the
    command gives an RlftError, naming this process, the coordinator, the number of processes and
    the likely culprit (`_not_joined`). The run's first `collective` still belongs to joining (a
    process that fails after `initialize`, e.g. on a bad flag of its own, shows there).
    """
    global _joining
    args = resolve(coordinator, num_processes, process_id, detect)
    if args is None:
        return False
    timeout = init_timeout()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = args.get("coordinator_address", "the detected cluster")
    done = _watchdog(timeout, lambda: _not_joined(args, timeout))
    try:
        try:
            jax.distributed.initialize(**args, initialization_timeout=timeout + _JAX_TIMEOUT_MARGIN)
        except (RuntimeError, ValueError) as e:
            raise RlftError(f"multi-process: {_who(args)} could not join {where}: {str(e).splitlines()[0]}") from None
        many = jax.process_count() > 1  # starts the backend: exchanges the device topology with the others
    finally:
        done.set()
    if many:
        _joining = {"coordinator": where, "timeout": timeout}
    return many


def _watchdog(seconds: float, message: Callable[[], str]) -> threading.Event:
    """Unless the returned event is set within `seconds`, print `rlft: error: {message()}` and exit 2.

    For waits in JAX's C++ code (which releases the GIL, so this thread runs) that end in an abort.
    """
    done = threading.Event()

    def watch():
        if not done.wait(seconds):
            try:
                text = message()
            except Exception as e:  # noqa: BLE001 - the exit below matters more than the wording
                text = f"multi-process: the processes did not join within {seconds:g} s ({e!r})"
            print(f"rlft: error: {text}", file=sys.stderr, flush=True)
            try:
                sys.stdout.flush()
            finally:
                os._exit(2)  # the main thread is stuck in JAX; this is the status an RlftError gives

    threading.Thread(target=watch, name="rlft-join-watchdog", daemon=True).start()
    return done


def _who(args: Mapping[str, Any]) -> str:
    """'process I of N' for this process, as far as it is known (JAX may be detecting it)."""
    pid, n = args.get("process_id"), args.get("num_processes")
    if pid is None:
        state = _jax_state()
        pid, n = getattr(state, "process_id", None), getattr(state, "num_processes", None)
    if pid is None:
        return "this process"
    return f"process {pid}" + (f" of {n}" if n is not None else "")


def _others(pid: int | None, n: int | None) -> str:
    """'process 1' or 'one of processes 1, 2, 3' (the ones that are not `pid`)."""
    if n is None:
        return "another process"
    others = [k for k in range(n) if k != pid]
    return f"process {others[0]}" if len(others) == 1 else "one of processes " + ", ".join(map(str, others))


def _not_joined(args: Mapping[str, Any], timeout: int) -> str:
    """Why `initialize` is still waiting after `timeout` s: who is missing, as far as this process can tell."""
    state = _jax_state()
    where = args.get("coordinator_address") or getattr(state, "coordinator_address", None)
    pid = args.get("process_id", getattr(state, "process_id", None))
    n = args.get("num_processes", getattr(state, "num_processes", None))
    head = f"multi-process: {_who(args)} (coordinator {where or 'unknown'})"
    hint = f"(wait longer with {ENV_INIT_TIMEOUT}=SECONDS)"
    if pid == 0 or where is None:
        missing = _others(pid, n)
        return (f"{head}: {missing} did not join within {timeout} s: did it fail at start-up? see its log "
                f"{hint}")
    if not _listening(where):
        return (f"{head}: process 0 (the coordinator) did not answer at {where} within {timeout} s: did it fail "
                f"at start-up? see its log; or is {where} not process 0's address? {hint}")
    return (f"{head}: the coordinator at {where} answers, but not all {n} processes joined within {timeout} s: "
            f"did one fail at start-up? see their logs; do all agree on the coordinator and the number of "
            f"processes? {hint}")


def _listening(address: str) -> bool:
    """True if something accepts a TCP connection at HOST:PORT."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=3):
            return True
    except (OSError, ValueError):
        return False


def _jax_state() -> Any:
    """JAX's distributed state (its client, process id, ...), or None if this JAX does not have it there."""
    try:
        from jax._src.distributed import global_state
    except ImportError:
        return None
    return global_state


def is_primary() -> bool:
    """True on process 0, the one that writes files, metrics and reports."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches this point (e.g. after process 0 wrote a file others read).

    A `collective`: the run's first one ends joining, and a timeout is an RlftError naming who is missing.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        with collective(name):
            multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def collective(name: str) -> Iterator[None]:
    """Around a step every process must take together (a barrier, a broadcast), named `name` alike on all.

    The run's first one ends joining (see `initialize`): it first waits at most RLFT_INIT_TIMEOUT
    seconds at the coordination service for every process, which names those that did not come (say
    one stopped on a bad flag of its own after `initialize`): an RlftError. Otherwise the first
    collective would wait in gloo, which gives the others 30 s to connect and then fails with a
    DEADLINE_EXCEEDED traceback; such a timeout in the block is an RlftError here too.
    """
    global _joining
    if jax.process_count() == 1:
        yield
        return
    me, n = jax.process_index(), jax.process_count()
    if _joining is not None:
        joining, client = _joining, getattr(_jax_state(), "client", None)
        _joining = None
        if client is not None and hasattr(client, "wait_at_barrier"):
            try:
                client.wait_at_barrier(f"rlft:{name}", joining["timeout"] * 1000)
            except Exception as e:  # noqa: BLE001 - JaxRuntimeError, the one kind its client raises
                text = str(e)
                if "DEADLINE_EXCEEDED" not in text:
                    raise RlftError(f"multi-process: process {me} of {n} (coordinator {joining['coordinator']}) "
                                    f"failed at its first barrier {name!r}: {text.splitlines()[0]}") from None
                missing = _timed_out_tasks(text)
                who = (f"process{'es' if len(missing) > 1 else ''} {', '.join(map(str, missing))}" if missing
                       else _others(me, n))
                raise RlftError(f"multi-process: process {me} of {n} (coordinator {joining['coordinator']}): "
                                f"{who} did not reach the first barrier ({name!r}) within {joining['timeout']} s: "
                                f"did it fail at start-up? see its log (wait longer with {ENV_INIT_TIMEOUT}=SECONDS)"
                                ) from None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - a JaxRuntimeError; anything else is re-raised as it is
        if isinstance(e, RlftError) or "DEADLINE_EXCEEDED" not in str(e):
            raise
        raise RlftError(f"multi-process: process {me} of {n}: {name!r} timed out waiting for the other processes: "
                        f"{_others(me, n)} did not take part: did it fail or stop? see its log") from None


def _timed_out_tasks(text: str) -> list[int]:
    """The process ids a coordination-service barrier error lists as timed out ([] if it lists none)."""
    _, found, rest = text.partition("timed out task names:")
    if not found:
        return []
    rest = rest.split("RPC:")[0]
    ids = re.findall(r"task:(\d+)", rest) if "task:" in rest else re.findall(r"\b(\d+)\b", rest)
    return sorted({int(k) for k in ids})


def local_rows(mesh: Mesh, global_rows: int) -> slice:
    """The rows [start, stop) of a global batch that this process's devices hold.

    A batch shards its leading dimension over the mesh's batch axes (`rlft.parallel.sharding.batch_sharding`);
    the process feeds exactly these rows to `jax.make_array_from_process_local_data`.
    """
    from rlft.parallel.sharding import batch_sharding

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


def local_to_host(x: Any, mesh: Mesh) -> Any:
    """numpy copies of this process's rows (`local_rows`) of a pytree of batch-sharded arrays
    [rows, ...]: no traffic between processes (one process: the whole arrays)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, x)
    from jax.experimental import multihost_utils

    from rlft.parallel.sharding import batch_axes

    spec = lambda a: jax.sharding.PartitionSpec(batch_axes(mesh), *([None] * (a.ndim - 1)))
    local = multihost_utils.global_array_to_host_local_array(x, mesh, jax.tree.map(spec, x))
    return jax.tree.map(np.asarray, local)


def failed_processes(ok: bool, name: str) -> list[int]:
    """The indices of the processes that passed ok=False; every process calls it with its own `ok`
    at the same point (a collective named `name`). Lets a process that failed alone stop the
    others with an error instead of leaving them waiting in the next collective."""
    if jax.process_count() == 1:
        return [] if ok else [0]
    from jax.experimental import multihost_utils

    with collective(name):
        flags = np.asarray(multihost_utils.process_allgather(np.asarray([ok], np.int32), tiled=True))
    return [i for i, flag in enumerate(flags.reshape(-1).tolist()) if not flag]


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
