"""Faults inside a stage lose nothing: Ctrl-C during a save (the final one included) takes effect once
the checkpoint is committed; any error saves the last completed step before it propagates; reward
functions that raise or return bad scores end as one RlftError naming the function, stage and step
(exit 2 through the command); a full disk or a file-size limit during a checkpoint, metrics.jsonl or
TensorBoard write is an RlftError naming the path, and the previous checkpoints stay intact.

Most cases drive `rlft.train.loop.train` with a counter state (no compilation: milliseconds a step);
the reward-function cases also run the real command on tests/fixtures/fault_experiment.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rlft.train.checkpoints import Checkpointer, CheckpointWriteError, SigintDeferral, checkpoint_steps
from rlft.errors import RlftError
from rlft.train.logging import MetricsLogger
from rlft.rl.rewards import score_completions
from rlft.parallel.sharding import make_mesh
from rlft.train.loop import train
from tests.fixtures import bad_rewards

ROOT = Path(__file__).resolve().parent.parent
FAULT_EXPERIMENT = str(ROOT / "tests" / "fixtures" / "fault_experiment.py")


@flax.struct.dataclass
class Toy:
    params: dict
    step: jax.Array


def _toy(directory: Path, *, total: int = 4, save_every: int = 100, keep: int | None = None,
         on_step=None, on_save=None, batches=None, logger=None) -> Toy:
    """train() of a counter state into directory/checkpoints. on_step(n, state) runs inside step n (it
    may raise or return a replacement input state), on_save(n) when step n's save is prepared."""
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    ckpt = Checkpointer(directory / "checkpoints", save_every=save_every, keep=keep)

    def step_fn(state, batch):
        n = int(state.step) + 1
        if on_step:
            state = on_step(n, state) or state
        return Toy({"w": state.params["w"] + batch["x"].sum()}, state.step + 1), {"loss": jnp.float32(n)}

    batches = batches if batches is not None else ((i, {"x": np.ones((2,), np.float32)}) for i in range(100))
    extra_fn = (lambda n, s: on_save(n) or {}) if on_save else None
    try:
        return train(step_fn, Toy({"w": jnp.zeros(())}, jnp.int32(0)), batches, mesh, ckpt, logger, total,
                     extra_fn=extra_fn, stage="toy")
    finally:
        ckpt.close()


def _restored(directory: Path) -> tuple[int, dict]:
    """(step, extra) of the newest checkpoint, read back as a resume would."""
    with Checkpointer(directory / "checkpoints") as ckpt:
        abstract = Toy({"w": jax.ShapeDtypeStruct((), jnp.float32)}, jax.ShapeDtypeStruct((), jnp.int32))
        state, extra = ckpt.restore(None, abstract)
    return int(state.step), extra


def _leftovers(directory: Path) -> list[str]:
    """Unfinished (temporary) step directories: none may remain after a fault."""
    return sorted(p.name for p in (directory / "checkpoints").glob("*tmp*"))


@pytest.fixture
def sigint_guard():
    """Python's default SIGINT handler for the test (pytest's own must not see a test's Ctrl-C)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)


# ------------------------------------------------------------------------------------------------
# 1. Ctrl-C during a save


def test_sigint_deferral_delivers_once_the_block_ends(sigint_guard):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with SigintDeferral():
            _ctrl_c()
            time.sleep(0.01)
            done.append("after the signal")  # the block went on
    assert done == ["after the signal"]
    with pytest.raises(KeyboardInterrupt):  # nested: the inner one hands it to the outer one
        with SigintDeferral():
            with SigintDeferral():
                _ctrl_c()
            done.append("inner ended")
    assert done[-1] == "inner ended"
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C abandons the block at once
        with SigintDeferral():
            _ctrl_c()
            _ctrl_c()
            done.append("not reached")
    assert done[-1] == "inner ended" and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _interrupt_orbax_save(monkeypatch) -> None:
    """Ctrl-C from inside the blocking part of Orbax's save (serialising the arrays), every save."""
    original = ocp.StandardCheckpointHandler.async_save
    calls = []

    async def interrupted(self, *args, **kw):
        calls.append(1)
        if len(calls) == 1:  # once: a second Ctrl-C would abandon the save
            _ctrl_c()
            time.sleep(0.01)
        return await original(self, *args, **kw)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", interrupted)


@pytest.mark.parametrize("where", ["preparing the final save", "inside orbax's save"])
def test_ctrl_c_during_the_final_save_commits_the_final_step(tmp_path, sigint_guard, monkeypatch, capfd, where):
    if where == "preparing the final save":
        sent = []
        on_save = lambda n: n == 4 and not sent and (sent.append(n) or _ctrl_c())  # extra_fn of the final save
    else:
        on_save = None
        _interrupt_orbax_save(monkeypatch)  # save_every=100: the final save is the only one
    with pytest.raises(KeyboardInterrupt):
        _toy(tmp_path, total=4, on_save=on_save)
    assert checkpoint_steps(tmp_path) == [4] and not _leftovers(tmp_path)
    assert _restored(tmp_path) == (4, {"data_position": 4})  # a resume has nothing left to redo
    err = capfd.readouterr().err  # the note is written to fd 2 from the signal handler
    assert re.search(r"rlft: interrupted: saving (toy|checkpoint) step 4 first \(Ctrl-C again to abandon it\)", err)
    assert "interrupted: saved step 4" in err


# ------------------------------------------------------------------------------------------------
# 2. Any error inside a stage saves the last completed step first


def _raise_at(step: int, error: Exception):
    def on_step(n, state):
        if n == step:
            raise error
    return on_step


def _data_error_at(step: int):
    """Batches whose `step`-th one fails to build (a data error in the loader)."""
    for i in range(100):
        if i + 1 == step:
            raise ValueError("malformed record 17")
        yield i, {"x": np.ones((2,), np.float32)}


def _donated_then_raise(n, state):
    if n == 3:  # as a jitted step that donated its input and then failed
        state.params["w"].delete()
        raise RuntimeError("XLA failed after donation")


def _nan_then_raise(n, state):
    if n == 2:
        return Toy({"w": jnp.float32(jnp.nan)}, state.step)
    if n == 3:
        raise ValueError("boom")


@pytest.mark.parametrize("case, kwargs, saved, said", [
    ("step raises", dict(on_step=_raise_at(3, ValueError("boom"))), [2], "rlft: toy: saved step 2 before the error"),
    ("data error", dict(batches=_data_error_at(3)), [2], "rlft: toy: saved step 2 before the error"),
    ("an RlftError", dict(on_step=_raise_at(3, RlftError("bad"))), [2], "saved step 2 before the error"),
    ("donated state", dict(on_step=_donated_then_raise), [],
     "step 2 not saved before the error (the error struck inside step 3, whose input state was donated)"),
    ("non-finite state", dict(on_step=_nan_then_raise), [],
     "step 2 not saved before the error (its state is not finite)"),
], ids=["step-raises", "data-error", "rlft-error", "donated", "non-finite"])
def test_an_error_inside_a_stage_saves_the_last_completed_step(tmp_path, capsys, case, kwargs, saved, said):
    with pytest.raises(Exception) as raised:
        _toy(tmp_path, total=6, **kwargs)
    assert type(raised.value).__name__ in ("ValueError", "RlftError", "RuntimeError")  # unchanged
    assert checkpoint_steps(tmp_path) == saved and not _leftovers(tmp_path)
    if saved:
        assert _restored(tmp_path) == (2, {"data_position": 2})
    assert said in capsys.readouterr().err


def test_a_failing_save_does_not_mask_the_error(tmp_path, capsys, monkeypatch):
    def full(self, step, *args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / str(step)))

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    boom = ValueError("boom")
    with pytest.raises(ValueError) as raised:
        _toy(tmp_path, total=6, on_step=_raise_at(3, boom))
    assert raised.value is boom
    err = capsys.readouterr().err
    assert re.search(r"rlft: toy: step 2 not saved before the error \(saving it failed too: CheckpointWriteError: "
                     r"cannot write checkpoint step 2 in \S+: OSError: \[Errno 28\] No space left on device", err)
    assert checkpoint_steps(tmp_path) == [] and not _leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------
# 3. Reward functions that raise or return bad scores


@pytest.mark.parametrize("returned, message", [
    (lambda c: np.zeros(len(c) - 1), r"returned shape \(3,\), expected \(4,\): one score per completion"),
    (lambda c: np.zeros((len(c), 1)), r"returned shape \(4, 1\), expected \(4,\)"),
    (lambda c: 0.5, r"returned shape \(\), expected \(4,\)"),
    (lambda c: None, r"returned None, expected 4 numbers: one score per completion"),
    (lambda c: "1 1 1 1", r"returned a str, expected 4 numbers"),
    (lambda c: ["1.0"] * len(c), r"returned a list with str values \(e\.g\. '1\.0'\), expected 4 numbers"),
    (lambda c: [1.0, None, 0.0, 0.0], r"returned a list with NoneType values \(e\.g\. None\)"),
    (lambda c: {"scores": [0] * 4}, r"returned a dict, expected 4 numbers"),
    (lambda c: [[1.0], [], [0.0], [1.0]], r"returned a list that is not an array of numbers"),
    (lambda c: np.array([0, np.nan, 1, np.inf]), r"returned non-finite scores \[nan, inf\] at completions \[1, 3\]"),
    (lambda c: [1e39, 0, 0, 0],
     r"returned non-finite scores \[1e\+39\] at completions \[0\] \(scores must be finite float32"),
    (lambda c: [1j, 0, 0, 0], r"returned a list with complex values"),
    (lambda c: (x for x in range(4)), r"returned a generator, expected 4 numbers"),
], ids=["short", "2-d", "scalar", "None", "str", "strs", "None-in-list", "dict", "ragged", "nan-inf", "overflow",
        "complex", "generator"])
def test_bad_reward_returns_are_one_line_errors(returned, message):
    def my_reward(completions, records):
        return returned(completions)

    with pytest.raises(RlftError) as raised:
        score_completions(my_reward, ["a", "b", "c", "d"], [{}] * 4, where="rl step 3")
    text = str(raised.value)
    assert text.startswith(f"rl step 3: reward function {__name__}:test_bad_reward_returns_are_one_line_errors"
                           f".<locals>.my_reward returned "), text
    assert re.search(message, text) and "\n" not in text, text


def test_a_raising_reward_names_itself_and_keeps_the_traceback(tmp_path, monkeypatch, capsys):
    def broken(completions, records):
        return {}["answer"]

    where_calls = []
    for returned in (np.arange(4), [True, False, True, True], jnp.ones(4, jnp.bfloat16), [0, 1.5, 2, 3],
                     np.array([1, 2.0, 3, 4], dtype=object)):  # any numbers are scores
        scores = score_completions(lambda c, r: returned, ["a"] * 4, [{}] * 4,
                                   where=lambda: where_calls.append(1) or "x")
        assert scores.dtype == np.float32 and scores.shape == (4,)
    assert not where_calls  # `where` is evaluated only for a message
    with pytest.raises(RlftError) as raised:
        score_completions(broken, ["a"], [{}], where="rl step 7", log_dir=tmp_path)
    assert str(raised.value) == (f"rl step 7: reward function {__name__}:test_a_raising_reward_names_itself_and_keeps"
                                 f"_the_traceback.<locals>.broken raised KeyError: 'answer' (traceback in "
                                 f"{tmp_path / 'errors.log'})")
    assert isinstance(raised.value.__cause__, KeyError)
    log = (tmp_path / "errors.log").read_text()
    assert "rl step 7: reward function" in log and 'return {}["answer"]' in log and "KeyError: 'answer'" in log
    assert "Traceback" not in capsys.readouterr().err  # on stderr only with RLFT_DEBUG
    monkeypatch.setenv("RLFT_DEBUG", "1")
    with pytest.raises(RlftError):
        score_completions(broken, ["a"], [{}], where="rl step 7")
    assert 'return {}["answer"]' in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):  # not a fault of the function: passes unchanged
        score_completions(lambda c, r: (_ for _ in ()).throw(KeyboardInterrupt), ["a"], [{}], where="rl step 1")


def _fault_run(workdir: Path, reward: str, capsys) -> tuple[int, str]:
    from rlft.cli.main import main

    bad_rewards.reset()
    status = main(["run", FAULT_EXPERIMENT, "--workdir", str(workdir), f"--config.reward={reward}"])
    return status, capsys.readouterr().err


def _steps_logged(stage_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("function, error", [
    ("raises", "raised ValueError: boom (traceback in {log})"),
    ("strings", "returned a list with str values (e.g. 'good'), expected 8 numbers: one score per completion"),
], ids=["raises", "strings"])
def test_a_faulty_reward_function_through_the_command(tmp_path, capsys, function, error):
    """Step 3's reward fails with save_every=100: exit 2, one line naming function, stage and step,
    step 2 saved; the same command again resumes from step 2 (the function works after call 3)."""
    spec = f"tests.fixtures.bad_rewards:{function}"
    status, err = _fault_run(tmp_path, spec, capsys)
    rl = tmp_path / "rl"
    assert status == 2
    assert err.splitlines()[-1] == (f"rlft: error: rl step 3: reward function {spec} "
                                    + error.format(log=rl / "errors.log")), err[-2000:]
    assert "rlft: rl: saved step 2 before the error" in err and "Traceback" not in err
    assert checkpoint_steps(rl) == [2] and _steps_logged(rl) == [1, 2]
    if function == "raises":
        log = (rl / "errors.log").read_text()
        assert "ValueError: boom" in log and "bad_rewards.py" in log
        bad_rewards.CALLS[function] = 3  # past the faulty call: the same command now finishes
        from rlft.cli.main import main

        assert main(["run", FAULT_EXPERIMENT, "--workdir", str(tmp_path), f"--config.reward={spec}"]) == 0
        assert checkpoint_steps(rl) == [2, 5] and _steps_logged(rl) == [1, 2, 3, 4, 5]
        assert bad_rewards.CALLS[function] == 6  # steps 3-5 only: nothing before step 3 was redone


# ------------------------------------------------------------------------------------------------
# 4. A full disk or a file-size limit mid-stage


def _disk_full_in_commit(monkeypatch, step: int) -> None:
    """Orbax's background commit of `step` fails with ENOSPC (its temporary directory stays behind)."""
    from orbax.checkpoint._src.checkpointers import async_checkpointer as ac

    original = ac._on_commit_callback

    def failing(tmpdir, *args, **kw):
        path = tmpdir.get()
        if path.name.startswith(f"{step}."):
            raise OSError(errno.ENOSPC, "No space left on device", str(path / "params"))
        return original(tmpdir, *args, **kw)

    monkeypatch.setattr(ac, "_on_commit_callback", failing)


def _disk_full_in_save(monkeypatch, step: int) -> None:
    """The blocking part of Orbax's save of `step` fails with ENOSPC after writing part of it."""
    original = ocp.CheckpointManager.save

    def failing(self, n, *args, **kw):
        if n == step:
            partial = Path(self.directory) / f"{n}.orbax-checkpoint-tmp"
            (partial / "params").mkdir(parents=True)
            (partial / "params" / "half_written").write_bytes(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(partial / "params" / "half_written"))
        return original(self, n, *args, **kw)

    monkeypatch.setattr(ocp.CheckpointManager, "save", failing)


@pytest.mark.parametrize("fault", [_disk_full_in_commit, _disk_full_in_save])
def test_a_full_disk_during_a_periodic_save_keeps_the_previous_checkpoints(tmp_path, monkeypatch, capsys, fault):
    fault(monkeypatch, 3)
    with pytest.raises(CheckpointWriteError) as raised:  # an RlftError: `rlft` prints it as one line
        _toy(tmp_path, total=6, save_every=1, keep=2)
    text = str(raised.value)
    assert text.startswith(f"cannot write checkpoint step 3 in {tmp_path / 'checkpoints'}: OSError: [Errno 28] "
                           f"No space left on device: "), text
    assert text.endswith("The newest complete checkpoint, step 2, is intact; free disk space (or keep fewer "
                         "checkpoints: STAGE.keep) and run the same command again") and "\n" not in text
    assert isinstance(raised.value, RlftError) and isinstance(raised.value.__cause__, OSError)
    # keep=2 would have removed step 1 once step 3 was committed: it was not, so 1 stays
    assert checkpoint_steps(tmp_path) == [1, 2] and not _leftovers(tmp_path)
    assert _restored(tmp_path) == (2, {"data_position": 2})
    assert "No space left on device" in (tmp_path / "errors.log").read_text()
    assert "saved step" not in capsys.readouterr().err  # a failed write is not tried again


def test_a_file_size_limit_during_a_save_is_a_clear_error(tmp_path):
    """A real limit (RLIMIT_FSIZE) in a process of its own: TensorStore reports it as a ValueError."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "tests.fixtures.fsize_limit_train", str(tmp_path / "checkpoints")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    seen = (result, sorted(p.name for p in (tmp_path / "checkpoints").iterdir()), out.stderr[-3000:])
    assert result["raised"][:2] == ["CheckpointWriteError", "RlftError"], seen
    assert result["message"].startswith(f"cannot write checkpoint step 3 in {tmp_path / 'checkpoints'}: "), seen
    assert "File too large" in result["message"] and "step 2, is intact" in result["message"], seen
    assert checkpoint_steps(tmp_path) == [1, 2] and not _leftovers(tmp_path), seen


class _FullDisk:
    """A metrics.jsonl file object whose write of line `fail_at` (1-based) fails with ENOSPC."""

    def __init__(self, file, fail_at: int):
        self.file, self.fail_at, self.lines = file, fail_at, 0

    def write(self, text):
        self.lines += 1
        if self.lines == self.fail_at:
            self.file.write(text[:5])  # a torn line, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(text)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_full_disk_writing_metrics_jsonl(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, 6, progress=False)
    logger._file = _FullDisk(logger._file, fail_at=3)
    with pytest.raises(RlftError) as raised, logger:
        _toy(tmp_path, total=6, save_every=2, logger=logger)
    assert str(raised.value) == (f"cannot write {tmp_path / 'metrics.jsonl'}: No space left on device; free disk "
                                 f"space (or raise the file-size limit) and run the same command again: it "
                                 f"resumes from the newest checkpoint")
    # step 3 ran but its line is missing: it is not saved (a resume redoes it and writes the line)
    assert checkpoint_steps(tmp_path) == [2] and _restored(tmp_path) == (2, {"data_position": 2})
    assert "step 3 not saved before the error (its metrics were not written" in capsys.readouterr().err
    with MetricsLogger(tmp_path, 6, start_step=2, progress=False):  # the resume drops the torn line
        pass
    assert _steps_logged(tmp_path) == [1, 2]


def test_a_full_disk_writing_tensorboard_events(tmp_path, monkeypatch):
    from tensorboardX.event_file_writer import EventsWriter

    original = EventsWriter.write_event

    def failing(self, event):
        if event.step >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, event)

    monkeypatch.setattr(EventsWriter, "write_event", failing)

    def slow(n, state):
        time.sleep(0.05)  # the events thread writes meanwhile

    with pytest.raises(RlftError) as raised:
        with MetricsLogger(tmp_path, 6, progress=False) as logger:
            _toy(tmp_path, total=6, save_every=1, logger=logger, on_step=slow)
    assert str(raised.value).startswith(f"cannot write TensorBoard events in {tmp_path / 'tensorboard'}: "
                                        f"No space left on device; free disk space")
    steps = checkpoint_steps(tmp_path)
    assert steps and steps == list(range(1, len(steps) + 1)) and not _leftovers(tmp_path)
    assert _steps_logged(tmp_path)[-1] >= steps[-1]  # every saved step has its metrics line
