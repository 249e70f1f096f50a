"""Metrics logging: metrics.jsonl, TensorBoard event files and a tqdm progress bar.

`metrics.jsonl` holds one JSON object per logged step ({"step": s, "train/loss": ..., ...}); it is
deterministic (no wall-clock values), so a resumed run's lines equal an uninterrupted run's.
Throughput goes to TensorBoard (`perf/tokens_per_second`) and the progress bar only, and so does
every metric whose name ends in "_s" (`WALL_CLOCK_SUFFIX`: seconds or a rate per second, e.g.
rollout/tokens_per_s, async/weight_sync_s).

A file that cannot be written (a full disk, a file-size limit, an I/O error) is an RlftError naming
it and what to do, raised by `log` or `close`: for metrics.jsonl at once; for TensorBoard, whose
events a background thread writes, at the next `log` or at `close` after the failure (the thread
records the error instead of dying, which would leave `add_scalar` blocked on a full queue).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from rlft.errors import RlftError, one_line

METRICS_FILE = "metrics.jsonl"
WALL_CLOCK_SUFFIX = "_s"  # metrics named so are wall-clock values: TensorBoard only
TENSORBOARD_DIR = "tensorboard"


def to_python(value: Any) -> Any:
    """A JSON-ready Python number for a scalar array (int for integer dtypes), else the value."""
    if hasattr(value, "dtype") or isinstance(value, (np.generic, float, int)):
        array = np.asarray(value)
        if array.ndim == 0:
            return array.item()
        return array.tolist()
    return value


def write_error(path: Path, error: OSError, what: str = "") -> RlftError:
    """The RlftError for a metrics file that could not be written."""
    reason = error.strerror or one_line(error)
    return RlftError(f"cannot write {what}{path}: {reason}; free disk space (or raise the file-size limit) "
                     f"and run the same command again: it resumes from the newest checkpoint")


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keeps only lines of `path` with step <= last_step (drops what a resumed run will redo)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a torn last line from a killed process
    tmp = path.with_name(path.name + ".tmp")  # then an atomic rename: a kill here loses no line
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class MetricsLogger:
    """Writes metrics of each step to WORKDIR/metrics.jsonl, WORKDIR/tensorboard and a progress bar.

    `start_step`: the step a run resumes from (0 for a fresh run); logged lines after it are
    dropped and TensorBoard events after it are purged, so a resume never duplicates steps.
    Only process 0 writes anything; other processes' loggers are no-ops.
    """

    def __init__(self, workdir: str | Path, total_steps: int, desc: str = "train", start_step: int = 0,
                 progress: bool = True):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        self.workdir = Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.tensorboard_dir = self.workdir / TENSORBOARD_DIR
        self._tensorboard_error: OSError | None = None
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            _truncate_jsonl(self.path, start_step)
            self._file = self.path.open("a")
        except OSError as e:
            raise write_error(self.path, e) from e
        try:
            self._writer = SummaryWriter(logdir=str(self.tensorboard_dir), purge_step=start_step + 1,
                                         flush_secs=30)
        except OSError as e:
            self._file.close()
            raise write_error(self.tensorboard_dir, e, "TensorBoard events in ") from e
        self._guard_tensorboard()
        self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, disable=not progress,
                         dynamic_ncols=True)
        self._last_step, self._last_time = start_step, time.perf_counter()

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Records `metrics` (names like "train/loss"; arrays become numbers) at `step`; names ending
        in "_s" (wall-clock values) go to TensorBoard only. Returns the metrics.jsonl record."""
        wall_clock = {k: to_python(v) for k, v in metrics.items() if k.endswith(WALL_CLOCK_SUFFIX)}
        record = {"step": int(step), **{k: to_python(v) for k, v in metrics.items() if k not in wall_clock}}
        if not self.active:
            return record
        self.write_scalars(step, wall_clock)
        self._check_tensorboard()
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:  # a torn line is dropped on resume (`_truncate_jsonl`)
            raise write_error(self.path, e) from e
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(name, value, step)
        now = time.perf_counter()
        # throughput counts every token processed (input_tokens), else the loss tokens
        tokens = next((v for k, v in record.items() if k.split("/")[-1] == "input_tokens"),
                      next((v for k, v in record.items() if k.split("/")[-1] == "tokens"), None))
        postfix = {}
        loss = next((v for k, v in record.items() if k.split("/")[-1] == "loss"), None)
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
        if tokens is not None and now > self._last_time and step > self._last_step:
            # tokens of this step times steps since the last log, over the wall time in between
            rate = tokens * (step - self._last_step) / (now - self._last_time)
            self._writer.add_scalar("perf/tokens_per_second", rate, step)
            postfix["tok/s"] = f"{rate:,.0f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(max(step - self._last_step, 0))
        self._last_step, self._last_time = step, now
        return record

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """TensorBoard-only scalars (timings and other non-deterministic values)."""
        if not self.active:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(value), step)

    def _guard_tensorboard(self) -> None:
        """Make the event writer record an OSError (read by `_check_tensorboard`) instead of raising it
        in tensorboardX's background thread, which would die and leave the event queue to fill up."""
        events = getattr(getattr(getattr(self._writer, "file_writer", None), "event_writer", None),
                         "_ev_writer", None)  # tensorboardX 2.x: SummaryWriter -> FileWriter -> EventFileWriter
        if events is None:
            return
        for name in ("write_event", "flush"):
            method = getattr(events, name, None)
            if method is None:
                continue

            def guarded(*args, _method=method, **kw):
                if self._tensorboard_error is not None:
                    return None  # drop events after the first failure
                try:
                    return _method(*args, **kw)
                except OSError as e:
                    self._tensorboard_error = e
                    return None

            setattr(events, name, guarded)

    def _check_tensorboard(self) -> None:
        if self._tensorboard_error is not None:
            raise write_error(self.tensorboard_dir, self._tensorboard_error, "TensorBoard events in ") \
                from self._tensorboard_error

    def close(self, quiet: bool = False) -> None:
        """Flushes and closes the file, the event writer and the bar; `quiet`: ignore write errors
        (another error is already on its way)."""
        if not self.active:
            return
        errors = []
        for part in (self._file, self._writer, self._bar):
            try:
                part.close()
            except OSError as e:
                errors.append((self.path if part is self._file else self.tensorboard_dir, e))
        if quiet:
            return
        if errors:
            path, error = errors[0]
            raise write_error(path, error, "" if path == self.path else "TensorBoard events in ") from error
        self._check_tensorboard()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(quiet=exc_type is not None)
