"""launch/multiprocess_cpu.sh stops every process of its run on every way out (a process killed,
SIGTERM or SIGINT to the launcher), and a process that fails at start-up is named, by the launcher
and by `rlft.parallel.distributed` (RLFT_INIT_TIMEOUT), instead of leaving the others with a JAX abort or a
gloo DEADLINE_EXCEEDED traceback.

Real processes (like tests/test_multiprocess.py). TEST_LAUNCHER=PATH runs the launcher tests
against another version of the script.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from rlft.parallel.distributed import _timed_out_tasks, init_timeout
from rlft.errors import RlftError
from tests.conftest import TEST_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.environ.get("TEST_LAUNCHER", os.path.join(ROOT, "launch/multiprocess_cpu.sh"))
IDLE = os.path.join(ROOT, "tests/fixtures/idle_experiment.py")
RAW_FAILURES = ("DEADLINE_EXCEEDED", "Traceback", "Check failure", "Terminating process")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "RLFT_"))}
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "XLA_FLAGS": TEST_XLA_FLAGS, **extra}


def _free_ports(k: int) -> list[int]:
    sockets = [socket.socket() for _ in range(k)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped, does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for child in _pids():
        try:
            with open(f"/proc/{child}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _is_worker(pid: int) -> bool:
    """True if `pid` is an `rlft run` python process."""
    return b"\0-m\0rlft\0run\0" in _cmdline(pid)


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


# preexec_fn (`_as_from_a_shell`) makes subprocess fork instead of spawn; JAX warns about forking a
# threaded process, but the child only resets its signals and execs bash.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")


def _as_from_a_shell() -> None:
    """In the launcher's child before exec: no blocked signals and SIGINT / SIGTERM at their
    defaults, as a terminal's shell starts a command. A pytest worker may not be in that state
    (threads of the libraries it loaded, signal handlers of earlier tests), and bash cannot trap
    a signal that was blocked or ignored when it started."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _signal_state(pid: int) -> str:
    """The Sig* lines of /proc/PID/status (blocked, ignored, caught), for failure messages."""
    try:
        return " ".join(line.strip() for line in open(f"/proc/{pid}/status") if line.startswith("Sig"))
    except OSError:
        return "(gone)"


class Run:
    """launch/multiprocess_cpu.sh 2 tests/fixtures/idle_experiment.py, output in a file."""

    def __init__(self, tmp_path, python: str = sys.executable, args=(), **env):
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.workdir, self.logs = str(tmp_path / "run"), str(tmp_path / "logs")
        self.output = tmp_path / "launcher.txt"
        self.seen: set[int] = set()  # `rlft run` processes seen under the launcher, for `cleanup`
        with open(self.output, "w") as out:  # a file, not a pipe: a process left behind would hold a pipe open
            self.launcher = subprocess.Popen(
                ["bash", LAUNCHER, "2", IDLE, "--workdir", self.workdir, *args],
                env=_env(LOG_DIR=self.logs, PYTHON=python, STOP_TIMEOUT="1", **env),
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_as_from_a_shell)
        self.started = time.monotonic()

    def text(self) -> str:
        return self.output.read_text()

    def wait_ready(self) -> list[int]:
        """Both processes past start-up (in the experiment's `run`): their pids, process 0's first."""
        ready = [os.path.join(self.workdir, f"ready-{i}") for i in (0, 1)]

        def started() -> bool:
            self.seen.update(p for p in _descendants(self.launcher.pid) if _is_worker(p))
            return all(os.path.exists(p) for p in ready) or self.launcher.poll() is not None

        _wait_until(started, 120, "both processes to start")
        assert self.launcher.poll() is None, self.text()[-3000:]
        workers = [int(open(p).read()) for p in ready]
        assert sorted(workers) == sorted(p for p in _descendants(self.launcher.pid) if _is_worker(p))
        return workers

    def finish(self, timeout: float = 60) -> int:
        try:
            return self.launcher.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the launcher did not exit within {timeout} s (its signals: "
                                 f"{_signal_state(self.launcher.pid)}):\n{self.text()[-3000:]}") from None

    def cleanup(self) -> None:
        """SIGKILL whatever this test started that is still there (only when a test failed)."""
        mine = f"\0--workdir\0{self.workdir}\0".encode()
        for pid in self.seen | set(_descendants(self.launcher.pid)) | {p for p in _pids() if mine in _cmdline(p)}:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.launcher.poll() is None:
            self.launcher.kill()
            self.launcher.wait()


@pytest.fixture
def launched(tmp_path):
    runs = []

    def start(**kwargs) -> Run:
        runs.append(Run(tmp_path / str(len(runs)), **kwargs))
        return runs[-1]

    yield start
    for run in runs:
        run.cleanup()


def test_a_killed_process_takes_the_run_down(launched):
    """SIGKILL to process 1: the launcher stops process 0 (SIGTERM, then SIGKILL after STOP_TIMEOUT:
    JAX swallows SIGTERM outside training), exits with process 1's status (128 + 9) and leaves
    nothing behind. LOG_DIR/process-I.pid holds the python process's pid."""
    run = launched()
    zero, one = run.wait_ready()
    os.kill(one, signal.SIGKILL)
    status = run.finish()
    assert [pid for pid in (zero, one) if _alive(pid)] == [], run.text()[-3000:]
    assert status == 137, run.text()[-3000:]
    assert "process 1 exited with status 137 (128 + SIGKILL)" in run.text()
    assert [int(open(os.path.join(run.logs, f"process-{i}.pid")).read()) for i in (0, 1)] == [zero, one]


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signalled_launcher_stops_every_process(launched, sig, status):
    run = launched()
    workers = run.wait_ready()
    run.launcher.send_signal(sig)
    assert run.finish() == status, run.text()[-3000:]
    assert [pid for pid in workers if _alive(pid)] == [], run.text()[-3000:]


def test_a_process_that_fails_at_start_up_is_named(launched, tmp_path):
    """Process 1 exits before it joins (here its interpreter refuses to start): the launcher says so
    at once, with the end of its log, and stops process 0, which is still waiting for it."""
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\nif [ "$RLFT_PROCESS_ID" = 1 ]; then\n'
                      '  echo "python: cannot start process 1 (test)" >&2; exit 3\nfi\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    run = launched(python=str(python))
    assert run.finish() == 3, run.text()[-3000:]
    text = run.text()
    log = os.path.join(run.logs, "process-1.log")
    assert f"process 1 exited with status 3 (log: {log})" in text, text[-3000:]
    assert "  | python: cannot start process 1 (test)" in text
    assert not any(raw in text for raw in RAW_FAILURES), text[-3000:]
    assert time.monotonic() - run.started < 30  # before any timeout of JAX's
    assert not [p for p in _descendants(run.launcher.pid) if _alive(p)]


def _one_process(process_id: int, port: int, timeout_s: int, workdir) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rlft", "run", IDLE, "--workdir", str(workdir)],
                            env=_env(RLFT_COORDINATOR=f"localhost:{port}", RLFT_NUM_PROCESSES="2",
                                     RLFT_PROCESS_ID=str(process_id), RLFT_INIT_TIMEOUT=str(timeout_s)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_process_alone_names_the_missing_one(tmp_path):
    """Process 0 or 1 of 2 started alone: after RLFT_INIT_TIMEOUT seconds one `rlft: error:` line
    (status 2) names it, the coordinator, the number of processes and who did not come, instead of
    JAX's abort (a C++ stack trace, SIGABRT) after 5 minutes."""
    ports = _free_ports(2)  # two runs of one process each, side by side
    alone = [_one_process(i, ports[i], 2, tmp_path / f"run-{i}") for i in (0, 1)]
    culprits = ["process 1 did not join within 2 s: did it fail at start-up? see its log",
                f"process 0 (the coordinator) did not answer at localhost:{ports[1]} within 2 s: did it fail "
                "at start-up? see its log"]
    try:
        errs = [process.communicate(timeout=60)[1] for process in alone]
    finally:
        for process in alone:
            if process.poll() is None:
                process.kill()
                process.wait()
    for i, (process, err) in enumerate(zip(alone, errs)):
        assert process.returncode == 2, err[-3000:]
        assert err.strip().splitlines()[-1].startswith(
            f"rlft: error: multi-process: process {i} of 2 (coordinator localhost:{ports[i]}): {culprits[i]}"
        ), err[-3000:]
        assert not any(raw in err for raw in RAW_FAILURES), err[-3000:]


def test_a_process_that_leaves_before_the_first_barrier_is_named():
    """Both processes join; process 1 exits before the run's first barrier (as on a bad flag of its
    own): process 0 fails there after RLFT_INIT_TIMEOUT seconds with an RlftError naming process 1,
    not gloo's DEADLINE_EXCEEDED traceback after 30 s."""
    port, = _free_ports(1)
    script = os.path.join(ROOT, "tests/fixtures/skip_first_barrier.py")
    processes = [subprocess.Popen([sys.executable, script, "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=_env(RLFT_COORDINATOR=f"localhost:{port}", RLFT_NUM_PROCESSES="2",
                                                      RLFT_PROCESS_ID=str(i), RLFT_INIT_TIMEOUT="2"))
                 for i in (0, 1)]
    try:
        (_, err_0), (_, err_1) = (p.communicate(timeout=90) for p in processes)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in processes] == [2, 3], (err_0[-3000:], err_1[-3000:])
    assert (f"rlft: error: multi-process: process 0 of 2 (coordinator localhost:{port}): process 1 did not reach "
            f"the first barrier ('skip_first_barrier') within 2 s: did it fail at start-up?") in err_0, err_0[-3000:]
    assert not any(raw in err_0 for raw in RAW_FAILURES), err_0[-3000:]


@pytest.mark.parametrize("value, expected", [(None, 300), ("7", 7), ("0", "a positive"), ("soon", "an integer")])
def test_init_timeout_setting(value, expected):
    env = {} if value is None else {"RLFT_INIT_TIMEOUT": value}
    if isinstance(expected, int):
        assert init_timeout(env) == expected
    else:
        with pytest.raises(RlftError, match=f"RLFT_INIT_TIMEOUT={value!r}: expected {expected}"):
            init_timeout(env)


@pytest.mark.parametrize("text, expected", [
    ("DEADLINE_EXCEEDED: Barrier timed out. Id: x::0. ...\n# of tasks that reached the barrier: 1/3.\n"
     "The first task at the barrier: 0. Some timed out task names:\n1\n2\n\n\nRPC: /xla.coordination.Barrier", [1, 2]),
    ("Some timed out task names: /job:jax_worker/replica:0/task:3\nRPC: ...", [3]),
    ("DEADLINE_EXCEEDED: something else", []),
])
def test_the_processes_a_barrier_timeout_names(text, expected):
    assert _timed_out_tasks(text) == expected
