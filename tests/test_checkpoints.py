"""Checkpointer: async save, restore onto another mesh, keep/save_every, notebook loads, model config."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax
import numpy as np
import pytest
from flax import nnx

from rlft.train import steps
from rlft.train.checkpoints import (
    Checkpointer,
    from_nested,
    load_model_config,
    load_params,
    save_model_config,
    to_nested,
)
from rlft.errors import RlftError
from rlft.models import Decoder, ModelConfig
from rlft.parallel.sharding import make_mesh, state_shardings

CFG = ModelConfig.gpt2(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_positions=64)


def make_model() -> Decoder:
    return Decoder(CFG, rngs=nnx.Rngs(0))


def random_state(mesh, seed: int = 0):
    """(graphdef, tx, a TrainState of random values placed on `mesh` by its rules); nothing compiled."""
    graphdef, abstract_params = nnx.split(nnx.eval_shape(make_model))
    tx = steps.make_optimizer(1e-3, warmup_steps=2, total_steps=10, weight_decay=0.1)
    abstract = jax.eval_shape(lambda p: steps.init_train_state(p, tx, 0), abstract_params)
    rng = np.random.default_rng(seed)

    def value(a):
        if np.issubdtype(a.dtype, np.floating):
            return rng.normal(size=a.shape).astype(a.dtype)
        return rng.integers(0, 1000, a.shape).astype(a.dtype)

    host = jax.tree.map(value, abstract)
    return graphdef, tx, jax.device_put(host, steps.train_state_shardings(abstract, mesh))


def assert_same_values(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_nested_round_trip_keeps_structure():
    _, _, state = random_state(make_mesh((8, 1, 1)))
    nested = to_nested(state)
    assert set(nested) == {"step", "params", "opt_state", "rng"}
    assert isinstance(nested["params"]["embed"], jax.Array)  # a Variable is stored as its value
    assert set(nested["params"]["layers"]) == {"0", "1"}
    assert_same_values(from_nested(nested, state), state)


def test_restore_onto_a_different_mesh(tmp_path):
    assert jax.device_count() >= 8, "needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
    graphdef, tx, state = random_state(make_mesh((8, 1, 1)))
    with Checkpointer(tmp_path / "checkpoints", save_every=10) as ckpt:
        assert ckpt.save(10, state, {"data_position": 7, "kl_coef": 0.05})
        ckpt.wait()
        assert ckpt.latest_step() == 10

    mesh = make_mesh((2, 2, 2))
    abstract_params = nnx.state(nnx.eval_shape(make_model))
    target = steps.abstract_train_state(graphdef, abstract_params, tx, mesh)
    with Checkpointer(tmp_path / "checkpoints") as fresh:  # a new process: fresh objects
        restored, extra = fresh.restore(None, target)
    assert extra == {"data_position": 7, "kl_coef": 0.05}
    assert_same_values(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert got.sharding == want.sharding
    q = restored.params["layers"][1]["attn"]["q"].get_value()
    assert q.sharding == state_shardings(abstract_params, mesh)["layers"][1]["attn"]["q"].get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)


def test_save_every_keep_and_errors(tmp_path):
    _, _, state = random_state(make_mesh((8, 1, 1)))
    ckpt = Checkpointer(tmp_path, save_every=2, keep=2)
    saved = [step for step in range(1, 7) if ckpt.save(step, state, {"data_position": step})]
    assert saved == [2, 4, 6]
    assert ckpt.save(7, state, {}, force=True)
    assert not ckpt.save(7, state, {}, force=True)  # already there: never overwritten
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7] and ckpt.latest_step() == 7
    assert not ckpt.should_save(6) and ckpt.should_save(8)
    with pytest.raises(RlftError, match="no checkpoint at step 3"):
        ckpt.restore(3, state)
    with pytest.raises(TypeError):
        ckpt.save(8, state, {"not json": object()})
    ckpt.close()


def test_load_params_for_notebooks(tmp_path):
    _, _, state = random_state(make_mesh((2, 2, 2)), seed=3)
    workdir = tmp_path / "run"
    save_model_config(workdir, CFG)
    with Checkpointer(workdir / "checkpoints", save_every=1) as ckpt:
        ckpt.save(1, state, {"data_position": 1})
        ckpt.save(2, state, {"data_position": 2})
    want = jax.tree.map(np.asarray, nnx.to_pure_dict(state.params))
    for path, step in [(workdir, None), (workdir / "checkpoints", 1), (workdir / "checkpoints" / "2", None)]:
        params, extra = load_params(path, step)
        assert extra == {"data_position": step or 2}
        assert jax.tree.structure(params) == jax.tree.structure(want)  # int layer keys, no "value"
        assert_same_values(params, want)
        assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))

    cfg = load_model_config(workdir)
    assert cfg == CFG
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    model_state = nnx.state(model)
    nnx.replace_by_pure_dict(model_state, load_params(workdir)[0])
    np.testing.assert_array_equal(model_state["embed"].get_value(), want["embed"])

    with pytest.raises(RlftError, match="step 5"):
        load_params(workdir, 5)
    with pytest.raises(RlftError, match="no rlft checkpoint"):
        load_params(tmp_path)
    with pytest.raises(RlftError, match="model_config.json"):
        load_model_config(tmp_path)
