"""The generic training loop: shard, step, log, checkpoint; nothing lost on interruption.

Data position = number of batches consumed (the index after the last batch taken from the
iterator). It is saved in each checkpoint's `extra`; on resume, build the batch iterator from that
position (e.g. `rlft.data.loader.epoch_batches(..., start_index=extra["data_position"])`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import jax
from jax.sharding import Mesh

from rlft.checkpoints import Checkpointer
from rlft.logging import MetricsLogger
from rlft.sharding import shard_batch

DATA_POSITION = "data_position"


def restore_or_init(checkpointer: Checkpointer, abstract_state: Any,
                    init_fn: Callable[[], Any]) -> tuple[Any, dict]:
    """(state, extra) from the latest checkpoint, or (init_fn(), {data_position: 0}) if there is none."""
    if checkpointer.latest_step() is None:
        return init_fn(), {DATA_POSITION: 0}
    return checkpointer.restore(None, abstract_state)


def _deleted(state: Any) -> bool:
    """True if any array of the state was donated away (a step was interrupted mid-call)."""
    return any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(state))


def train(step_fn: Callable[[Any, Any], tuple[Any, dict]], state: Any,
          batches: Iterable[tuple[int, Any]], mesh: Mesh, checkpointer: Checkpointer | None,
          logger: MetricsLogger | None, total_steps: int,
          extra_fn: Callable[[int, Any], dict] | None = None, prefix: str | None = "train") -> Any:
    """Runs `step_fn(state, sharded_batch)` until `total_steps`; returns the final state.

    batches: (index, host batch) pairs, index counting batches since the start of training.
    Saves when `checkpointer.should_save(step)` and at the end; on KeyboardInterrupt saves the
    last completed step, then re-raises. extra_fn(step, state) adds JSON entries to each save.
    Metric names are logged as "PREFIX/name" ("name" as it is when prefix is None).
    """
    step = int(jax.device_get(state.step))
    last = (state, step, None)  # (state, step, data position) of the last completed step

    def save(force: bool) -> None:
        s, n, position = last
        if checkpointer is None or position is None or not (force or checkpointer.should_save(n)):
            return
        extra = {DATA_POSITION: position, **(extra_fn(n, s) if extra_fn else {})}
        checkpointer.save(n, s, extra, force=force)

    try:
        for index, host_batch in batches:
            if last[1] >= total_steps:
                break
            new_state, metrics = step_fn(last[0], shard_batch(host_batch, mesh))
            last = (new_state, last[1] + 1, index + 1)  # one assignment: safe against interrupts
            if logger is not None:
                logger.log(last[1], {(f"{prefix}/{k}" if prefix else k): v for k, v in metrics.items()})
            save(force=False)
    except KeyboardInterrupt:
        if _deleted(last[0]):
            print("interrupted inside a step: its input state was donated; the newest checkpoint "
                  "is the last periodic one", file=sys.stderr)
        else:
            save(force=True)
            print(f"interrupted: saved step {last[1]}", file=sys.stderr)
        if checkpointer is not None:
            checkpointer.wait()
        raise
    save(force=True)
    if checkpointer is not None:
        checkpointer.wait()
    return last[0]
