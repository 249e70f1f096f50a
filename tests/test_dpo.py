"""DPO: losses by hand (sigmoid, label smoothing, IPO), log 2 at initialisation, the reference as a
non-donated argument or precomputed, sharded dpo_step, and resume of a DPO stage."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlft.train import steps
from rlft.errors import RlftError
from rlft.models import Decoder
from rlft.objectives.dpo import dpo_loss, pair_logprobs
from rlft.parallel.sharding import make_mesh, shard_batch, state_shardings
from rlft.train.stages import dpo_stage_config, run_dpo_stage
from tests.pairs_util import CFG, interrupt_pair_stage, random_pair_batch, random_params

POLICY = np.array([[-10.0, -12.0], [-8.0, -7.5], [-20.0, -20.0], [-3.0, -9.0]], np.float32)
REFERENCE = np.array([[-11.0, -11.0], [-8.5, -8.0], [-19.0, -21.0], [-4.0, -8.0]], np.float32)


def make_decoder() -> Decoder:
    return Decoder(CFG, rngs=nnx.Rngs(0))


@functools.lru_cache
def decoder_params(seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    return random_params(make_decoder, seed)


def make_tx():
    return steps.make_optimizer(1e-3, warmup_steps=0, total_steps=10, weight_decay=0.1, eps=1e-6)


def log_sigmoid(x):
    return -np.log1p(np.exp(-np.asarray(x, np.float64)))


@pytest.mark.parametrize("loss_type,beta,smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2),
                                                      ("ipo", 0.1, 0.0), ("ipo", 2.0, 0.0)])
def test_dpo_loss_equals_numpy(loss_type, beta, smoothing):
    loss, count, aux = dpo_loss(jnp.asarray(POLICY), jnp.asarray(REFERENCE), beta, smoothing, loss_type)
    ratios = POLICY.astype(np.float64) - REFERENCE
    h = ratios[:, 0] - ratios[:, 1]  # [3, 0, -2, 5]
    if loss_type == "sigmoid":
        want = -(1 - smoothing) * log_sigmoid(beta * h) - smoothing * log_sigmoid(-beta * h)
    else:
        want = (h - 1 / (2 * beta)) ** 2
    np.testing.assert_allclose(float(loss), want.sum(), rtol=1e-6)
    assert float(count) == 4
    rewards = beta * ratios
    assert float(aux["correct"]) == 2  # h > 0 for pairs 0 and 3; a tie (pair 1) is not correct
    np.testing.assert_allclose(float(aux["margin"]), (rewards[:, 0] - rewards[:, 1]).sum(), rtol=1e-6)
    np.testing.assert_allclose([float(aux["chosen_reward"]), float(aux["rejected_reward"])],
                               rewards.sum(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([float(aux["chosen_logp"]), float(aux["rejected_logp"])], POLICY.sum(0))


def test_dpo_loss_arguments_are_checked():
    p = jnp.asarray(POLICY)
    with pytest.raises(RlftError, match="dpo.loss_type"):
        dpo_loss(p, p, loss_type="hinge")
    with pytest.raises(RlftError, match="dpo.beta"):
        dpo_loss(p, p, beta=0.0)
    with pytest.raises(RlftError, match="dpo.label_smoothing"):
        dpo_loss(p, p, label_smoothing=0.2, loss_type="ipo")


@pytest.fixture(scope="module")
def unsharded_dpo_run():
    """Two dpo_steps on one device against a different frozen reference: (step fn, states, metrics)."""
    graphdef, host = decoder_params()
    _, ref_host = decoder_params(seed=1)
    tx = make_tx()
    state = steps.init_train_state(jax.tree.map(jnp.asarray, host), tx, 0)
    fn = jax.jit(functools.partial(steps.dpo_step, graphdef=graphdef, tx=tx, beta=0.5, label_smoothing=0.1))
    reference = jax.tree.map(jnp.asarray, ref_host)
    states, metrics = [], []
    for i in range(2):
        state, m = fn(state, random_pair_batch(8, 16, seed=30 + i), reference)
        states.append(jax.tree.map(np.asarray, state))
        metrics.append({k: float(v) for k, v in m.items()})
    return fn, states, metrics


def test_loss_at_initialisation_is_log_2(unsharded_dpo_run):
    fn, _, _ = unsharded_dpo_run
    graphdef, host = decoder_params()
    params = jax.tree.map(jnp.asarray, host)
    state = steps.init_train_state(params, make_tx(), 0)
    _, m = fn(state, random_pair_batch(8, 16, seed=1), params)  # the policy is its own reference
    # Policy and reference log-probs are the same model on the same values: every margin is 0 and
    # the loss is log 2 (with label smoothing 0.1 too), up to float32 rounding. The policy's pass
    # (under the gradient) and the reference's are compiled apart, so XLA may round a log-prob sum
    # (|logp| ~ 40 here, an ulp ~ 4e-6) differently: a reward is 0 up to beta x an ulp or two, and
    # rewards/accuracies (a strict >) may count such a pair, so it is not asserted.
    assert float(m["loss"]) == pytest.approx(np.log(2.0), abs=1e-7)
    for name in ("rewards/margins", "rewards/chosen", "rewards/rejected"):
        assert abs(float(m[name])) <= 1e-6, name
    assert float(m["grad_norm"]) > 0  # the policy moves away from the reference
    zeros = jnp.asarray(POLICY)
    for smoothing in (0.0, 0.3):
        loss, count, _ = dpo_loss(zeros, zeros, beta=0.1, label_smoothing=smoothing)
        assert float(loss / count) == pytest.approx(np.log(2.0), abs=1e-7)


def test_precomputed_reference_logps_give_the_same_step(unsharded_dpo_run):
    _, want_states, want_metrics = unsharded_dpo_run
    graphdef, host = decoder_params()
    _, ref_host = decoder_params(seed=1)
    batch = random_pair_batch(8, 16, seed=30)
    reference = jax.tree.map(jnp.asarray, ref_host)
    ref_logps = np.asarray(jax.jit(functools.partial(pair_logprobs, graphdef))(reference, batch))
    # pair_logprobs = completion log-probs of each row, by hand from the logits
    forward = jax.jit(lambda p, t, pos, seg: nnx.merge(graphdef, p)(t, pos, seg))
    for j in range(2):
        t, pos, seg, mask = (batch[k][:, j] for k in ("tokens", "positions", "segment_ids", "loss_mask"))
        logits = np.asarray(forward(reference, t, pos, seg), np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        picked = np.take_along_axis(logits[:, :-1], t[:, 1:, None], -1)[..., 0] - logz[:, :-1]
        np.testing.assert_allclose(ref_logps[:, j], (picked * mask[:, 1:]).sum(-1), rtol=1e-5)
    tx = make_tx()
    fn = jax.jit(functools.partial(steps.dpo_step, graphdef=graphdef, tx=tx, beta=0.5, label_smoothing=0.1))
    state, m = fn(steps.init_train_state(jax.tree.map(jnp.asarray, host), tx, 0),
                  dict(batch, ref_logps=ref_logps))
    for k, v in m.items():
        np.testing.assert_allclose(float(v), want_metrics[0][k], rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_states[0].params)):
        np.testing.assert_allclose(np.asarray(a), b, atol=1e-6)


def test_dpo_step_sharded_equals_unsharded(unsharded_dpo_run):
    _, want_states, want_metrics = unsharded_dpo_run
    mesh = make_mesh((8, 1, 1))
    graphdef, host = decoder_params()
    _, ref_host = decoder_params(seed=1)
    params = jax.device_put(host, state_shardings(host, mesh))
    ref_shardings = state_shardings(ref_host, mesh)
    reference = jax.device_put(ref_host, ref_shardings)
    tx = make_tx()
    shardings = jax.tree.map(lambda a: a.sharding, steps.abstract_train_state(graphdef, params, tx, mesh))
    state = steps.init_sharded_train_state(graphdef, params, tx, 0, mesh)
    example = random_pair_batch(8, 16, seed=30)
    fn = steps.jit_step(steps.dpo_step, shardings, steps.batch_shardings(example, mesh), mesh,
                            (ref_shardings,), graphdef=graphdef, tx=tx, accum_steps=2, beta=0.5,
                            label_smoothing=0.1)
    for i in range(2):
        state, m = fn(state, shard_batch(random_pair_batch(8, 16, seed=30 + i), mesh), reference)
        for k, v in m.items():  # atol: margins are differences of log-prob sums near -60, whose
            # float32 resolution is ~8e-6; the reduction order differs across 8 devices
            np.testing.assert_allclose(float(v), want_metrics[i][k], rtol=1e-5, atol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want_states[1])):
        np.testing.assert_allclose(np.asarray(a), b, atol=1e-5)
    assert not any(x.is_deleted() for x in jax.tree.leaves(reference))  # the reference is not donated


def test_dpo_stage_resume_equals_uninterrupted(tmp_path, monkeypatch):
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])  # sharding is tested above; one device compiles fast
    graphdef, host = decoder_params()
    rng = np.random.default_rng(6)
    pairs = []
    for _ in range(16):
        prompt = [0] + rng.integers(2, 64, 3).tolist()
        pairs.append(((prompt, rng.integers(2, 64, rng.integers(1, 8)).tolist()),
                      (prompt, rng.integers(2, 64, rng.integers(1, 8)).tolist())))
    cfg = dpo_stage_config(steps=4, batch_size=8, learning_rate=1e-3, max_length=12, save_every=2,
                           beta=0.2, loss_type="ipo")

    def run(workdir):
        params = jax.device_put(host, state_shardings(host, mesh))
        return jax.tree.map(np.asarray, run_dpo_stage(name="dpo", workdir=str(workdir), graphdef=graphdef,
                                                      params=params, pairs=pairs, cfg=cfg, mesh=mesh, seed=2,
                                                      pad_id=1))

    straight = run(tmp_path / "straight")
    interrupt_pair_stage(run, tmp_path / "resumed", monkeypatch)
    resumed = run(tmp_path / "resumed")
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(a, b)
    lines = (tmp_path / "resumed" / "dpo" / "metrics.jsonl").read_text()
    assert lines == (tmp_path / "straight" / "dpo" / "metrics.jsonl").read_text()
    assert '"train/rewards/accuracies"' in lines and '"train/logps/chosen"' in lines
