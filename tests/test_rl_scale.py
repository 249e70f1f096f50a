"""The RL step at scale: its experience forwards over row chunks and its log-probs over vocabulary
blocks give the unchunked numbers while its compiled temporaries stop growing with the rollout, and
its minibatches are read where their rows live (no collective moves the experience)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlft.errors import RlftError
from rlft.generate.logprobs import SamplingParams, logprobs_of, sampling_log_probs, vocab_chunked_logprobs
from rlft.models import Decoder, ModelConfig, ScalarModel
from rlft.objectives.pg import entropy_from_log_probs
from rlft.rl.config import resolve_pg_config, rl_stage_config
from rlft.parallel.sharding import make_mesh, shard_batch, state_shardings
from rlft.rl.pg_step import init_pg_state, minibatch_picks, pg_step
from rlft.rl.rollout import make_experience
from rlft.generate.sampling import Sequences
from rlft.train.steps import batch_shardings, jit_step, map_row_chunks, train_state_shardings
from tests.pairs_util import random_params

EOS = 1


@pytest.mark.parametrize("vocab,chunk", [(1000, 128), (1000, 250), (1000, 999)])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_vocab_blocks_give_the_full_logsumexp_its_entropy_and_gradients(vocab, chunk, temperature):
    """Block sizes that do and do not divide the vocabulary (the last block shifted), greedy too."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(0, 3, (3, 5, vocab)).astype(np.float32))
    targets = jnp.asarray(rng.integers(0, vocab, (3, 5)))
    sampling = SamplingParams(temperature=temperature)

    def chunked(x):
        block = lambda start, size: jax.lax.dynamic_slice_in_dim(x, start, size, axis=-1)
        return vocab_chunked_logprobs(block, vocab, chunk, targets, sampling, entropy=True)

    def full(x):
        return logprobs_of(x, targets, sampling), entropy_from_log_probs(sampling_log_probs(x, sampling))

    for a, b in zip(jax.jit(chunked)(logits), full(logits)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x: jnp.sum(f(x)[0]) + 0.3 * jnp.sum(f(x)[1])
    np.testing.assert_allclose(jax.jit(jax.grad(loss(chunked)))(logits), jax.grad(loss(full))(logits),
                               rtol=1e-4, atol=1e-6)


def test_vocab_blocks_refuse_truncated_sampling():
    block = lambda start, size: jnp.zeros((2, size))
    for sampling in (SamplingParams(top_k=5), SamplingParams(top_p=0.9)):
        with pytest.raises(RlftError, match="untruncated sampling"):
            vocab_chunked_logprobs(block, 100, 10, jnp.zeros((2,), jnp.int32), sampling)


def test_row_chunks_come_back_in_row_order():
    x = {"a": jnp.arange(24).reshape(12, 2), "b": jnp.arange(12.0)}
    out = map_row_chunks(lambda t: {"a": t["a"] * 2, "b": t["b"] + 1}, x, 3)
    np.testing.assert_array_equal(out["a"], x["a"] * 2)
    np.testing.assert_array_equal(out["b"], x["b"] + 1)


CFG = ModelConfig.gpt2(vocab_size=512, d_model=32, n_layers=1, n_heads=2, max_positions=32)
PROMPT, NEW = 4, 8


def _config(algorithm, rows, **overrides):
    section = rl_stage_config(steps=4, prompts_per_step=rows // 4, group_size=4, learning_rate=1e-2,
                              max_new_tokens=NEW, algorithm=algorithm, **overrides)
    return resolve_pg_config(section, eos_id=EOS)


def _sequences(rows, seed=0):
    """Random prompt + completion rows in the training layout (some completions end early)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, CFG.vocab_size, (rows, PROMPT + NEW)).astype(np.int32)
    lengths = rng.integers(1, NEW + 1, rows)
    mask = (np.arange(NEW)[None, :] < lengths[:, None]).astype(np.float32)
    segments = np.concatenate([np.ones((rows, PROMPT), np.int32), mask.astype(np.int32)], axis=1)
    return Sequences(tokens=jnp.asarray(tokens), positions=jnp.asarray(np.cumsum(segments, 1) - 1),
                     segment_ids=jnp.asarray(segments), completion_mask=jnp.asarray(mask),
                     logprobs=jnp.asarray(rng.normal(-3, 0.5, (rows, NEW)).astype(np.float32) * mask))


def _step(algorithm, rows, **overrides):
    """(pc, step fn, its arguments) for one pg_step on random rows with random models."""
    pc = _config(algorithm, rows, **overrides)
    graphdef, params = random_params(lambda: Decoder(CFG, rngs=nnx.Rngs(0)), 0)
    params = jax.tree.map(jnp.asarray, params)
    cg = cp = None
    if pc.critic == "separate":
        cg, cp = random_params(lambda: ScalarModel(CFG, rngs=nnx.Rngs(0)), 1)
        cp = jax.tree.map(jnp.asarray, cp)
    reference = jax.tree.map(lambda x: x + 0.01, params)
    tx = optax.sgd(0.5)  # Adam would turn float noise in near-zero gradients into full-size steps
    state = init_pg_state(params, tx, cp, tx, pc.kl_coef, 0)
    seqs = _sequences(rows)
    scores = jnp.asarray(np.random.default_rng(1).normal(0, 1, rows).astype(np.float32))
    step = functools.partial(pg_step, graphdef=graphdef, critic_graphdef=cg, tx=tx, critic_tx=tx, config=pc)
    return pc, step, (state, {"sequences": seqs, "scores": scores}, reference)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_chunked_step_equals_the_unchunked_step(algorithm):
    """Experience forwards over 4-row chunks, log-probs over 96-column blocks (512 = 5 × 96 + 32),
    the loss over 4-row micro-batches: the same metrics and parameters as one pass over 16 rows."""
    results = []
    for chunks in (dict(), dict(experience_chunk=4, vocab_chunk=96, accum_steps=2)):
        _, step, args = _step(algorithm, 16, minibatches=2, entropy_coef=0.01, **chunks)
        results.append(jax.device_get(jax.jit(step)(*args)))
    (a, ma), (b, mb) = results
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    for name in ma:
        np.testing.assert_allclose(ma[name], mb[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_experience_of_chunks_equals_one_pass():
    pcs = [_config("ppo", 16), _config("ppo", 16, experience_chunk=4, vocab_chunk=96)]
    _, _, (state, batch, reference) = _step("ppo", 16)
    graphdef, cg = nnx.graphdef(Decoder(CFG, rngs=nnx.Rngs(0))), nnx.graphdef(ScalarModel(CFG, rngs=nnx.Rngs(0)))
    exps = [jax.jit(functools.partial(make_experience, pc, graphdef, critic_graphdef=cg))(
        state.params, batch["sequences"], batch["scores"], reference, state.kl_coef, state.baseline,
        critic_params=state.critic_params)[0] for pc in pcs]
    for name in ("old_logprobs", "ref_logprobs", "values", "advantages", "returns"):
        np.testing.assert_allclose(getattr(exps[1], name), getattr(exps[0], name), rtol=1e-5, atol=1e-5,
                                   err_msg=name)


def _compiled(rows, **chunks):
    _, step, args = _step("ppo", rows, **chunks)
    return jax.jit(step).lower(*args).compile()


def _full_vocab_arrays(hlo: str, rows: int) -> list[str]:
    """float32 arrays with a `rows` dimension and a vocabulary dimension in the optimised HLO."""
    shapes = set(re.findall(r"f32\[([0-9,]+)\]", hlo))
    return [s for s in shapes if str(CFG.vocab_size) in s.split(",") and str(rows) in s.split(",")]


def test_temporaries_do_not_grow_with_the_rollout_at_a_fixed_chunk():
    """64 vs 256 rows at 8-row chunks (experience chunks and loss micro-batches) and 64-column
    vocabulary blocks: the step's temporaries grow by what the experience itself holds (~KB a
    row), not by [rows, length, vocab] logits; unchunked, they grow with the rows (the test bites),
    and no float32 [rows, ..., vocab] array is left in the program."""
    temps = {}
    for rows in (64, 256):
        chunked = _compiled(rows, experience_chunk=8, vocab_chunk=64, accum_steps=rows // 8)
        whole = _compiled(rows)
        temps[rows] = (chunked.memory_analysis().temp_size_in_bytes, whole.memory_analysis().temp_size_in_bytes)
        assert not _full_vocab_arrays(chunked.as_text(), rows)
        assert _full_vocab_arrays(whole.as_text(), rows)  # what the chunking removes
    logits = 4 * NEW * CFG.vocab_size  # float32 logits of one row's completion
    grew_chunked, grew_whole = temps[256][0] - temps[64][0], temps[256][1] - temps[64][1]
    assert grew_whole > 192 * logits, temps  # every extra row's logits (at least once)
    assert grew_chunked < 192 * logits / 8, temps


def test_each_epoch_visits_every_row_once_one_per_block_in_each_minibatch():
    picks = np.asarray(minibatch_picks(jax.random.key(0), rows=24, epochs=3, minibatches=4))
    assert picks.shape == (12, 6)
    rows = picks + 4 * np.arange(6)[None, :]  # block b of a minibatch is row 4·b + pick
    for epoch in range(3):
        assert sorted(rows[4 * epoch:4 * epoch + 4].ravel()) == list(range(24))
    assert not np.array_equal(picks[:4], picks[4:8])  # a fresh draw per epoch


def test_minibatches_are_read_where_their_rows_live():
    """PPO, 4 epochs × 4 minibatches over 64 rows on 8 data-parallel devices: the only collectives
    are the gradients' and scalar statistics' all-reduces. (Gathering shuffled rows across devices
    made XLA all-reduce every epoch's copy of the experience: s32[256, 12] tokens, f32[256, 8]...)"""
    mesh = make_mesh((8, 1, 1), jax.devices()[:8])
    _, step, (state, batch, reference) = _step("ppo", 64, minibatches=4)
    shardings = train_state_shardings(jax.eval_shape(lambda s: s, state), mesh)
    reference_shardings = state_shardings(reference, mesh)
    batch = shard_batch(jax.device_get(batch), mesh)
    jitted = jit_step(step.func, shardings, batch_shardings(batch, mesh), mesh, (reference_shardings,),
                      **step.keywords)
    hlo = jitted.lower(jax.device_put(state, shardings), batch,
                       jax.device_put(reference, reference_shardings)).compile().as_text()
    collectives = [line for line in hlo.splitlines()
                   if re.search(r"\s(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(-start)?\(", line)]
    assert collectives  # the gradients' all-reduce: the search sees collectives
    experience_axes = {str(NEW), str(PROMPT + NEW)}  # no model dimension is 8 or 12
    moved = [line.split(" = ")[1][:120] for line in collectives
             if any(experience_axes & set(shape.split(",")) for shape in re.findall(r"\[([0-9,]+)\]", line.split("), ")[0]))]
    assert not moved, moved
