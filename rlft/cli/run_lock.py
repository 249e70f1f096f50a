"""One `rlft run` at a time per work directory: an exclusive lock held for the life of the run.

`rlft run` locks WORKDIR/.rlft.lock with the operating system's lock (`fcntl.flock`, exclusive,
non-blocking) before it checks or writes anything else there (run_config.json included), and keeps
the file open until the run ends. The kernel ties the lock to the open file, so it is released
however the process ends (return, exception, Ctrl-C, SIGTERM, `kill -9`, a crash): there is never a
stale lock to remove by hand. The file's existence means nothing (it stays between runs); only a
held lock refuses a second run. The holder writes one JSON line into the file after taking the
lock (pid, host, start time, command), which a refused run quotes in its one-line error:

    rlft: error: runs/x is in use by another rlft run (pid 1234, started 2025-01-01T12:00:00+0000,
    'rlft run experiments/a.py'); wait for it to finish or use another --workdir

Multi-process runs share one directory: only process 0 takes the lock, and every process learns
whether it got it, so a refused run stops on all of them (`lock_run_dir`).

`rlft eval RUN_DIR` does not take the lock: it reads only committed checkpoints (Orbax writes a step
into `<step>.orbax-checkpoint-tmp-*` and renames it when complete; `checkpoint_steps` lists digit
names only) and writes only under RUN_DIR/eval/, so it may run beside the training.

Limits: the lock is advisory (only rlft honours it). On NFS, Linux implements flock with POSIX
byte-range locks, which hold across clients; on a file system without locks (flock fails with
ENOLCK/EOPNOTSUPP, e.g. Lustre mounted without `-o flock`) the run goes on with a warning, unprotected.
Python opens files close-on-exec, so `subprocess` children do not inherit the lock; a child forked
without exec does, and keeps the directory locked until it exits too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator, Sequence

from rlft.errors import RlftError
from rlft.files import naming

LOCK_FILE = ".rlft.lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLock:
    """The held lock of one work directory; `release()` (or leaving a `with` block) frees it."""

    def __init__(self, workdir: str, path: str, fd: int | None):
        self.workdir, self.path, self._fd = workdir, path, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Empties the record (it describes a live holder only) and closes the file, which drops the lock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(fd: int, workdir: str, path: str) -> bool:
    """flock(fd) exclusively without waiting: True if taken (or locks are unsupported, with a warning)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
        print(f"rlft: warning: {workdir}: the file system does not support locks ({e.strerror}); "
              f"nothing stops a second `rlft run` in this directory", file=sys.stderr)
    return True


def acquire(workdir: str, argv: Sequence[str]) -> RunLock:
    """Lock `workdir` (created if absent) for this process; RlftError naming the holder if another has it.

    `argv` is recorded in the lock file as the command of the run (with this pid, host and time).
    """
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
        raise RlftError(f"--workdir {workdir}: exists and is not a directory; choose another --workdir")
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        if not _try_lock(fd, workdir, path):
            record = _read_record(path)
            # No record: the holder is just starting (then it writes one within the wait) or just
            # released the lock (it empties the record first), so try once more.
            if record or not _try_lock(fd, workdir, path):
                raise RlftError(_in_use_message(workdir, record))
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": shlex.join(argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    except BaseException as e:
        os.close(fd)
        if isinstance(e, OSError) and (named := naming(e, path)) is not e:
            raise named from e
        raise
    return RunLock(workdir, path, fd)


def _read_record(path: str, wait: float = 1.0) -> dict:
    """The holder's record in the lock file at `path` ({} if unreadable, or not written within `wait`
    seconds: the holder writes it just after locking)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with open(path, "rb") as f:
                record = json.loads(f.read(4096))
            if isinstance(record, dict):
                return record
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.05)


def _in_use_message(workdir: str, record: dict) -> str:
    pid = record.get("pid", "unknown")
    host = record.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    started = f", started {record['started']}" if record.get("started") else ""
    command = f", {record['command']!r}" if record.get("command") else ""
    return (f"{workdir} is in use by another rlft run (pid {pid}{where}{started}{command}); "
            f"wait for it to finish or use another --workdir")


@contextlib.contextmanager
def lock_run_dir(workdir: str, argv: Sequence[str]) -> Iterator[RunLock | None]:
    """Hold `workdir`'s lock for the `with` block (process 0 takes it; None on the other processes).

    With several processes every one learns whether process 0 got it, so a refused run (or one
    whose directory cannot be written) raises on all of them instead of leaving the others waiting.
    """
    import jax

    from rlft.parallel.distributed import collective, is_primary

    lock, failure = None, None
    if is_primary():
        try:
            lock = acquire(workdir, argv)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other processes know
            failure = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        with collective("rlft_run_lock"):  # often the run's first: names a process that never came
            locked = int(multihost_utils.broadcast_one_to_all(np.int32(failure is None)))
        if not locked and failure is None:
            failure = RlftError(f"{workdir}: process 0 could not lock the run directory (its error says why)")
    if failure is not None:
        raise failure
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
