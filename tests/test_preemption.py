"""Preemption: SIGTERM saves and exits 143; SIGKILL anywhere (also inside an async save) loses
nothing that a resume cannot redo; the resumed run equals an uninterrupted one bit for bit.

The runs are the real `rlft run` entry point (`rlft.cli.main.main`) on tests/fixtures/preempt_experiment.py
(an SFT stage then an RL stage), each in its own process forked from a forkserver that imported
everything once, with a shared persistent compilation cache: imports and compiles are paid once.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlft.train.checkpoints import Checkpointer, checkpoint_steps, load_params
from rlft.errors import Preempted
from rlft.parallel.sharding import make_mesh
from rlft.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = str(ROOT / "tests" / "fixtures" / "preempt_experiment.py")
SLEEP = 0.1  # host seconds per step in the interrupted runs: room to signal mid-stage
SFT_STEPS, RL_STEPS = 8, 6  # the fixture's preset
TERMINATED = re.compile(r"^rlft: terminated \(SIGTERM\): saved (\w+) step (\d+); "
                        r"run the same command again to resume$", re.M)


# ------------------------------------------------------------------------------------------------
# train() itself, in this process


@flax.struct.dataclass
class Toy:
    params: dict
    step: jax.Array


def _toy_train(tmp_path: Path, on_step=None, on_save=None, total: int = 4) -> bool:
    """train() of a counter state for `total` steps into tmp_path/checkpoints; on_step(n) runs
    inside step n, on_save(n) when step n is saved. True when it returns."""
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=100, keep=None)

    def step_fn(state, batch):
        if on_step:
            on_step(int(state.step) + 1)
        return Toy({"w": state.params["w"] + batch["x"].sum()}, state.step + 1), {"loss": jnp.float32(0)}

    batches = ((i, {"x": np.ones((2,), np.float32)}) for i in range(100))
    extra_fn = (lambda n, s: on_save(n) or {}) if on_save else None
    try:
        train(step_fn, Toy({"w": jnp.zeros(())}, jnp.int32(0)), batches, mesh, ckpt, None, total,
              extra_fn=extra_fn, stage="toy")
    finally:
        ckpt.close()
    return True


@pytest.fixture
def sigterm_guard():
    """A SIGTERM handler of the test's own while it runs: a stray signal fails it, not pytest."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda *a: received.append(a))
    yield received
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_finishes_the_step_saves_it_and_raises_preempted(tmp_path, sigterm_guard):
    ours = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as e:
        _toy_train(tmp_path, on_step=lambda n: n == 2 and os.kill(os.getpid(), signal.SIGTERM))
    assert (e.value.stage, e.value.step, e.value.saved) == ("toy", 2, True)
    assert str(e.value) == "terminated (SIGTERM): saved toy step 2; run the same command again to resume"
    assert checkpoint_steps(tmp_path) == [2]  # step 2 finished, nothing after
    assert signal.getsignal(signal.SIGTERM) is ours and not sigterm_guard  # handler restored


def test_sigterm_during_the_final_save_still_stops(tmp_path, sigterm_guard):
    with pytest.raises(Preempted) as e:  # the stage is complete: the next one must not start
        _toy_train(tmp_path, on_save=lambda n: os.kill(os.getpid(), signal.SIGTERM))
    assert e.value.step == 4 and checkpoint_steps(tmp_path) == [4]


def test_train_outside_the_main_thread_installs_no_handler(tmp_path, sigterm_guard):
    ours, done = signal.getsignal(signal.SIGTERM), []  # signal.signal would raise in a thread
    thread = threading.Thread(target=lambda: done.append(_toy_train(tmp_path)))
    thread.start()
    thread.join()
    assert done and checkpoint_steps(tmp_path) == [4] and signal.getsignal(signal.SIGTERM) is ours


# ------------------------------------------------------------------------------------------------
# The command, in processes of its own


def _command(argv: list[str], log: str, cache: str, env: dict[str, str]) -> None:
    """A child process: stdout and stderr to `log`, compiled executables cached in `cache`."""
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from rlft.cli.main import main

    sys.exit(main(argv))


class Runs:
    """Starts `rlft run EXPERIMENT --workdir DIR` in forked processes (timing knobs: the fixture's)."""

    def __init__(self, tmp: Path):
        self.tmp, self.count = tmp, 0
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["rlft.cli.main", "tests.fixtures.preempt_experiment", __name__])
        cwd = os.getcwd()
        os.chdir(ROOT)  # Python 3.11's forkserver imports the preloads with its cwd on sys.path, not ours
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.chdir(cwd)

    def start(self, workdir: Path, sleep: float = 0.0,
              slow_commit: float = 0.0) -> tuple[multiprocessing.Process, Path]:
        """A started run and its log; `sleep` s per step, `slow_commit` s more per RL save."""
        self.count += 1
        log = self.tmp / f"run{self.count}.log"
        argv = ["run", EXPERIMENT, "--workdir", str(workdir)]
        env = {"PREEMPT_STEP_SLEEP_S": str(sleep), "PREEMPT_SLOW_COMMIT_S": str(slow_commit)}
        process = self.ctx.Process(target=_command, args=(argv, str(log), str(self.tmp / "jax_cache"), env))
        process.start()
        return process, log


def _logged(path: Path) -> list[int]:
    """Steps of the complete lines of a metrics.jsonl being written."""
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            break
    return steps


def _wait_for(condition, process, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.is_alive(), f"the run ended (status {process.exitcode}) before the awaited point"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _in_flight(checkpoints: Path) -> set[tuple[str, int]]:
    """(name, inode) of the unfinished (temporary) step directories of an Orbax manager."""
    found = set()
    for path in checkpoints.glob("*tmp*") if checkpoints.is_dir() else []:
        try:
            found.add((path.name, path.stat().st_ino))
        except FileNotFoundError:  # finished (renamed) in the meantime
            pass
    return found


def _kill_after(process, metrics: Path, step: int, delay: float) -> None:
    """SIGKILL `delay` s after the run logged a step >= `step` (beyond what the file held before)."""
    floor = max(_logged(metrics), default=0)
    _wait_for(lambda: max(_logged(metrics), default=0) >= max(step, floor + 1), process)
    time.sleep(delay)
    process.kill()
    process.join()
    assert process.exitcode == -signal.SIGKILL


def test_sigterm_and_kills_resume_bitwise(tmp_path):
    """SIGTERM in SFT (143), SIGKILL at a random SFT point, inside an RL async save and at a random
    RL point, then a resume to the end: params and metrics equal an uninterrupted run's."""
    runs = Runs(tmp_path)
    rng = np.random.default_rng(20240611)
    straight, work = tmp_path / "straight", tmp_path / "preempted"
    sft, rl = work / "sft", work / "rl"

    reference, _ = runs.start(straight)  # also fills the compilation cache
    reference.join()
    assert reference.exitcode == 0

    # SIGTERM once step 2 is logged: the step in progress finishes, is saved, status 143
    process, log = runs.start(work, sleep=SLEEP)
    _wait_for(lambda: len(_logged(sft / "metrics.jsonl")) >= 2, process)
    process.terminate()
    process.join()
    assert process.exitcode == 143, log.read_text()[-3000:]
    (stage, step), = [(s, int(n)) for s, n in TERMINATED.findall(log.read_text())]
    assert stage == "sft" and 2 <= step < SFT_STEPS
    assert checkpoint_steps(sft)[-1] == step and not _in_flight(sft / "checkpoints")
    assert _logged(sft / "metrics.jsonl") == list(range(1, step + 1))

    # SIGKILL at a random point of SFT
    process, _ = runs.start(work, sleep=SLEEP)
    _kill_after(process, sft / "metrics.jsonl", step + int(rng.integers(1, 4)), rng.uniform(0, SLEEP))

    # SIGKILL while an RL checkpoint is being written (each commit held back 2 s)
    stale = _in_flight(rl / "checkpoints")
    process, _ = runs.start(work, sleep=SLEEP, slow_commit=2.0)
    _wait_for(lambda: _in_flight(rl / "checkpoints") - stale, process)
    process.kill()
    process.join()
    assert process.exitcode == -signal.SIGKILL and _in_flight(rl / "checkpoints") - stale  # left unfinished

    # SIGKILL at a random point of RL
    process, _ = runs.start(work, sleep=SLEEP)
    _kill_after(process, rl / "metrics.jsonl", int(rng.integers(2, RL_STEPS)), rng.uniform(0, SLEEP))

    process, log = runs.start(work)
    process.join()
    assert process.exitcode == 0, log.read_text()[-3000:]
    for name, steps in (("sft", SFT_STEPS), ("rl", RL_STEPS)):
        want, got = load_params(straight / name), load_params(work / name)
        assert got[1]["data_position"] == want[1]["data_position"]
        for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(want[0]), strict=True):
            np.testing.assert_array_equal(a, b)
        text = (work / name / "metrics.jsonl").read_text()
        assert text == (straight / name / "metrics.jsonl").read_text()
        assert _logged(work / name / "metrics.jsonl") == list(range(1, steps + 1))
        assert checkpoint_steps(work / name)[-1] == steps
