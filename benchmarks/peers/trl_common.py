"""Helpers shared by the trl peer scripts: step timing, method timing, the tiny model, the RESULT line.

Runs inside a peer's virtual environment (torch + trl), never in rlft's own process.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict

import torch
from transformers import GPT2Config, TrainerCallback

import workload



class StepTimer(TrainerCallback):
    """Wall-clock end of every optimizer step (the first is timed from `on_train_begin`), and the logs."""

    def __init__(self):
        self.begin: float | None = None
        self.ends: list[float] = []
        self.logs: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.logs.append(dict(logs))

    def logged(self, key: str) -> list:
        """Every logged value of ``key``, in order."""
        return [entry[key] for entry in self.logs if key in entry]

    def step_times(self) -> list[float]:
        """Seconds of each optimizer step, in order."""
        marks = [self.begin, *self.ends]
        return [b - a for a, b in zip(marks, marks[1:])]

    def step_starts(self) -> list[float]:
        """perf_counter() at the start of each finished step (the previous step's end)."""
        return [self.begin, *self.ends][:len(self.ends)]

    def step_index(self) -> int:
        """Index of the step now running (0 for the first)."""
        return len(self.ends)


class MethodTimer:
    """Wraps callables so that their wall time is added up per optimizer step.

    ``timer.wrap(obj, "name")`` replaces ``obj.name`` (a bound method, or a function looked up as a
    module global) with a wrapper; ``totals[label][step]`` is the time spent in it during that step
    and ``first_start[label][step]`` when it was first entered. ``when`` (a no-argument predicate)
    limits which calls count; ``active(label)`` is true while ``label`` runs, which lets a predicate
    pick out nested calls (e.g. log-prob forwards made inside scoring).
    """

    def __init__(self, steps: StepTimer):
        self.steps = steps
        self.totals: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        self.first_start: dict[str, dict[int, float]] = defaultdict(dict)
        self._depth: dict[str, int] = defaultdict(int)

    def active(self, label: str) -> bool:
        return self._depth[label] > 0

    def wrap(self, owner, name: str, label: str | None = None, when=None):
        """Time ``owner.name`` under ``label`` (default ``name``), counting only calls for which ``when()`` holds."""
        label = label or name
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            if when is not None and not when():
                return inner(*args, **kwargs)
            self._depth[label] += 1
            step = self.steps.step_index()
            start = time.perf_counter()
            self.first_start[label].setdefault(step, start)
            try:
                return inner(*args, **kwargs)
            finally:
                self.totals[label][step] += time.perf_counter() - start
                self._depth[label] -= 1

        setattr(owner, name, timed)

    def per_step(self, label: str, n_steps: int) -> list[float]:
        """Seconds spent in ``label`` in each of the first ``n_steps`` steps (0.0 where never called)."""
        return [self.totals[label].get(i, 0.0) for i in range(n_steps)]


def tiny_config(tok, **extra) -> GPT2Config:
    """The tiny GPT-2 config with the workload tokenizer's special ids."""
    return GPT2Config(**workload.TINY_GPT2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **extra)


def set_generation_ids(model, tok) -> None:
    """Pad and eos ids for `generate` (a random model may emit eos; padding is on the left)."""
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id


def environment_info(threads: int) -> dict:
    """Versions, thread count and the allocator settings this process started with."""
    import datasets
    import transformers
    import trl

    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "datasets": datasets.__version__, "threads": threads, "malloc": malloc or "default",
            "load_avg_1m": round(os.getloadavg()[0], 2)}
