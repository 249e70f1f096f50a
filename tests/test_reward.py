"""Reward modelling: last-token scores, Bradley–Terry loss by hand, padding invariance, sharded
reward_step, warm start of the backbone from an LM, and resume of a reward stage."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlft.train import steps
from rlft.data.preferences import pad_pairs
from rlft.errors import RlftError
from rlft.models import Decoder, ScalarModel
from rlft.models.heads import last_token_index, last_token_scores
from rlft.objectives.reward import bradley_terry_loss
from rlft.parallel.sharding import make_mesh, shard_batch, state_shardings
from rlft.train.stages import reward_stage_config, run_reward_stage
from rlft.train.warm_start import decoder_state, scalar_model_from_lm
from tests.pairs_util import CFG, interrupt_pair_stage, random_pair_batch, random_params


def make_scalar_model() -> ScalarModel:
    return ScalarModel(CFG, rngs=nnx.Rngs(0))


@functools.lru_cache
def scalar_params() -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, random host params): the head is non-zero, so scores differ between rows."""
    return random_params(make_scalar_model, seed=0)


def make_tx():
    return steps.make_optimizer(1e-3, warmup_steps=0, total_steps=10, weight_decay=0.1, eps=1e-6)


def log_sigmoid(x):
    return -np.log1p(np.exp(-np.asarray(x, np.float64)))


def test_last_token_scores_right_left_and_empty_rows():
    scores = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
    segments = jnp.array([[1, 1, 0, 0],   # right padded: last real slot 1
                          [0, 0, 1, 1],   # left padded: slot 3
                          [0, 0, 0, 0]])  # empty: slot 0
    np.testing.assert_array_equal(last_token_index(segments), [1, 3, 0])
    np.testing.assert_array_equal(last_token_scores(scores, segments), [1.0, 7.0, 8.0])


@pytest.mark.parametrize("margin,center", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.01), (1.0, 0.1)])
def test_bradley_terry_loss_equals_numpy(margin, center):
    rc = np.array([1.0, -0.5, 2.0, 0.3], np.float32)
    rr = np.array([0.0, 0.5, -1.0, 0.3], np.float32)
    loss, count, aux = bradley_terry_loss(jnp.asarray(rc), jnp.asarray(rr), margin, center)
    d = rc.astype(np.float64) - rr
    want = -log_sigmoid(d - margin).sum() + center * ((rc.astype(np.float64) + rr) ** 2).sum()
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    assert float(count) == 4
    # loss / count = mean BT + center * mean((r_c + r_r)^2)
    np.testing.assert_allclose(float(loss) / 4, np.mean(-log_sigmoid(d - margin))
                               + center * np.mean((rc.astype(np.float64) + rr) ** 2), rtol=1e-6)
    assert float(aux["correct"]) == 2  # 1 > 0, 2 > -1; -0.5 < 0.5 and a tie are not correct
    np.testing.assert_allclose(float(aux["margin"]), d.sum(), rtol=1e-6)
    np.testing.assert_allclose([float(aux["chosen"]), float(aux["rejected"])], [rc.sum(), rr.sum()], rtol=1e-6)


def test_reward_is_invariant_to_extra_padding():
    graphdef, host = scalar_params()
    params = jax.tree.map(jnp.asarray, host)
    rng = np.random.default_rng(0)
    pairs = [(([0], rng.integers(2, 64, n).tolist()), ([0], rng.integers(2, 64, m).tolist()))
             for n, m in ((3, 7), (9, 1), (5, 5))]
    per_row = jax.jit(lambda p, b: last_token_scores(
        nnx.merge(graphdef, p)(b.tokens[:, 0], b.positions[:, 0], b.segment_ids[:, 0]), b.segment_ids[:, 0]))
    short, _ = pad_pairs(pairs, 12, pad_id=1)
    long, _ = pad_pairs(pairs, 40, pad_id=1)
    np.testing.assert_allclose(per_row(params, short), per_row(params, long), atol=1e-6, rtol=0)
    # and the scores do depend on the content (the head is not zero)
    assert np.ptp(np.asarray(per_row(params, short))) > 1e-4


@pytest.fixture(scope="module")
def unsharded_reward_run():
    """Two reward_steps on one device, no accumulation: (initial params, states, metrics)."""
    graphdef, host = scalar_params()
    params = jax.tree.map(jnp.asarray, host)
    tx = make_tx()
    state = steps.init_train_state(params, tx, 0)
    fn = jax.jit(functools.partial(steps.reward_step, graphdef=graphdef, tx=tx, margin=0.25,
                                   center_weight=0.01))
    states, metrics = [], []
    for i in range(2):
        state, m = fn(state, random_pair_batch(8, 16, seed=20 + i))
        states.append(jax.tree.map(np.asarray, state))
        metrics.append({k: float(v) for k, v in m.items()})
    return states, metrics


def test_reward_step_metrics_are_hand_means(unsharded_reward_run):
    graphdef, host = scalar_params()
    _, metrics = unsharded_reward_run
    batch = random_pair_batch(8, 16, seed=20)
    forward = jax.jit(lambda p, t, pos, seg: last_token_scores(nnx.merge(graphdef, p)(t, pos, seg), seg))
    params = jax.tree.map(jnp.asarray, host)
    r = [np.asarray(forward(params, batch["tokens"][:, j], batch["positions"][:, j], batch["segment_ids"][:, j]))
         for j in range(2)]
    d = r[0].astype(np.float64) - r[1]
    m = metrics[0]
    np.testing.assert_allclose(m["bt_loss"], np.mean(-log_sigmoid(d - 0.25)), rtol=1e-5)
    np.testing.assert_allclose(m["loss"], m["bt_loss"] + 0.01 * np.mean((r[0] + r[1]) ** 2.0), rtol=1e-5)
    np.testing.assert_allclose(m["accuracy"], np.mean(d > 0))
    np.testing.assert_allclose([m["margin"], m["chosen"], m["rejected"]],
                               [d.mean(), r[0].mean(), r[1].mean()], rtol=1e-4, atol=1e-6)
    assert m["pairs"] == 8


def test_reward_step_sharded_equals_unsharded(unsharded_reward_run):
    want_states, want_metrics = unsharded_reward_run
    mesh = make_mesh((2, 2, 2))
    graphdef, host = scalar_params()
    params = jax.device_put(host, state_shardings(host, mesh))
    tx = make_tx()
    shardings = jax.tree.map(lambda a: a.sharding, steps.abstract_train_state(graphdef, params, tx, mesh))
    state = steps.init_sharded_train_state(graphdef, params, tx, 0, mesh)
    example = random_pair_batch(8, 16, seed=20)
    fn = steps.jit_step(steps.reward_step, shardings, steps.batch_shardings(example, mesh), mesh,
                            graphdef=graphdef, tx=tx, accum_steps=2, margin=0.25, center_weight=0.01)
    for i in range(2):
        state, m = fn(state, shard_batch(random_pair_batch(8, 16, seed=20 + i), mesh))
        for k, v in m.items():
            np.testing.assert_allclose(float(v), want_metrics[i][k], rtol=1e-5, atol=1e-7, err_msg=k)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want_states[1])):
        np.testing.assert_allclose(np.asarray(a), b, atol=1e-5)
    assert state.params["head"]["kernel"].get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp")


def test_scalar_model_backbone_from_an_lm():
    mesh = make_mesh((2, 1, 1), jax.devices()[:2])
    _, lm_host = random_params(lambda: Decoder(CFG, rngs=nnx.Rngs(0)), seed=3)
    lm = jax.device_put(lm_host, state_shardings(lm_host, mesh))
    _, params = scalar_model_from_lm(CFG, lm, mesh, head_init_std=0.1)
    for a, b in zip(jax.tree.leaves(params["backbone"]), jax.tree.leaves(lm_host)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert 0.02 < np.std(np.asarray(params["head"]["kernel"].get_value())) < 0.3
    assert params["backbone"]["embed"].get_value().sharding == lm["embed"].get_value().sharding
    # from a pure dict (what rlft.train.checkpoints.load_params gives), checked against the config
    from_dict = decoder_state(CFG, nnx.to_pure_dict(lm_host), mesh)
    np.testing.assert_array_equal(np.asarray(from_dict["layers"][1]["mlp"]["up"].get_value()),
                                  lm_host["layers"][1]["mlp"]["up"].get_value())
    wider = CFG.replace(d_model=64, head_dim=16, d_ff=256)
    with pytest.raises(RlftError, match="parameter embed has shape"):
        decoder_state(wider, nnx.to_pure_dict(lm_host), mesh)
    with pytest.raises(RlftError, match="do not match the model config"):
        decoder_state(CFG.replace(n_layers=1), lm, mesh)


def test_reward_stage_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """A stage stopped by KeyboardInterrupt after 2 steps and resumed ends bitwise where a straight run does."""
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])  # sharding is tested above; one device compiles fast
    graphdef, host = scalar_params()
    rng = np.random.default_rng(5)
    pairs = [(([0] + rng.integers(2, 64, 2).tolist(), rng.integers(2, 64, rng.integers(1, 9)).tolist()),
              ([0] + rng.integers(2, 64, 2).tolist(), rng.integers(2, 64, rng.integers(1, 9)).tolist()))
             for _ in range(24)]
    cfg = reward_stage_config(steps=4, batch_size=8, learning_rate=1e-3, max_length=12, save_every=2,
                              margin=0.1, center_weight=0.01)

    def run(workdir):
        params = jax.device_put(host, state_shardings(host, mesh))
        return jax.tree.map(np.asarray, run_reward_stage(name="reward", workdir=str(workdir), graphdef=graphdef,
                                                         params=params, pairs=pairs, cfg=cfg, mesh=mesh, seed=1,
                                                         pad_id=1))

    straight = run(tmp_path / "straight")
    interrupt_pair_stage(run, tmp_path / "resumed", monkeypatch)
    assert sorted(int(d.name) for d in (tmp_path / "resumed" / "reward" / "checkpoints").iterdir()
                  if d.name.isdigit()) == [2]
    resumed = run(tmp_path / "resumed")
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(a, b)
    assert ((tmp_path / "resumed" / "reward" / "metrics.jsonl").read_text()
            == (tmp_path / "straight" / "reward" / "metrics.jsonl").read_text())
