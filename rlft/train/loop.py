"""The generic training loop: shard, step, log, checkpoint; nothing lost on interruption or error.

Ctrl-C (KeyboardInterrupt) saves the last completed step, unless it struck inside a step whose
input state was donated (then the newest periodic checkpoint stands); a Ctrl-C during a checkpoint
save or its commit, the final one included, is held back until the checkpoint is on disk
(`rlft.train.checkpoints.SigintDeferral`), so the newest finished step is always committed. SIGTERM,
what clusters send before they kill, finishes the current step, saves it and raises
`rlft.errors.Preempted`. Any other exception inside a stage (a reward function's, a data error, a
bug) first saves the last completed step when it can (its state finite, not donated, its metrics
written), says so on stderr, then propagates unchanged; if that save fails too, the original error
still propagates. A step counts as completed once its metrics are logged: saving a step whose line
is missing from metrics.jsonl would leave a gap there that no resume fills.

Data position = number of batches consumed (the index after the last batch taken from the
iterator). It is saved in each checkpoint's `extra`; on resume, build the batch iterator from that
position (e.g. `rlft.data.loader.epoch_batches(..., start_index=extra["data_position"])`).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any, Self

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rlft.train.checkpoints import Checkpointer, CheckpointWriteError, SigintDeferral
from rlft.errors import Preempted, RlftError, one_line
from rlft.train.logging import MetricsLogger
from rlft.parallel.sharding import shard_batch

DATA_POSITION = "data_position"


def restore_or_init(checkpointer: Checkpointer, abstract_state: Any,
                    init_fn: Callable[[], Any]) -> tuple[Any, dict]:
    """(state, extra) from the latest checkpoint, or (init_fn(), {data_position: 0}) if there is none."""
    if checkpointer.latest_step() is None:
        return init_fn(), {DATA_POSITION: 0}
    return checkpointer.restore(None, abstract_state)


class NonFiniteGuard:
    """Stops a run after `limit` consecutive steps whose update was skipped for NaN / inf.

    Steps report `nonfinite` > 0 when `rlft.train.steps.apply_update` refused a non-finite loss or
    gradient (the parameters stayed finite). A few isolated ones are tolerated and visible in the
    metrics; `limit` in a row means the run is broken (learning rate, data), and continuing would
    only burn compute.
    """

    def __init__(self, stage: str, limit: int):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise RlftError(f"{stage}.max_nonfinite_steps={limit!r}: must be an integer >= 1")
        self.stage, self.limit, self.in_a_row, self.last_loss = stage, limit, 0, None

    def __call__(self, step: int, metrics: dict) -> None:
        if float(metrics.get("nonfinite", 0.0)) <= 0:
            self.in_a_row = 0
            self.last_loss = next((float(v) for k, v in metrics.items() if k in ("loss", "loss/total")), None)
            return
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise RlftError(
                f"{self.stage}: {self.in_a_row} steps in a row, up to step {step}, had a non-finite loss or "
                f"gradient (their updates were skipped; parameters and checkpoints stay finite); last "
                f"finite loss: {self.last_loss}. Lower the learning rate or check the data, then run again.")


class SigtermWatch:
    """While active (a context manager), SIGTERM only records a request to stop; `requested()` reads it.

    A handler that raised at once could interrupt Orbax or JAX anywhere, so this one sets a flag that
    `train` reads between steps. Python installs signal handlers from the main thread only: in any
    other thread nothing is installed and SIGTERM keeps its previous meaning. The previous handler
    is restored on exit. With several JAX processes the flag is OR-ed over all of them, so every
    process stops (and takes part in the collective save) at the same step.
    """

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False

    def requested(self) -> bool:
        """True once SIGTERM arrived (in any process); collective when there are several processes."""
        if jax.process_count() == 1:
            return self.received
        return bool(np.any(multihost_utils.process_allgather(np.int32(self.received))))


def _deleted(state: Any) -> bool:
    """True if any array of the state was donated away (a step was interrupted mid-call)."""
    return any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(state))


def _finite(state: Any) -> bool:
    """True if every floating-point array of the state is finite (its local shards, per process)."""
    leaves = [x for x in jax.tree.leaves(state)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return True
    if all(getattr(x, "is_fully_addressable", True) for x in leaves):
        try:  # one program for the whole state
            return bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in xs])))(leaves))
        except Exception:  # e.g. arrays on different device sets: check them one by one below
            pass
    for x in leaves:  # no collective: each process checks its own shards
        shards = [s.data for s in x.addressable_shards] if isinstance(x, jax.Array) else [x]
        if not all(bool(jnp.isfinite(shard).all()) for shard in shards):
            return False
    return True


def train(step_fn: Callable[[Any, Any], tuple[Any, dict]], state: Any,
          batches: Iterable[tuple[int, Any]], mesh: Mesh, checkpointer: Checkpointer | None,
          logger: MetricsLogger | None, total_steps: int,
          extra_fn: Callable[[int, Any], dict] | None = None, prefix: str | None = "train",
          stage: str = "train", max_nonfinite: int = 3) -> Any:
    """Runs `step_fn(state, sharded_batch)` until `total_steps`; returns the final state.

    batches: (index, host batch) pairs, index counting batches since the start of training.
    Saves when `checkpointer.should_save(step)` and at the end, waiting for the save to commit; on
    KeyboardInterrupt saves the last completed step, then re-raises (a Ctrl-C during a save, the
    final one included, takes effect once it is committed). On SIGTERM (`SigtermWatch`, installed
    only while this runs) finishes the step in progress, saves it, waits for the save and raises
    `Preempted(stage, step)`, also when the signal came during the final save of a finished
    stage. On any other exception saves the last completed step if it can, says what it did on
    stderr ("STAGE: saved step N before the error") and re-raises the exception unchanged; a failed
    checkpoint write (`CheckpointWriteError`) is not retried. extra_fn(step, state) adds JSON
    entries to each save. Metric names are logged as "PREFIX/name" ("name" as it is when prefix is
    None). After `max_nonfinite` consecutive steps with a skipped non-finite update, raises an
    RlftError naming `stage` (`NonFiniteGuard`).
    """
    guard = NonFiniteGuard(stage, max_nonfinite)
    step = int(jax.device_get(state.step))
    last = (state, step, None)  # (state, step, data position) of the last completed step
    logged = step  # the newest step whose metrics were written

    def save(force: bool) -> bool:
        s, n, position = last
        if checkpointer is None or position is None or not (force or checkpointer.should_save(n)):
            return False
        extra = {DATA_POSITION: position, **(extra_fn(n, s) if extra_fn else {})}
        return checkpointer.save(n, s, extra, force=force)

    def save_and_wait() -> bool:
        """Force-saves the last completed step and waits for the commit; Ctrl-C waits for both."""
        with SigintDeferral(f"saving {stage} step {last[1]}"):
            saved = save(force=True)
            if checkpointer is not None:
                checkpointer.wait()
        return saved

    def save_before(error: Exception) -> None:
        """After `error`: save the last completed step if that is possible and safe, and say so."""
        s, n, position = last
        if checkpointer is None or position is None:  # no step done here: the newest checkpoint stands
            return
        if isinstance(error, CheckpointWriteError):
            return  # its message names the newest intact step; writing again would fail the same way
        reason = None
        if logger is not None and logged != n:
            reason = f"its metrics were not written to {logger.workdir if logger.active else 'the log'}"
        elif _deleted(s):
            reason = f"the error struck inside step {n + 1}, whose input state was donated"
        elif not _finite(s):
            reason = "its state is not finite"
        if reason is None:
            try:
                saved = save_and_wait()
            except Exception as save_error:  # e.g. the disk is full: the original error matters more
                reason = f"saving it failed too: {one_line(save_error)}"
            else:
                done = f"saved step {n}" if saved else f"step {n} was saved already"
                print(f"rlft: {stage}: {done} before the error", file=sys.stderr)
                return
        try:
            checkpointer.wait()  # a periodic save in flight: committed (or failed) before naming the newest
        except Exception:
            pass
        newest = checkpointer.latest_step()
        print(f"rlft: {stage}: step {n} not saved before the error ({reason}); the newest checkpoint is "
              f"{'none' if newest is None else f'step {newest}'}", file=sys.stderr)

    with SigtermWatch() as sigterm:
        try:
            for index, host_batch in batches:
                if last[1] >= total_steps:
                    break
                new_state, metrics = step_fn(last[0], shard_batch(host_batch, mesh))
                last = (new_state, last[1] + 1, index + 1)  # one assignment: safe against interrupts
                if logger is not None:
                    with SigintDeferral():  # a Ctrl-C takes effect after the metrics line is whole
                        logger.log(last[1], {(f"{prefix}/{k}" if prefix else k): v for k, v in metrics.items()})
                logged = last[1]
                save(force=False)
                guard(last[1], metrics)
                if sigterm.requested():
                    raise Preempted(stage, last[1], saved=checkpointer is not None)
            save_and_wait()  # a Ctrl-C during it is raised here once the step is committed
            if sigterm.requested():  # arrived after the last step: the stage is complete and saved
                raise Preempted(stage, last[1], saved=checkpointer is not None)
        except Preempted:
            save_and_wait()
            raise
        except KeyboardInterrupt:
            donated = _deleted(last[0])
            try:
                if donated:
                    if checkpointer is not None:
                        checkpointer.wait()
                else:
                    save_and_wait()
            except KeyboardInterrupt:  # another Ctrl-C during this save: stopping anyway
                pass
            if last[2] is None:
                print(f"interrupted before step {last[1] + 1} finished: nothing new to save", file=sys.stderr)
            elif donated:
                print("interrupted inside a step: its input state was donated; the newest checkpoint "
                      "is the last periodic one", file=sys.stderr)
            elif checkpointer is None or last[1] in checkpointer.all_steps():
                print(f"interrupted: saved step {last[1]}", file=sys.stderr)
            else:
                print(f"interrupted: the save of step {last[1]} was abandoned; the newest checkpoint is "
                      f"{checkpointer.latest_step()}", file=sys.stderr)
            raise
        except Exception as error:
            save_before(error)
            raise
    return last[0]
