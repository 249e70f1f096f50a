"""Metrics logging: metrics.jsonl, TensorBoard event files and a tqdm progress bar.

`metrics.jsonl` holds one JSON object per logged step ({"step": s, "train/loss": ..., ...}); it is
deterministic (no wall-clock values), so a resumed run's lines equal an uninterrupted run's.
Throughput goes to TensorBoard (`perf/tokens_per_second`) and the progress bar only.
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

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def to_python(value: Any) -> Any:
    """A JSON-ready Python number for a scalar array (int for integer dtypes), else the value."""
    if hasattr(value, "dtype") or isinstance(value, (np.generic, float, int)):
        array = np.asarray(value)
        if array.ndim == 0:
            return array.item()
        return array.tolist()
    return value


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
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path = self.workdir / METRICS_FILE
        _truncate_jsonl(self.path, start_step)
        self._file = self.path.open("a")
        self._writer = SummaryWriter(logdir=str(self.workdir / TENSORBOARD_DIR), purge_step=start_step + 1,
                                     flush_secs=30)
        self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, disable=not progress,
                         dynamic_ncols=True)
        self._last_step, self._last_time = start_step, time.perf_counter()

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Records `metrics` (names like "train/loss"; arrays become numbers) at `step`."""
        record = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
        if not self.active:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
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

    def close(self) -> None:
        """Flushes and closes the file, the event writer and the bar."""
        if not self.active:
            return
        self._file.close()
        self._writer.close()
        self._bar.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
