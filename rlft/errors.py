"""The exceptions the `rlft` command turns into one line and an exit status instead of a traceback.

RlftError: a user mistake (bad flag, missing file, malformed data); status 2.
Preempted: SIGTERM stopped training after a completed step, which was saved; status 143.
"""


class RlftError(Exception):
    """A user-facing error whose message names the bad field, flag or file."""


class Preempted(Exception):
    """SIGTERM stopped a stage after its completed step `step`, saved when `saved` (see train_loop.train).

    Not an RlftError: nothing is wrong, and running the same command again resumes from `step`.
    """

    def __init__(self, stage: str, step: int, saved: bool = True):
        self.stage, self.step, self.saved = stage, step, saved
        done = f"saved {stage} step {step}" if saved else f"stopped {stage} at step {step} (no checkpointer)"
        super().__init__(f"terminated (SIGTERM): {done}; run the same command again to resume")

    def __reduce__(self):  # picklable despite the custom signature
        return type(self), (self.stage, self.step, self.saved)
