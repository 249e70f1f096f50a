"""Orbax checkpoints of any train-state dataclass: periodic async saves, resume, restore onto any
mesh, notebook loads.

A state is a flax struct dataclass with a `params` field (the model that `rlft.load` reads:
TrainState, or the RL stage's PGState with its critic, KL coefficient and baseline); every other
field is saved too, so a restore is exact. Layout of a run directory:

    WORKDIR/model_config.json            ModelConfig.to_dict() (`save_model_config`)
    WORKDIR/checkpoints/<step>/params    state.params as a nested dict (nnx.to_pure_dict layout)
    WORKDIR/checkpoints/<step>/train     every other field of the state (step, opt_state, rng, ...)
    WORKDIR/checkpoints/<step>/extra     JSON of the host loop: the data position only

Trees are stored as nested dicts with string keys built from their key paths (an nnx.Variable
contributes its value, not a "value" level), so any optimizer state round-trips; restore puts the
values back into the structure of the abstract target. Parameters live in their own item so a
notebook can read them without the optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Self

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from rlft.errors import RlftError
from rlft.models.config import ModelConfig

PARAMS, TRAIN, EXTRA = "params", "train", "extra"
MODEL_CONFIG_FILE = "model_config.json"
CHECKPOINTS_DIR = "checkpoints"


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
        """Starts saving (async) state and JSON `extra` at `step`; force ignores save_every."""
        if not (force or step % self.save_every == 0) or step in self._manager.all_steps():
            return False
        extra = json.loads(json.dumps(extra or {}))  # fail now, not in a background thread
        args = ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(to_nested(train_state.params)),
                                     TRAIN: ocp.args.StandardSave(to_nested(_train_part(train_state))),
                                     EXTRA: ocp.args.JsonSave(extra)})
        return self._manager.save(step, args=args, force=True)

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
        """(state, extra) at `step` (None = latest), placed like the abstract target's shardings.

        `abstract_state`: a state dataclass of jax.ShapeDtypeStruct(shape, dtype, sharding=...), e.g.
        `rlft.steps.abstract_train_state(...)`; any mesh works, whatever mesh saved it.
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self._manager.all_steps():
            raise RlftError(f"no checkpoint at step {step} in {self.directory} "
                            f"(available: {self.all_steps()})")
        abstract_train = _train_part(abstract_state)
        args = ocp.args.Composite(**{
            PARAMS: ocp.args.StandardRestore(to_nested(abstract_state.params)),
            TRAIN: ocp.args.StandardRestore(to_nested(abstract_train)),
            EXTRA: ocp.args.JsonRestore()})
        restored = self._manager.restore(step, args=args)
        params = from_nested(restored[PARAMS], abstract_state.params)
        train = from_nested(restored[TRAIN], abstract_train)
        state = abstract_state.replace(params=params, **train)
        return state, dict(restored[EXTRA] or {})

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def _step_dir(path: Path, step: int | None) -> Path:
    """The <step> directory of a run dir, a checkpoints dir or a step dir itself."""
    if (path / PARAMS).is_dir():
        return path
    root = _checkpoints_root(path)
    steps = checkpoint_steps(path)
    if not steps:
        raise RlftError(f"no rlft checkpoint found in {path} (expected {CHECKPOINTS_DIR}/<step>/{PARAMS})")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise RlftError(f"no checkpoint at step {step} in {root} (available: {steps})")
    return root / str(step)


def load_params(path: str | Path, step: int | None = None) -> tuple[dict, dict]:
    """(params as a nested dict of numpy arrays, extra) from a run, checkpoints or step dir.

    The dict has the `nnx.to_pure_dict` layout (layer indices as ints): put it into a model with
    `nnx.replace_by_pure_dict(nnx.state(model), params)`. No mesh or optimizer state is needed.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise RlftError(f"checkpoint path {path} does not exist")
    step_dir = _step_dir(path, step)
    # Explicit numpy restore types: the saved shardings may name devices this process lacks.
    handler = ocp.PyTreeCheckpointHandler()
    try:
        meta = handler.metadata(step_dir / PARAMS).tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        params = handler.restore(step_dir / PARAMS, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    finally:
        handler.close()
    extra = ocp.JsonCheckpointHandler().restore(step_dir / EXTRA) if (step_dir / EXTRA).is_dir() else {}
    return _int_keys(params), dict(extra or {})


def save_model_config(workdir: str | Path, cfg: ModelConfig) -> Path:
    """Writes WORKDIR/model_config.json from `cfg.to_dict()`."""
    path = Path(workdir) / MODEL_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def load_model_config(workdir: str | Path) -> ModelConfig:
    """Reads WORKDIR/model_config.json back into a ModelConfig."""
    path = Path(workdir) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise RlftError(f"{path} not found: not an rlft run directory?")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise RlftError(f"{path}: malformed JSON ({e})") from None
