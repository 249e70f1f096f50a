"""The exceptions the `rlft` command turns into one line and an exit status instead of a traceback.

RlftError: a user mistake (bad flag, missing file, malformed data), or a fault inside a stage that
    the user can act on (a reward function that raised, a full disk); status 2.
Preempted: SIGTERM stopped training after a completed step, which was saved; status 143.

When a stage turns a foreign exception into an RlftError (a reward function's, a checkpoint
write's), the one-line message is what the command prints; the original traceback is appended to
STAGE_DIR/errors.log (`log_traceback`) and, with RLFT_DEBUG set (to anything but "" or "0"), also
printed to stderr above that line. The RlftError is raised `from` the original, so a caller in
Python has it as `__cause__`.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

ERRORS_LOG = "errors.log"


class RlftError(Exception):
    """A user-facing error whose message names the bad field, flag or file."""


class Preempted(Exception):
    """SIGTERM stopped a stage after its completed step `step`, saved when `saved` (see rlft.train.loop.train).

    Not an RlftError: nothing is wrong, and running the same command again resumes from `step`.
    """

    def __init__(self, stage: str, step: int, saved: bool = True):
        self.stage, self.step, self.saved = stage, step, saved
        done = f"saved {stage} step {step}" if saved else f"stopped {stage} at step {step} (no checkpointer)"
        super().__init__(f"terminated (SIGTERM): {done}; run the same command again to resume")

    def __reduce__(self):  # picklable despite the custom signature
        return type(self), (self.stage, self.step, self.saved)


def one_line(error: BaseException, limit: int = 400) -> str:
    """`Type: message` of an exception on one line (whitespace collapsed); a message longer than
    `limit` characters keeps its start and its end (where e.g. TensorStore puts the OS error)."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = f"{text[:limit // 2]} ... {text[-(limit // 2):]}"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def debug_enabled() -> bool:
    """True when RLFT_DEBUG asks for tracebacks on stderr."""
    return os.environ.get("RLFT_DEBUG", "") not in ("", "0")


def log_traceback(error: BaseException, directory: str | Path | None, what: str) -> Path | None:
    """Append `error`'s traceback (with its causes) to DIRECTORY/errors.log, headed by the time and
    `what`; print it to stderr too when RLFT_DEBUG is set. Returns the log file, or None when it could
    not be written (no directory, a full disk: never raises) or this is not process 0."""
    text = "".join(traceback.format_exception(error))
    if debug_enabled():
        print(text, end="", file=sys.stderr)
    if directory is None:
        return None
    try:
        import jax

        if jax.process_index() != 0:
            return None
        path = Path(directory) / ERRORS_LOG
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {what}\n{text}\n")
        return path
    except Exception:  # a best-effort record: the error being reported matters more
        return None
