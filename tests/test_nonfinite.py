"""The non-finite guard: a NaN / inf loss or gradient never reaches the parameters or a checkpoint,
and a run stops with a clear error after a few such steps in a row."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlft.train.checkpoints import checkpoint_steps, load_params
from rlft.errors import RlftError
from rlft.data.batching import pad_right
from rlft.models import Decoder
from rlft.parallel.sharding import make_mesh, state_shardings
from rlft.train.stages import run_sft_stage, sft_stage_config
from rlft.train.steps import apply_update, make_optimizer
from tests.pairs_util import CFG, random_params


def test_apply_update_skips_a_nonfinite_gradient_or_loss():
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((2,))}
    tx = make_optimizer(0.1, 0, 10)
    opt_state = tx.init(params)
    grads = {"w": jnp.full((3, 2), 0.5), "b": jnp.ones((2,))}
    new, new_opt, metrics = apply_update(params, opt_state, grads, tx)
    assert float(metrics["nonfinite"]) == 0 and not np.allclose(new["w"], params["w"])
    bad = {"w": grads["w"].at[1, 1].set(jnp.nan), "b": grads["b"]}
    for g, loss in ((bad, None), (grads, jnp.float32(jnp.inf))):
        kept, kept_opt, metrics = apply_update(params, opt_state, g, tx, loss)
        assert float(metrics["nonfinite"]) == 1
        for a, b in zip(jax.tree.leaves((kept, kept_opt)), jax.tree.leaves((params, opt_state))):
            np.testing.assert_array_equal(a, b)


def _sft_setup():
    """(mesh, graphdef, host params, 32 random (prompt, completion) examples) of the tiny model."""
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    graphdef, host = random_params(lambda: Decoder(CFG, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    examples = [(rng.integers(2, 64, 3).tolist(), rng.integers(2, 64, 5).tolist()) for _ in range(32)]
    return mesh, graphdef, host, examples


def test_a_diverging_stage_stops_with_finite_checkpoints(tmp_path):
    mesh, graphdef, host, examples = _sft_setup()
    # an absurd learning rate without clipping: the params blow up to inf, then the loss is NaN
    cfg = sft_stage_config(steps=40, batch_size=8, learning_rate=1e38, max_length=12, save_every=1,
                           keep=50, clip_norm=0.0, warmup_steps=1)
    params = jax.device_put(host, state_shardings(host, mesh))
    with pytest.raises(RlftError, match=r"sft: 3 steps in a row, up to step \d+, had a non-finite loss"):
        run_sft_stage(name="sft", workdir=str(tmp_path), graphdef=graphdef, params=params, examples=examples,
                      cfg=cfg, mesh=mesh, seed=0, pad_id=1)
    lines = (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) < 40 and '"train/nonfinite": 1.0' in lines[-1]
    for step in sorted(int(p.name) for p in (tmp_path / "sft" / "checkpoints").iterdir() if p.name.isdigit()):
        values, _ = load_params(str(tmp_path / "sft"), step)
        assert all(np.isfinite(v).all() for v in jax.tree.leaves(values)), step


def test_a_poisoned_batch_is_skipped_and_the_stage_goes_on(tmp_path, monkeypatch):
    """One batch with a NaN (as corrupt data would give): its update is skipped and counted, the
    stage finishes, and every checkpoint, the newest included, is finite."""
    mesh, graphdef, host, examples = _sft_setup()
    calls = {"n": 0}

    def poisoning(*args, **kw):  # call 1 builds the template batch, call 1 + k the batch of step k
        batch, dropped = pad_right(*args, **kw)
        calls["n"] += 1
        if calls["n"] == 1 + 3:
            batch.loss_mask[0, -1] = np.nan
        return batch, dropped

    monkeypatch.setattr("rlft.train.stages.pad_right", poisoning)
    cfg = sft_stage_config(steps=6, batch_size=8, learning_rate=1e-3, max_length=12, save_every=3, keep=5)
    params = jax.device_put(host, state_shardings(host, mesh))
    run_sft_stage(name="sft", workdir=str(tmp_path), graphdef=graphdef, params=params, examples=examples,
                  cfg=cfg, mesh=mesh, seed=0, pad_id=1)
    logged = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert [r["train/nonfinite"] for r in logged] == [0, 0, 1, 0, 0, 0]
    assert all(np.isfinite(r["train/loss"]) for i, r in enumerate(logged) if i != 2)
    steps = checkpoint_steps(tmp_path / "sft")
    assert steps == [3, 6]
    for step in steps:
        values, _ = load_params(str(tmp_path / "sft"), step)
        assert all(np.isfinite(v).all() for v in jax.tree.leaves(values)), step
