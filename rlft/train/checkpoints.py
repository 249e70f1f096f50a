"""Orbax checkpoints of any train-state dataclass: periodic async saves, resume, restore onto any
mesh, notebook loads.

A state is a flax struct dataclass with a `params` field (the model that `rlft.load` reads:
TrainState, or the RL stage's PGState with its critic, KL coefficient and baseline); every other
field is saved too, so a restore is exact. Layout of a run directory:

    WORKDIR/model_config.json            ModelConfig.to_dict() (`save_model_config`)
    WORKDIR/checkpoints/<step>/params    state.params as a nested dict (nnx.to_pure_dict layout)
    WORKDIR/checkpoints/<step>/train     every other field of the state (step, opt_state, rng, ...)
    WORKDIR/checkpoints/<step>/extra     JSON of the host loop: the data position only
    WORKDIR/checkpoints/<step>/rlft_checksums.json   size and CRC-32 of every file, once committed

Damaged checkpoints (a truncated, garbled or missing file) are found by `step_problem` (Orbax's
commit record and item metadata parse; every file matches the size and CRC-32 recorded when the
save finished) and by the read itself. Resume (`Checkpointer.restore(None, ...)`) and
`load_params(path)` fall back to the newest intact step with a warning naming what was skipped;
resume moves the damaged step directories aside to `<step>.damaged-<time>`, so nothing is lost
and the step can be saved again. A damaged step named explicitly raises `DamagedCheckpoint`.

A save that fails (a full disk, a file-size limit, an I/O error; in the blocking part or in Orbax's
background commit) raises `CheckpointWriteError`, an RlftError naming the step, the directory and
what to do: Orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it when complete, and
removes old steps (`keep`) only after that, so the previous checkpoints stay as they were; the
failed step's temporary directory is removed (it is never taken for a step, and it holds space).
Ctrl-C (SIGINT) cannot cut a save or commit short: `Checkpointer.save`, `wait` and `close` run under
`SigintDeferral`, which re-raises KeyboardInterrupt once the checkpoint is on disk.

Trees are stored as nested dicts with string keys built from their key paths (an nnx.Variable
contributes its value, not a "value" level), so any optimizer state round-trips; restore puts the
values back into the structure of the abstract target. Parameters live in their own item so a
notebook can read them without the optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from rlft.config import changed_fields, format_changes
from rlft.parallel.distributed import barrier, is_primary
from rlft.errors import RlftError, log_traceback, one_line
from rlft.files import write_text
from rlft.models.config import ModelConfig

PARAMS, TRAIN, EXTRA = "params", "train", "extra"
MODEL_CONFIG_FILE = "model_config.json"
CHECKPOINTS_DIR = "checkpoints"
CHECKSUMS_FILE = "rlft_checksums.json"
COMMIT_RECORD = "_CHECKPOINT_METADATA"  # Orbax's per-step commit record (JSON)
# The JSON metadata file of each item, read before any array: a damaged one is the common failure.
_ITEM_METADATA = {PARAMS: "_METADATA", TRAIN: "_METADATA", EXTRA: "metadata"}


def _key_name(key: Any) -> str:
    """The string form of one pytree path entry (dict key, attribute, index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat_leaves(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    """(path of strings, leaf) pairs in pytree order; a Variable counts as one leaf (its value)."""
    pairs = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    out = []
    for path, leaf in pairs:
        if isinstance(leaf, nnx.Variable):
            leaf = leaf.get_value()
        out.append((tuple(_key_name(k) for k in path), leaf))
    return out


def to_nested(tree: Any) -> dict:
    """A nested dict of the tree's leaves keyed by their path names (what Orbax stores)."""
    nested: dict = {}
    for path, leaf in _flat_leaves(tree):
        node = nested
        for name in path[:-1]:
            node = node.setdefault(name, {})
        if path[-1] in node:
            raise RlftError(f"checkpoint: two leaves share the path {'/'.join(path)}")
        node[path[-1]] = leaf
    return nested


def from_nested(nested: dict, like: Any) -> Any:
    """The inverse of `to_nested`: values of `nested` in the structure of `like`."""
    leaves = []
    for path, _ in _flat_leaves(like):
        node = nested
        for name in path:
            node = node[name]
        leaves.append(node)
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _train_part(state: Any) -> dict:
    """Every field of a state dataclass but `params`, as a plain dict (None fields dropped)."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
            if f.name != PARAMS and getattr(state, f.name) is not None}


# ---------------------------------------------------------------------------------------------
# Ctrl-C inside a save


class SigintDeferral:
    """While active (a context manager), Ctrl-C (SIGINT) is held back until the block ends.

    For critical sections such as a checkpoint save and its commit: a KeyboardInterrupt raised in
    the middle would leave the step uncommitted (and lost when the process then exits). The first
    SIGINT is recorded (with a note on stderr when `note` is given) and delivered to the previous
    handler when the block ends without an exception, so Python's default raises KeyboardInterrupt
    there and an enclosing SigintDeferral records it in turn; a second SIGINT inside the block raises
    KeyboardInterrupt at once (abandoning the save). Python installs signal handlers from the main
    thread only: elsewhere, or when the current handler was not set from Python, this does nothing.
    """

    def __init__(self, note: str | None = None):
        self.note, self.pending = note, 0
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.pending += 1
        if self.pending > 1:
            raise KeyboardInterrupt
        if self.note:  # os.write: print() from a handler can re-enter a buffered write to stderr
            os.write(2, f"rlft: interrupted: {self.note} first (Ctrl-C again to abandon it)\n".encode())

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is not None:
                self._previous = signal.signal(signal.SIGINT, self._handle)
                self._installed = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._installed:
            return
        signal.signal(signal.SIGINT, self._previous)
        self._installed = False
        if self.pending and exc_type is None:  # with an exception on its way, that one goes on
            if callable(self._previous):
                self._previous(signal.SIGINT, None)  # Python's default raises KeyboardInterrupt
            elif self._previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)


# ---------------------------------------------------------------------------------------------
# Integrity of a step directory


class DamagedCheckpoint(RlftError):
    """A checkpoint step directory whose files are not as they were written (see `step_problem`)."""

    def __init__(self, step_dir: Path, problem: str):
        self.step_dir, self.problem = Path(step_dir), problem
        super().__init__(f"checkpoint {step_dir} is damaged: {problem}")


class CheckpointWriteError(RlftError):
    """Writing checkpoint `step` into `directory` failed (see `Checkpointer`); `newest` is the newest
    complete step left (None: none), `log` the file holding the original traceback (or None)."""

    def __init__(self, directory: Path, step: int | None, error: BaseException, newest: int | None,
                 log: Path | None = None):
        self.directory, self.step, self.newest, self.log = Path(directory), step, newest, log
        what = "a checkpoint" if step is None else f"checkpoint step {step}"
        kept = (f"The newest complete checkpoint, step {newest}, is intact" if newest is not None
                else "There is no complete checkpoint yet")
        traced = f" (traceback in {log})" if log else ""
        super().__init__(f"cannot write {what} in {directory}: {one_line(error)}{traced}. {kept}; free disk "
                         f"space (or keep fewer checkpoints: STAGE.keep) and run the same command again")


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def seal_step(step_dir: str | Path) -> Path:
    """Writes <step>/rlft_checksums.json: the size and CRC-32 of every file of a committed step.

    Orbax and TensorStore do not notice every damaged byte (a garbled compressed chunk can restore
    as different values), so the files are checked against this record before a restore.
    """
    step_dir = Path(step_dir)
    files = {p.relative_to(step_dir).as_posix(): [p.stat().st_size, _crc32(p)]
             for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name not in (CHECKSUMS_FILE, COMMIT_RECORD)}
    tmp = step_dir / f"{CHECKSUMS_FILE}.tmp"
    tmp.write_text(json.dumps({"crc32": files}, indent=0, sort_keys=True) + "\n")
    os.replace(tmp, step_dir / CHECKSUMS_FILE)
    return step_dir / CHECKSUMS_FILE


def _json_problem(path: Path, name: str) -> str | None:
    """Why `path` (called `name` in the message) is not a readable JSON object, or None."""
    if not path.is_file():
        return f"{name} is missing"
    try:
        if not isinstance(json.loads(path.read_bytes()), dict):
            return f"{name} is not a JSON object"
    except (ValueError, OSError) as e:
        return f"{name} is not valid JSON ({e})"
    return None


def step_problem(step_dir: str | Path, items: tuple[str, ...] = (PARAMS, TRAIN, EXTRA)) -> str | None:
    """What is wrong with the checkpoint in `step_dir` (limited to `items`), or None if nothing is found.

    Checks Orbax's commit record and each item's metadata (present, valid JSON), and each file of
    the items against `rlft_checksums.json` (size, CRC-32) when the step was sealed. A step saved
    by a process that died before sealing it is checked by the read alone.
    """
    step_dir = Path(step_dir)
    problems = [_json_problem(step_dir / COMMIT_RECORD, COMMIT_RECORD)]
    for item in items:
        if not (step_dir / item).is_dir():
            return f"item {item!r} is missing"
        problems.append(_json_problem(step_dir / item / _ITEM_METADATA[item], f"{item}/{_ITEM_METADATA[item]}"))
    if (step_dir / CHECKSUMS_FILE).exists():
        if problem := _json_problem(step_dir / CHECKSUMS_FILE, CHECKSUMS_FILE):
            return problem
        recorded = json.loads((step_dir / CHECKSUMS_FILE).read_bytes()).get("crc32")
        if not isinstance(recorded, dict) or not all(isinstance(v, list) and len(v) == 2 for v in recorded.values()):
            return f"{CHECKSUMS_FILE} is malformed"
        for rel, (size, crc) in sorted(recorded.items()):
            if "/" in rel and rel.split("/")[0] not in items:  # another item's file
                continue
            path = step_dir / rel
            if not path.is_file():
                problems.append(f"{rel} is missing")
            elif path.stat().st_size != size:
                problems.append(f"{rel} has {path.stat().st_size} bytes, {size} when written")
            elif _crc32(path) != crc:
                problems.append(f"{rel} differs from what was written (CRC-32)")
    return next((p for p in problems if p), None)


def _reason(error: BaseException) -> str:
    """One short line for an exception raised while reading a checkpoint."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _read_checked(step_dir: Path, items: tuple[str, ...], read: Callable[[], Any]) -> Any:
    """read() after `step_problem`; a read error of an unsealed step is a DamagedCheckpoint.

    A sealed step whose files are intact but fails to read is not damage (e.g. a target of another
    shape), so that error propagates unchanged.
    """
    if problem := step_problem(step_dir, items):
        raise DamagedCheckpoint(step_dir, problem)
    try:
        return read()
    except MemoryError:
        raise
    except Exception as e:
        if (step_dir / CHECKSUMS_FILE).is_file():
            raise
        raise DamagedCheckpoint(step_dir, _reason(e)) from e


def _newest_intact(steps: list[int], read_step: Callable[[int], Any]) -> tuple[int, Any, list[DamagedCheckpoint]]:
    """(step, read_step(step), damaged newer steps) for the newest step that reads; warns for each skipped."""
    damaged = []
    for step in reversed(steps):
        try:
            return step, read_step(step), damaged
        except DamagedCheckpoint as e:
            print(f"rlft: warning: skipping checkpoint step {step}: {e}", file=sys.stderr)
            damaged.append(e)
    raise RlftError("no intact checkpoint: " + "; ".join(str(e) for e in damaged)
                    + ". Move the damaged step directories away to start the stage afresh")


def _remove_tree(path: Path, attempts: int = 20) -> bool:
    """Removes a directory that writes of a failed save may still be adding to (Orbax reports the
    first failed write while the others finish); True once it is gone. Never raises."""
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return True
        time.sleep(0.1)
    print(f"rlft: warning: could not remove {path} (a failed save's partial files; it is never taken "
          f"for a checkpoint)", file=sys.stderr)
    return False


class Checkpointer:
    """Saves a state dataclass every `save_every` steps into `directory`/<step>, keeping the last `keep`."""

    def __init__(self, directory: str | Path, save_every: int = 1000, keep: int | None = 3,
                 async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.save_every = int(save_every)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        handlers = {PARAMS: ocp.StandardCheckpointHandler(), TRAIN: ocp.StandardCheckpointHandler(),
                    EXTRA: ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._async, self._unsealed = async_save, []  # steps saved but not yet sealed (`seal_step`)

    def all_steps(self) -> list[int]:
        """Steps with a finished checkpoint, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """True on multiples of save_every that are not saved yet."""
        return step % self.save_every == 0 and step not in self._manager.all_steps()

    def save(self, step: int, train_state: Any, extra: dict | None = None, force: bool = False) -> bool:
        """Starts saving (async) state and JSON `extra` at `step`; force ignores save_every.

        Returns whether a save started (False: not a save step, or saved already). Waits for the
        previous save first; a failure of that one, or of this one's blocking part, raises
        CheckpointWriteError. Ctrl-C is held back until the save has started (`SigintDeferral`).
        """
        if not (force or step % self.save_every == 0) or step in self._manager.all_steps():
            return False
        extra = json.loads(json.dumps(extra or {}))  # fail now, not in a background thread
        args = ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(to_nested(train_state.params)),
                                     TRAIN: ocp.args.StandardSave(to_nested(_train_part(train_state))),
                                     EXTRA: ocp.args.JsonSave(extra)})
        with SigintDeferral(f"saving checkpoint step {step}"):
            self._finish_pending()  # the manager would wait for the previous save here anyway
            try:
                saved = self._manager.save(step, args=args, force=True)
            except Exception as e:
                self._failed(step, e)
            if saved:
                self._unsealed.append(step)
                if not self._async:
                    self._finish_pending()
        return saved

    def _finish_pending(self) -> None:
        """Waits for pending saves, then records the checksums of the steps they wrote (process 0).

        A failed save raises CheckpointWriteError (`_failed`); a step that cannot be sealed (e.g. a
        full disk) stays valid unsealed, checked by reading it, with a warning.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            # saves are sequential (each waits for the one before): the failed one is the newest
            self._failed(self._unsealed[-1] if self._unsealed else None, e)
        if is_primary():
            for step in self._unsealed:
                if (self.directory / str(step)).is_dir():
                    try:
                        seal_step(self.directory / str(step))
                    except OSError as e:
                        (self.directory / str(step) / f"{CHECKSUMS_FILE}.tmp").unlink(missing_ok=True)
                        print(f"rlft: warning: could not record the checksums of checkpoint step {step} "
                              f"({one_line(e)}); it is checked by reading it instead", file=sys.stderr)
        self._unsealed = []

    def _failed(self, step: int | None, error: Exception) -> None:
        """After a failed save of `step`: drop its temporary directory, resynchronise the manager with
        the directory (the steps `keep` would have removed are still there), raise CheckpointWriteError."""
        self._unsealed = [s for s in self._unsealed if s != step]
        if is_primary() and step is not None:
            for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                _remove_tree(tmp)
        try:
            self._manager.reload()
            newest = self.latest_step()
        except Exception:  # the directory itself may be unreadable now
            newest = None
        log = log_traceback(error, self.directory.parent, f"checkpoint step {step} in {self.directory}")
        raise CheckpointWriteError(self.directory, step, error, newest, log) from error

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
        """(state, extra) at `step` (None = latest intact), placed like the abstract target's shardings.

        `abstract_state`: a state dataclass of jax.ShapeDtypeStruct(shape, dtype, sharding=...), e.g.
        `rlft.train.steps.abstract_train_state(...)`; any mesh works, whatever mesh saved it. A damaged
        `step` raises DamagedCheckpoint. With step None (resume), damaged newer steps are skipped
        with a warning and moved aside to `<step>.damaged-<time>` once an older one restored.
        """
        steps = self.all_steps()
        if step is not None and step not in steps or not steps:
            raise RlftError(f"no checkpoint at step {step} in {self.directory} (available: {steps})")
        if step is not None:
            return self._restore_step(step, abstract_state)
        step, restored, damaged = _newest_intact(steps, lambda s: self._restore_step(s, abstract_state))
        if damaged:
            self._set_aside([e.step_dir for e in damaged])
            print(f"rlft: warning: resuming from checkpoint step {step} of {self.directory}", file=sys.stderr)
        return restored

    def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        abstract_train = _train_part(abstract_state)
        args = ocp.args.Composite(**{
            PARAMS: ocp.args.StandardRestore(to_nested(abstract_state.params)),
            TRAIN: ocp.args.StandardRestore(to_nested(abstract_train)),
            EXTRA: ocp.args.JsonRestore()})
        step_dir = self.directory / str(step)
        restored = _read_checked(step_dir, (PARAMS, TRAIN, EXTRA), lambda: self._manager.restore(step, args=args))
        params = from_nested(restored[PARAMS], abstract_state.params)
        train = from_nested(restored[TRAIN], abstract_train)
        state = abstract_state.replace(params=params, **train)
        return state, dict(restored[EXTRA] or {})

    def _set_aside(self, step_dirs: list[Path]) -> None:
        """Renames damaged step dirs to `<step>.damaged-<time>` (kept, ignored by Orbax), so they can be saved again."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        if is_primary():
            for step_dir in step_dirs:
                target = step_dir.with_name(f"{step_dir.name}.damaged-{stamp}")
                step_dir.rename(target)
                print(f"rlft: warning: moved damaged {step_dir} to {target.name}", file=sys.stderr)
        barrier("rlft_checkpoints_set_aside")  # every process then sees the same steps
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until pending async saves are on disk (and sealed); Ctrl-C waits for them too.

        A failed save raises CheckpointWriteError.
        """
        with SigintDeferral("finishing the checkpoint save"):
            self._finish_pending()

    def close(self) -> None:
        """Waits for pending saves, seals them and releases the manager (`wait`, then close)."""
        with SigintDeferral("finishing the checkpoint save"):
            try:
                self._finish_pending()
            except BaseException:
                try:
                    self._manager.close()
                except Exception:  # the first error is the one to report
                    pass
                raise
            self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """close(); while an exception propagates, a failure to close is a warning, not a new error."""
        if exc_type is None:
            return self.close()
        try:
            self.close()
        except Exception as e:
            print(f"rlft: warning: closing checkpoints of {self.directory}: {one_line(e)}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Notebook access and the model config beside the checkpoints


def _int_keys(tree: Any) -> Any:
    """Digit-string dict keys back to ints (nnx.List indices), as nnx.to_pure_dict gives them."""
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
    return tree


def _checkpoints_root(path: Path) -> Path:
    return path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path


def checkpoint_steps(path: str | Path) -> list[int]:
    """Steps with a saved model in a stage dir or its checkpoints dir, ascending ([] if none)."""
    root = _checkpoints_root(Path(path))
    return sorted(int(p.name) for p in root.glob("*") if p.is_dir() and p.name.isdigit()
                  and (p / PARAMS).is_dir())


def _read_step_params(step_dir: Path) -> tuple[dict, dict]:
    """(params, extra) of one step dir, checked (`step_problem`); DamagedCheckpoint if damaged."""

    def read() -> tuple[dict, dict]:
        # Explicit numpy restore types: the saved shardings may name devices this process lacks.
        handler = ocp.PyTreeCheckpointHandler()
        try:
            meta = handler.metadata(step_dir / PARAMS).tree
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
            params = handler.restore(step_dir / PARAMS, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        finally:
            handler.close()
        return _int_keys(params), dict(ocp.JsonCheckpointHandler().restore(step_dir / EXTRA) or {})

    return _read_checked(step_dir, (PARAMS, EXTRA), read)


def load_params(path: str | Path, step: int | None = None) -> tuple[dict, dict]:
    """(params as a nested dict of numpy arrays, extra) from a run, checkpoints or step dir.

    The dict has the `nnx.to_pure_dict` layout (layer indices as ints): put it into a model with
    `nnx.replace_by_pure_dict(nnx.state(model), params)`. No mesh or optimizer state is needed.
    step None reads the newest intact step, warning about damaged newer ones (left in place); a
    damaged step dir or an explicit damaged `step` raises DamagedCheckpoint.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise RlftError(f"checkpoint path {path} does not exist")
    if (path / PARAMS).is_dir():
        return _read_step_params(path)
    root, steps = _checkpoints_root(path), checkpoint_steps(path)
    if step is not None and (root / str(step)).is_dir() and step not in steps:
        raise DamagedCheckpoint(root / str(step), f"item {PARAMS!r} is missing")
    if not steps:
        raise RlftError(f"no rlft checkpoint found in {path} (expected {CHECKPOINTS_DIR}/<step>/{PARAMS})")
    if step is not None and step not in steps:
        raise RlftError(f"no checkpoint at step {step} in {root} (available: {steps})")
    if step is not None:
        return _read_step_params(root / str(step))
    return _newest_intact(steps, lambda s: _read_step_params(root / str(s)))[1]


def save_model_config(workdir: str | Path, cfg: ModelConfig) -> Path:
    """Writes WORKDIR/model_config.json from `cfg.to_dict()`; an existing one must describe `cfg`.

    The checkpoints beside it have its shapes, so a different model is refused (RlftError naming
    the differing fields and the file) and the file is left byte for byte as it was.
    """
    path = Path(workdir) / MODEL_CONFIG_FILE
    new = json.loads(json.dumps(cfg.to_dict()))
    if path.exists():
        if problem := _json_problem(path, "it"):
            raise RlftError(f"{path}: {problem}; it describes the checkpoints of {workdir}, so it is not "
                            f"replaced: restore it or use a new work directory")
        saved = _with_defaults(json.loads(path.read_bytes()))
        # remat changes how the backward is computed, not the parameters: it may change on resume.
        if changes := [c for c in changed_fields(saved, new) if c[0] != "remat"]:
            raise RlftError(f"{path} describes another model ({format_changes(changes)}): the checkpoints "
                            f"in {workdir} have its shapes; use its model settings or a new work directory")
        if saved.get("remat") == new["remat"]:
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(new, indent=2, sort_keys=True) + "\n")
    return path


def _with_defaults(saved: Any) -> Any:
    """A saved model config with the fields added since it was written at their defaults (so an
    old run directory does not read as another model); returned unchanged if it is not valid."""
    try:
        return json.loads(json.dumps(ModelConfig.from_dict(saved).to_dict()))
    except (RlftError, TypeError, AttributeError):
        return saved


def load_model_config(workdir: str | Path) -> ModelConfig:
    """Reads WORKDIR/model_config.json back into a ModelConfig."""
    path = Path(workdir) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise RlftError(f"{path} not found: not an rlft run directory?")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise RlftError(f"{path}: malformed JSON ({e})") from None
