"""SFT loss, gradient accumulation and sharded steps on a tiny GPT-2 (CPU, 8 simulated devices)."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rlft.train import steps
from rlft.models import Decoder, ModelConfig
from rlft.generate.logprobs import token_logprobs
from rlft.objectives import sft_loss
from rlft.parallel.sharding import make_mesh, shard_batch, state_shardings
from tests.pairs_util import random_params

CFG = ModelConfig.gpt2(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_positions=64)


def make_model(seed: int = 0) -> Decoder:
    return Decoder(CFG, rngs=nnx.Rngs(seed))


def host_params(seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, random numpy params) shaped like make_model(): compiling an init is slow on CPU."""
    return random_params(make_model, seed)


@functools.lru_cache
def split_model() -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params on the default device)."""
    graphdef, params = host_params()
    return graphdef, jax.tree.map(jnp.asarray, params)


def random_batch(rows: int, length: int, seed: int = 0) -> dict:
    """Right-padded rows of random tokens with random prompt/completion lengths (loss on completion)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (rows, length)).astype(np.int32)
    positions = np.zeros((rows, length), np.int32)
    segment_ids = np.zeros((rows, length), np.int32)
    loss_mask = np.zeros((rows, length), np.float32)
    for r in range(rows):
        n = int(rng.integers(length // 2, length + 1))
        p = int(rng.integers(1, n))
        positions[r, :n] = np.arange(n)
        segment_ids[r, :n] = 1
        loss_mask[r, p:n] = 1.0
        tokens[r, n:] = 0
    return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids, "loss_mask": loss_mask}


def jit_loss(graphdef):
    """sft_loss compiled (eager op-by-op dispatch on 8 CPU devices is slow)."""
    return jax.jit(functools.partial(sft_loss, graphdef))


def make_tx():
    """AdamW as used in training, with eps=1e-6: Adam's first step is about lr*sign(g), which turns
    float32 summation-order noise in gradients near 0 into lr/eps times larger parameter noise."""
    return steps.make_optimizer(1e-3, warmup_steps=0, total_steps=10, weight_decay=0.1, eps=1e-6)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_token_logprobs_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, (2, 5))
    got = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
    ls = np_log_softmax(logits)
    want = np.zeros((2, 5))
    for b in range(2):
        for t in range(1, 5):
            want[b, t] = ls[b, t - 1, tokens[b, t]]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.all(got[:, 0] == 0)


def test_sft_loss_is_hand_cross_entropy_over_completion_only():
    graphdef, params = split_model()
    loss = jit_loss(graphdef)
    batch = random_batch(4, 16, seed=2)
    loss_sum, count, aux = loss(params, batch)
    forward = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b["tokens"], b["positions"], b["segment_ids"]))
    logits = np.asarray(forward(params, batch))
    ls = np_log_softmax(logits)
    want, n, correct = 0.0, 0, 0
    for b, t in zip(*np.nonzero(batch["loss_mask"])):  # completion targets only
        want -= ls[b, t - 1, batch["tokens"][b, t]]
        correct += int(np.argmax(logits[b, t - 1]) == batch["tokens"][b, t])
        n += 1
    np.testing.assert_allclose(float(loss_sum), want, rtol=1e-5)
    assert float(count) == n == batch["loss_mask"].sum()
    assert float(aux["correct"]) == correct

    # Prompt tokens are inputs, never targets: with the mask off nothing counts.
    prompt_only = dict(batch, loss_mask=np.zeros_like(batch["loss_mask"]))
    assert float(loss(params, prompt_only)[0]) == 0.0
    # A full-sequence mask counts every non-first real token.
    full = dict(batch, loss_mask=(batch["segment_ids"] > 0).astype(np.float32))
    full["loss_mask"][:, 0] = 0
    assert float(loss(params, full)[1]) == (batch["segment_ids"] > 0).sum() - 4


def test_packed_rows_equal_separate_rows():
    graphdef, params = split_model()
    rng = np.random.default_rng(3)
    (p1, c1), (p2, c2) = [(rng.integers(1, 64, 3).tolist(), rng.integers(1, 64, 4).tolist()),
                          (rng.integers(1, 64, 2).tolist(), rng.integers(1, 64, 5).tolist())]
    length = 16

    def put(batch, row, start, seg, p, c):
        n = len(p) + len(c)
        batch["tokens"][row, start:start + n] = p + c
        batch["positions"][row, start:start + n] = np.arange(n)
        batch["segment_ids"][row, start:start + n] = seg
        batch["loss_mask"][row, start + len(p):start + n] = 1.0

    def empty(rows):
        return {"tokens": np.zeros((rows, length), np.int32), "positions": np.zeros((rows, length), np.int32),
                    "segment_ids": np.zeros((rows, length), np.int32),
                    "loss_mask": np.zeros((rows, length), np.float32)}

    packed, separate = empty(1), empty(2)
    put(packed, 0, 0, 1, p1, c1)
    put(packed, 0, len(p1) + len(c1), 2, p2, c2)
    put(separate, 0, 0, 1, p1, c1)
    put(separate, 1, 0, 1, p2, c2)
    loss = jit_loss(graphdef)
    lp, cp, _ = loss(params, packed)
    ls, cs, _ = loss(params, separate)
    assert float(cp) == float(cs) == len(c1) + len(c2)
    np.testing.assert_allclose(float(lp), float(ls), rtol=1e-6)


def test_learning_rate_schedule_and_decay_mask():
    schedule = steps.learning_rate_schedule(1.0, warmup_steps=4, total_steps=14)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 3, 4, 9, 14, 20)],
                               [0.25, 1.0, 1.0, 0.5, 0.0, 0.0], atol=1e-6)
    _, params = split_model()
    mask = nnx.to_flat_state(steps.decay_mask(params))
    decayed = {".".join(map(str, path)) for path, v in mask if v.get_value()}
    assert "layers.0.attn.q" in decayed and "embed" in decayed
    assert "layers.0.mlp.down" in decayed and "pos_embed" in decayed
    assert not {"layers.0.attn.q_bias", "layers.0.mlp.up_bias", "final_norm.scale"} & decayed


@pytest.fixture(scope="module")
def unsharded_run():
    """Reference on one device, no accumulation: (initial params, states and metrics after 1 and 2 steps)."""
    graphdef, params = split_model()
    tx = make_tx()
    state = steps.init_train_state(params, tx, 0)
    fn = jax.jit(functools.partial(steps.sft_step, graphdef=graphdef, tx=tx, accum_steps=1))
    states, metrics = [], []
    for i in range(2):
        state, m = fn(state, random_batch(8, 16, seed=10 + i))  # rows with different token counts
        states.append(jax.tree.map(np.asarray, state))
        metrics.append({k: float(v) for k, v in m.items()})
    return jax.tree.map(np.asarray, params), states, metrics


def test_gradient_accumulation_equals_one_big_batch(unsharded_run):
    params, want_states, want_metrics = unsharded_run
    graphdef, _ = split_model()
    tx = make_tx()
    batch = random_batch(8, 16, seed=10)
    fn = jax.jit(functools.partial(steps.sft_step, graphdef=graphdef, tx=tx, accum_steps=4))
    state, metrics = fn(steps.init_train_state(jax.tree.map(jnp.asarray, params), tx, 0), batch)
    for k, v in metrics.items():  # loss, tokens, accuracy, grad_norm, learning_rate, param_norm
        np.testing.assert_allclose(float(v), want_metrics[0][k], rtol=1e-6, err_msg=k)
    assert want_metrics[0]["tokens"] == batch["loss_mask"].sum()
    assert want_metrics[0]["learning_rate"] == pytest.approx(1e-3)
    # The update is ~lr = 1e-3 per element; k micro-batches give the same parameters to ~1e-6.
    moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(want_states[0].params),
                                                     jax.tree.leaves(params)))
    assert moved > 5e-4
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_states[0].params)):
        np.testing.assert_allclose(np.asarray(a), b, atol=2e-6)
    assert int(state.step) == 1


@pytest.mark.parametrize("shape", [(2, 2, 2), (8, 1, 1)])
def test_sharded_steps_equal_unsharded(shape, unsharded_run):
    assert jax.device_count() >= 8, "needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
    _, want_states, want_metrics = unsharded_run
    mesh = make_mesh(shape)
    graphdef, host = host_params()
    params = jax.device_put(host, state_shardings(host, mesh))
    tx = make_tx()
    abstract = steps.abstract_train_state(graphdef, params, tx, mesh)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    state = steps.init_sharded_train_state(graphdef, params, tx, 0, mesh)
    example = random_batch(8, 16, seed=10)
    # Two micro-batches of 4 rows each, against one batch of 8 unsharded.
    fn = steps.jit_step(steps.sft_step, shardings, steps.batch_shardings(example, mesh), mesh,
                            graphdef=graphdef, tx=tx, accum_steps=2)
    for i in range(2):
        state, m = fn(state, shard_batch(random_batch(8, 16, seed=10 + i), mesh))
        for k, v in m.items():
            np.testing.assert_allclose(float(v), want_metrics[i][k], rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want_states[1])):
        np.testing.assert_allclose(np.asarray(a), b, atol=1e-5)

    # Params carry the shardings the logical-axis rules give; Adam moments shard like their params.
    rules = state_shardings(params, mesh)
    for (path, var), (_, want) in zip(nnx.to_flat_state(state.params), nnx.to_flat_state(rules)):
        assert var.get_value().sharding == want.get_value(), path
    q = state.params["layers"][0]["attn"]["q"].get_value()
    assert q.sharding.spec == P("fsdp", "tensor", None)
    adam = state.opt_state.inner_state[1][0]
    assert adam.mu["layers"][0]["attn"]["q"].get_value().sharding == q.sharding
    assert adam.nu["embed"].get_value().sharding == state.params["embed"].get_value().sharding
    assert state.step.sharding.spec == P() and state.rng.sharding.spec == P()


@pytest.mark.parametrize("vocab", [7, 64, 96, 512, 1000, 50257])
def test_first_argmax_equals_argmax_with_ties_infs_and_nans(vocab):
    from rlft.ops import first_argmax

    rng = np.random.default_rng(vocab)
    x = rng.normal(size=(3, 4, vocab)).astype(np.float32)
    x[0, 0] = 0.0                                            # all tied: index 0
    x[0, 1, 2] = x[0, 1, vocab - 1] = np.nan                 # NaN counts as the maximum
    x[0, 2, 3] = x[0, 2, vocab - 1] = x[0, 2].max() + 1      # tie: the first one
    x[1, 2] = -np.inf
    x[1, 3, 1] = x[1, 3, 4 % vocab] = np.inf
    x[2, 0, vocab - 1] = 100.0                               # in the last chunk
    ties = rng.integers(0, 3, size=(5, 6, vocab)).astype(np.float32)
    f = jax.jit(first_argmax)
    for arr in (x, np.where(np.isnan(x), 1.0, x).astype(np.float32), ties):
        np.testing.assert_array_equal(np.asarray(f(arr)), np.asarray(jnp.argmax(arr, axis=-1)))
