"""Continuous batching (rlft.generate.engine): the same completions as the static sampler, token for
token, whatever the slot count and chunk size, for RoPE and absolute-position models and stacked caches."""

import jax
import numpy as np
import pytest

from rlft.errors import RlftError
from rlft.generate.engine import generate_continuous
from rlft.generate.sampling import SamplingParams, sample
from rlft.models import ModelConfig
from rlft.parallel.sharding import make_mesh, replicated
from tests.test_sampling import PAD, _init, _left_padded

EOS = (5, 9)  # two EOS ids: a row ends at either


def _model(kind: str):
    """(graphdef, params): a Llama layout (RoPE, GQA) or a GPT-2 layout with absolute positions, a
    tied head and one stacked [layers, ...] cache (scan_layers)."""
    if kind == "llama":
        cfg = ModelConfig.llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                max_positions=64)
        return _init(cfg, seed=1, head_scale=20)
    from flax import nnx

    from rlft.models import Decoder

    cfg = ModelConfig.gpt2(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_positions=64, scan_layers=True)
    return nnx.split(Decoder(cfg, rngs=nnx.Rngs(1)))


MODELS = {}


def model_of(kind: str):
    if kind not in MODELS:
        MODELS[kind] = _model(kind)
    return MODELS[kind]


def _queue(n=13, seed=3):
    lengths = np.random.RandomState(seed).randint(1, 7, size=n)
    return _left_padded(list(lengths), 6, 64, seed=seed)


@pytest.mark.parametrize("kind,sampling", [
    ("llama", SamplingParams(temperature=0.8, top_k=10, top_p=0.9)), ("gpt2-scan", SamplingParams(temperature=0.0))],
    ids=["llama-truncated", "gpt2-scan-greedy"])  # untruncated sampling: the RL test below
def test_continuous_equals_static_whatever_the_slots(kind, sampling):
    graphdef, params = model_of(kind)
    tokens, mask = _queue()
    ref = sample(graphdef, params, tokens, mask, jax.random.key(2), max_new_tokens=12, eos_id=EOS, pad_id=PAD,
                 sampling=sampling)
    lengths = np.asarray(ref.lengths)
    assert lengths.min() < lengths.max()  # a long-tailed queue: rows end at different steps
    # refills of 1..5 rows, a chunk ending after every row or at 2 ended rows (one slot:
    # test_rows_do_not_depend_on_their_neighbours); an engine of 2 slots on each of 4 devices, the
    # 13 rows split 4 + 4 + 4 + 1, a tensor axis replicating them
    mesh = make_mesh((2, 2, 2), jax.devices()[:8])
    for slots, chunk, refill_rows, on in ((5, 3, 1, None), (5, 12, 2, None), (8, 12, 1, mesh)):
        if on is not None and kind != "llama":
            continue
        out = generate_continuous(graphdef, params if on is None else jax.device_put(params, replicated(on)), tokens,
                                  mask, jax.random.key(2), slots=slots, max_new_tokens=12, eos_id=EOS, pad_id=PAD,
                                  sampling=sampling, chunk_steps=chunk, refill_rows=refill_rows, mesh=on)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens), err_msg=f"slots={slots}")
        np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(ref.mask))
        np.testing.assert_array_equal(np.asarray(out.lengths), lengths)
        np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5, rtol=0)
        assert int(out.steps) == int(ref.steps)


def test_rows_do_not_depend_on_their_neighbours():
    """A row's completion is a function of (key, its queue index, its prompt): the first rows of a
    longer queue are those of the short queue. The slot occupancy in closed form: 1 with one slot
    (rows one after another); with more slots than rows every row starts at once, so it is
    sum(length - 1) / (slots x (longest - 1)) (a row's first token comes from its prefill)."""
    graphdef, params = model_of("llama")
    tokens, mask = _queue()
    stats = {}
    run = lambda n, slots=1: generate_continuous(graphdef, params, tokens[:n], mask[:n], jax.random.key(7),
                                                 slots=slots, max_new_tokens=8, eos_id=EOS, pad_id=PAD,
                                                 sampling=SamplingParams(temperature=1.0), stats=stats)
    short, long = run(4), run(13)
    np.testing.assert_array_equal(np.asarray(long.tokens)[:4], np.asarray(short.tokens))
    assert float(stats["slot_occupancy"]) == 1.0
    wide = run(13, slots=16)
    np.testing.assert_array_equal(np.asarray(wide.tokens), np.asarray(long.tokens))
    lengths = np.asarray(long.lengths)
    assert lengths.min() < lengths.max()
    np.testing.assert_allclose(float(stats["slot_occupancy"]), (lengths - 1).sum() / (16 * (lengths.max() - 1)),
                               rtol=1e-6)


def test_bad_arguments_are_clear_errors():
    graphdef, params = model_of("llama")
    tokens, mask = _queue(4)
    call = lambda **kw: generate_continuous(graphdef, params, tokens, kw.pop("mask", mask), kw.pop("rng", None),
                                            **{**dict(slots=2, max_new_tokens=4, eos_id=EOS, pad_id=PAD), **kw})
    with pytest.raises(RlftError, match="slots=0"):
        call(slots=0, rng=jax.random.key(0))
    with pytest.raises(RlftError, match="refill_rows=0"):
        call(refill_rows=0, rng=jax.random.key(0))
    with pytest.raises(RlftError, match="rng key is required"):
        call(sampling=SamplingParams(temperature=1.0))
    with pytest.raises(RlftError, match="at least one real token"):
        call(mask=np.zeros_like(mask))
    with pytest.raises(RlftError, match=r"slots=3 must be a multiple of the mesh's \('data', 'fsdp'\) shards \(4\)"):
        call(slots=3, rng=jax.random.key(0), mesh=make_mesh((2, 2, 1), jax.devices()[:4]))


def test_rl_rollouts_on_the_engine_equal_the_static_sampler(tmp_path):
    """rl.rollout_slots=4 with the sampler on 2 devices of its own (mesh.rollout: an engine of 2
    slots on each, the queue split between them): the RL stage samples with the continuous engine
    (spied) and trains exactly as the colocated static sampler (the same tokens, so the same params;
    the sampler's log-probs agree to float32 rounding, and so do the metrics, KL and entropy among
    them, that read them); asynchronous (K = 1), whose rollouts go through the same `sample` as the
    synchronous step's."""
    k = 1
    import json

    from flax import nnx

    from rlft.generate import engine
    from rlft.models import Decoder
    from rlft.parallel.sharding import state_shardings
    from rlft.rl.stage import run_rl_stage
    from tests.pairs_util import random_params
    from tests.test_rl_stage import CFG, TOK, char_reward, records, stage_config

    calls = []
    real = engine.generate_continuous

    def run(workdir, slots):
        mesh = make_mesh((1, 1, 1), jax.devices()[:1])
        sampler = make_mesh((2, 1, 1), jax.devices()[1:3]) if slots else None
        graphdef, host = random_params(lambda: Decoder(CFG, rngs=nnx.Rngs(0)), seed=3)
        cfg = stage_config(algorithm="grpo", epochs=1, minibatches=1, kl=dict(controller="fixed"), steps=3,
                           max_staleness=k, rollout_slots=slots)
        out = run_rl_stage(name="rl", workdir=str(workdir), graphdef=graphdef,
                           params=jax.device_put(host, state_shardings(host, mesh)), prompts=records(),
                           reward_fn=char_reward, cfg=cfg, mesh=mesh, seed=4, eos_id=TOK.eos_token_id,
                           pad_id=TOK.pad_token_id, tokenizer=TOK, rollout_mesh=sampler)
        lines = [json.loads(line) for line in (workdir / "rl" / "metrics.jsonl").read_text().splitlines()]
        return jax.tree.map(np.asarray, out), lines

    import rlft.rl.stage as stage
    stage.generate_continuous = lambda *a, **kw: calls.append(kw["slots"]) or real(*a, **kw)
    try:
        static, static_metrics = run(tmp_path / "static", 0)
        assert not calls
        cont, cont_metrics = run(tmp_path / "continuous", 4)
    finally:
        stage.generate_continuous = real
    assert calls and set(calls) == {4}
    for a, b in zip(jax.tree.leaves(static), jax.tree.leaves(cont)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(static_metrics, cont_metrics):
        assert 0 < b.pop("rollout/slot_occupancy") <= 1
        assert a.keys() == b.keys()
        for n in a:
            np.testing.assert_allclose(a[n], b[n], rtol=1e-4, atol=1e-6, err_msg=n)


class _IdsTokenizer:
    """Decodes ids as their numbers (the evaluation only needs batch_decode)."""

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(map(str, row)) for row in rows]


def test_evaluation_samples_the_same_on_the_engine_and_in_batches(monkeypatch):
    """`sample_policy`: prompt i draws row i's stream whatever the batch size, and a list longer than
    one batch goes through the engine (spied) with the same completions, log-probs, EOS flags and
    training-layout batches (`logprobs_under` reads them)."""
    from rlft.eval import policies

    graphdef, params = model_of("llama")
    tokens, mask = _queue()
    ids = [row[m > 0].tolist() for row, m in zip(tokens, mask)]
    kw = dict(max_new_tokens=10, sampling=SamplingParams(temperature=1.0), seed=4, eos_id=EOS, pad_id=PAD)
    slots = []
    real = policies.generate_continuous
    monkeypatch.setattr(policies, "generate_continuous", lambda *a, **k: slots.append(k["slots"]) or real(*a, **k))
    runs = {"batches of 4": policies.sample_policy(graphdef, params, ids, _IdsTokenizer(), batch_size=4, slots=0, **kw),
            "batches of 6": policies.sample_policy(graphdef, params, ids, _IdsTokenizer(), batch_size=6, slots=0, **kw)}
    assert not slots
    runs["engine"] = policies.sample_policy(graphdef, params, ids, _IdsTokenizer(), batch_size=4, **kw)
    assert slots == [4]  # 13 prompts > one batch of 4: the engine, with a batch's worth of slots
    ref = runs.pop("batches of 4")
    assert len(set(ref.lengths.tolist())) > 1 and ref.ended.any()
    for name, got in runs.items():
        assert got.texts == ref.texts, name
        np.testing.assert_array_equal(got.mask, ref.mask, err_msg=name)
        np.testing.assert_array_equal(got.ended, ref.ended, err_msg=name)
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(policies.logprobs_under(graphdef, params, got), ref.logprobs, atol=1e-4, rtol=0,
                                   err_msg=name)
