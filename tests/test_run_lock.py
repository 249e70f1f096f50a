"""One `rlft run` per work directory (rlft/cli/run_lock.py).

A second run of a directory another run holds is refused with one line naming the holder's pid,
before it reads or writes run_config.json or anything else there; the lock goes with its holder,
however it ends (kill -9 included), and a lock file left behind refuses nothing.
"""

import os
import subprocess
import sys

import pytest

from rlft.cli import run_lock
from rlft.cli.main import main
from rlft.errors import RlftError
from tests.conftest import TEST_XLA_FLAGS
from tests.test_bad_inputs import cli_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "tests", "fixtures", "toy_experiment.py")

# Takes the lock of argv[1] as `rlft run` does, says so, and sleeps until killed.
HOLDER = """
import sys, time
from rlft.cli.run_lock import acquire
lock = acquire(sys.argv[1], ["rlft", "run", "toy.py", "--workdir", sys.argv[1]])
print("locked", flush=True)
time.sleep(300)
"""


@pytest.fixture
def holder():
    """start(workdir) -> a process holding `workdir`'s lock; killed (by its pid) at the end of the test."""
    started = []

    def start(workdir) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started.append(proc)
        line = proc.stdout.readline()  # returns once the lock is held (or the process died)
        assert line.strip() == "locked", proc.communicate()[1]
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def contents(workdir) -> dict[str, bytes]:
    """Every file under `workdir` but the lock file: relative path -> bytes."""
    out = {}
    for dirpath, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(dirpath, name)
            if name != run_lock.LOCK_FILE:
                out[os.path.relpath(path, workdir)] = open(path, "rb").read()
    return out


def test_a_second_run_is_refused_naming_the_holder_until_it_is_killed(holder, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    assert main(["run", TOY, "--workdir", workdir]) == 0
    before = contents(workdir)
    proc = holder(workdir)

    for extra in ([], ["--config.train.steps=200", "--override"]):  # the same config, and an accepted change
        line = cli_error(["run", TOY, "--workdir", workdir, *extra], capsys)
        assert line.startswith(f"rlft: error: {workdir} is in use by another rlft run (pid {proc.pid}, started "), line
        assert f"'rlft run toy.py --workdir {workdir}'" in line and "use another --workdir" in line, line
        assert contents(workdir) == before  # run_config.json, command.txt, ...: not touched

    proc.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock with the process
    proc.wait()
    assert main(["run", TOY, "--workdir", workdir]) == 0
    assert open(os.path.join(workdir, "command.txt")).read().count("\n") == 2


def test_the_lock_is_held_for_the_run_and_released_however_it_ends(tmp_path):
    workdir = str(tmp_path / "new" / "run")  # created, parents too
    argv = ["rlft", "run", "a.py"]
    with run_lock.lock_run_dir(workdir, argv) as lock:
        record = open(os.path.join(workdir, run_lock.LOCK_FILE)).read()
        assert f'"pid": {os.getpid()}' in record and '"command": "rlft run a.py"' in record
        with pytest.raises(RlftError, match=f"pid {os.getpid()}, started .*, 'rlft run a.py'"):
            run_lock.acquire(workdir, argv)  # another open file: refused even in the same process
    assert not lock.held and open(os.path.join(workdir, run_lock.LOCK_FILE)).read() == ""
    with pytest.raises(ValueError):
        with run_lock.lock_run_dir(workdir, argv):
            raise ValueError("the run failed")
    run_lock.acquire(workdir, argv).release()  # free again after an exception


def test_a_finished_run_leaves_its_directory_free(tmp_path):
    workdir = str(tmp_path / "run")
    assert main(["run", TOY, "--workdir", workdir]) == 0
    assert os.path.isfile(os.path.join(workdir, run_lock.LOCK_FILE))  # left behind, empty
    assert main(["run", TOY, "--workdir", workdir]) == 0  # a stale file refuses nothing
    assert open(os.path.join(workdir, "command.txt")).read().count("\n") == 2


def test_a_file_system_without_locks_warns_and_runs(tmp_path, monkeypatch, capsys):
    """flock failing with ENOLCK (e.g. Lustre without -o flock): a warning, and the run goes on."""
    import errno

    def flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_lock.fcntl, "flock", flock)
    workdir = str(tmp_path / "run")
    capsys.readouterr()
    assert main(["run", TOY, "--workdir", workdir]) == 0
    assert f"rlft: warning: {workdir}: the file system does not support locks" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(workdir, "result.json"))


def test_only_process_0_of_a_multi_process_run_takes_the_lock(tmp_path, monkeypatch):
    """The other processes share process 0's directory: they neither take nor check the lock."""
    import rlft.parallel.distributed

    workdir = str(tmp_path / "run")
    with run_lock.acquire(workdir, ["rlft", "run", "toy.py"]):  # as if process 0 held it
        monkeypatch.setattr(rlft.parallel.distributed, "is_primary", lambda: False)
        assert main(["run", TOY, "--workdir", workdir]) == 0
    assert os.path.isfile(os.path.join(workdir, "result.json"))  # it ran
    assert not os.path.exists(os.path.join(workdir, "run_config.json"))  # process 0 writes the metadata


def test_every_process_of_a_refused_multi_process_run_stops(holder, tmp_path):
    """Two processes (gloo on localhost): process 0 is refused naming the holder, process 1 is told so
    instead of waiting for it; once the holder is gone, both run."""
    import socket

    workdir = str(tmp_path / "run")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "RLFT_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, RLFT_COORDINATOR=f"localhost:{port}", RLFT_NUM_PROCESSES="2",
               XLA_FLAGS=TEST_XLA_FLAGS)

    def run_both() -> list[subprocess.CompletedProcess]:
        procs = [subprocess.Popen([sys.executable, "-m", "rlft", "run", TOY, "--workdir", workdir], cwd=ROOT,
                                  env={**env, "RLFT_PROCESS_ID": str(i)}, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
        outs = [(p, *p.communicate(timeout=300)) for p in procs]
        if any("could not join" in err for _, _, err in outs):
            pytest.skip("this environment cannot start a JAX coordinator on localhost")
        return [(p.returncode, [line for line in err.splitlines() if line.startswith("rlft:")]) for p, _, err in outs]

    proc = holder(workdir)
    (code_0, lines_0), (code_1, lines_1) = run_both()
    assert code_0 == 2 and len(lines_0) == 1, lines_0
    assert lines_0[0].startswith(f"rlft: error: {workdir} is in use by another rlft run (pid {proc.pid}, "), lines_0
    assert code_1 == 2 and lines_1 == [f"rlft: error: {workdir}: process 0 could not lock the run directory "
                                       f"(its error says why)"], lines_1
    assert not os.path.exists(os.path.join(workdir, "run_config.json"))
    proc.kill()
    proc.wait()
    assert [code for code, _ in run_both()] == [0, 0]
    assert os.path.isfile(os.path.join(workdir, "run_config.json"))
