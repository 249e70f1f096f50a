"""Damaged checkpoints: resume falls back to the newest intact step with a warning and moves the damaged
one aside; loading an explicitly named damaged step is a clear error; no silent fallback."""

import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from rlft.train.checkpoints import CHECKSUMS_FILE, Checkpointer, DamagedCheckpoint, load_params
from rlft.errors import RlftError


@struct.dataclass
class State:
    step: jax.Array
    params: dict
    opt: dict


def make_state(step: int) -> State:
    """Different values at every step, large enough for several data files."""
    rng = np.random.default_rng(step)
    params = {"embed": rng.normal(size=(256, 64)).astype(np.float32),
              "layers": {"0": {"w": rng.normal(size=(64, 64)).astype(np.float32)}}}
    return State(step=jnp.int32(step), params=jax.tree.map(jnp.asarray, params),
                 opt={"mu": jax.tree.map(lambda x: jnp.asarray(x * 0.1), params)})


def abstract(state: State) -> State:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def assert_bitwise(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A stage dir with checkpoints at steps 1, 2, 3 (async saves, sealed on close)."""
    stage = tmp_path_factory.mktemp("saved") / "stage"
    with Checkpointer(stage / "checkpoints", save_every=1, keep=5) as ckpt:
        for step in (1, 2, 3):
            assert ckpt.save(step, make_state(step), {"data_position": step})
    return stage


def biggest(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0x5A for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))


def unsealed_truncate(step_dir: Path) -> None:
    """A step whose writer died before sealing it: detected by the read alone."""
    (step_dir / CHECKSUMS_FILE).unlink()
    truncate(step_dir / "params" / "manifest.ocdbt")


DAMAGE = {  # name: (damage(step_dir), what the error says)
    "truncated params data": (lambda d: truncate(biggest(d / "params" / "d")), r"params/d/\w+ has \d+ bytes"),
    "garbled array bytes": (lambda d: garble(biggest(d / "params" / "ocdbt.process_0" / "d")),
                            r"params/ocdbt.process_0/d/\w+ differs from what was written"),
    "garbled _METADATA": (lambda d: garble(d / "params" / "_METADATA"), "params/_METADATA is not valid JSON"),
    "garbled commit record": (lambda d: garble(d / "_CHECKPOINT_METADATA"), "_CHECKPOINT_METADATA is not valid JSON"),
    "deleted _METADATA": (lambda d: (d / "params" / "_METADATA").unlink(), "params/_METADATA is missing"),
    "deleted data file": (lambda d: biggest(d / "params" / "ocdbt.process_0" / "d").unlink(),
                          r"params/ocdbt.process_0/d/\w+ is missing"),
    "unsealed, truncated manifest": (unsealed_truncate, "ValueError"),
}


@pytest.mark.parametrize("name", DAMAGE)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax drops failed reads
def test_damaged_newest_step(saved, tmp_path, capsys, name):
    damage, problem = DAMAGE[name]
    stage = tmp_path / "stage"
    shutil.copytree(saved, stage)
    ckpts = stage / "checkpoints"
    damage(ckpts / "3")

    # An explicitly named damaged step: a clear error naming the step dir and the problem.
    with pytest.raises(DamagedCheckpoint, match=f"checkpoint {ckpts / '3'} is damaged: {problem}"):
        load_params(stage, step=3)
    # The newest: falls back with a warning naming the skipped step; nothing is moved.
    params, extra = load_params(stage)
    assert extra == {"data_position": 2}
    assert_bitwise(params, {"embed": make_state(2).params["embed"], "layers": {0: make_state(2).params["layers"]["0"]}})
    assert "skipping checkpoint step 3" in capsys.readouterr().err and (ckpts / "3").is_dir()

    target = abstract(make_state(0))
    with Checkpointer(ckpts, save_every=1, keep=5) as ckpt:
        with pytest.raises(DamagedCheckpoint, match="is damaged"):
            ckpt.restore(3, target)
        state, extra = ckpt.restore(None, target)  # resume
        err = capsys.readouterr().err
        assert f"skipping checkpoint step 3: checkpoint {ckpts / '3'} is damaged" in err
        assert "resuming from checkpoint step 2" in err
        assert extra == {"data_position": 2}
        assert_bitwise(state, make_state(2))
        aside = [p.name for p in ckpts.iterdir() if p.name.startswith("3.damaged-")]
        assert len(aside) == 1 and f"moved damaged {ckpts / '3'} to {aside[0]}" in err
        assert ckpt.all_steps() == [1, 2]
        assert ckpt.save(3, make_state(3), {"data_position": 3})  # step 3 can be saved again
    with Checkpointer(ckpts) as ckpt:
        assert ckpt.all_steps() == [1, 2, 3]
        assert_bitwise(ckpt.restore(None, target)[0], make_state(3))
    assert capsys.readouterr().err == ""


def test_no_intact_step_is_an_error_and_moves_nothing(saved, tmp_path, capsys):
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(saved / "checkpoints", ckpts)
    for step in (1, 2, 3):
        garble(ckpts / str(step) / "params" / "_METADATA")
    with Checkpointer(ckpts) as ckpt:
        with pytest.raises(RlftError, match="no intact checkpoint: checkpoint .*/3 is damaged.*/1 is damaged"):
            ckpt.restore(None, abstract(make_state(0)))
    assert sorted(p.name for p in ckpts.iterdir()) == ["1", "2", "3"]
    with pytest.raises(RlftError, match="no intact checkpoint"):
        load_params(ckpts)


def test_intact_step_that_does_not_fit_the_target_is_not_called_damaged(saved, tmp_path):
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(saved / "checkpoints", ckpts)
    other = make_state(0).replace(params={"head": jnp.zeros((8, 8))})  # another model's tree
    with Checkpointer(ckpts) as ckpt:
        with pytest.raises(Exception) as e:
            ckpt.restore(None, abstract(other))
    assert not isinstance(e.value, DamagedCheckpoint)
    assert sorted(p.name for p in ckpts.iterdir()) == ["1", "2", "3"]
