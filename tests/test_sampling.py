"""rlft.generate.sampling: greedy parity with transformers' generate, logprobs, distributions, seeds, sharding."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx
from jax.sharding import AxisType

from rlft.errors import RlftError
from rlft.models import Decoder, ModelConfig
from rlft.models.decoder import positions_from_mask
from rlft.models.hf import load_hf_checkpoint
from rlft.parallel.sharding import make_mesh, state_shardings
from rlft.generate.logprobs import SamplingParams, _top_p_keep, sampling_log_probs, sequence_logprobs
from rlft.generate.sampling import Sequences, _sample_jit, completion_mask, sample, sample_sequences

PAD = 3


def _graphdef(cfg: ModelConfig) -> nnx.GraphDef:
    return nnx.graphdef(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))


def _init(cfg: ModelConfig, seed: int, head_scale: float):
    """(graphdef, params), initialised in one jit; lm_head scaled up for peakier distributions."""
    def make():
        model = Decoder(cfg, rngs=nnx.Rngs(seed))
        model.lm_head[...] = model.lm_head[...] * head_scale
        return nnx.state(model)

    return _graphdef(cfg), jax.jit(make)()


def _left_padded(lengths, width, vocab, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(4, vocab, size=(len(lengths), width)).astype(np.int32)
    mask = np.zeros_like(tokens)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1
    tokens[mask == 0] = PAD
    return tokens, mask


@pytest.fixture(scope="module")
def small_model():
    """A 2-layer Llama-layout model (RoPE, GQA), vocab 64: (graphdef, params)."""
    cfg = ModelConfig.llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                            max_positions=64)
    return _init(cfg, seed=1, head_scale=20)


# --- greedy decoding against transformers -----------------------------------------------------

def _hf_generate(torch_model, tokens, mask, new_tokens, eos_id):
    import torch
    import transformers

    config = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False,
                                           eos_token_id=eos_id, pad_token_id=PAD)
    with torch.no_grad():
        out = torch_model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                                   attention_mask=torch.tensor(mask, dtype=torch.long),
                                   generation_config=config)
    return out[:, tokens.shape[1]:].numpy()


def _until_eos(row, eos_id):
    row = list(row)
    return row[: row.index(eos_id) + 1] if eos_id in row else row


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_matches_transformers_generate(hf_checkpoints, name):
    path, torch_model = hf_checkpoints[name]
    cfg, params = load_hf_checkpoint(path)
    graphdef = _graphdef(cfg)
    new_tokens, width = 12, 9
    tokens, mask = _left_padded([1, 9, 5, 3], width, cfg.vocab_size)  # shortest and longest prompts

    def check(eos_id):
        ref = _hf_generate(torch_model, tokens, mask, new_tokens, eos_id=eos_id)
        out = sample(graphdef, params, tokens, mask, None, max_new_tokens=new_tokens, eos_id=eos_id,
                     pad_id=PAD, sampling=SamplingParams(temperature=0.0))
        got, got_mask = np.asarray(out.tokens), np.asarray(out.mask)
        for row in range(len(tokens)):
            expected = _until_eos(ref[row], eos_id)
            n = len(expected)
            assert got[row, :n].tolist() == expected, (row, got[row], ref[row])
            assert got_mask[row].tolist() == [1] * n + [0] * (new_tokens - n)
            assert (got[row, n:] == PAD).all() and int(out.lengths[row]) == n
        return got, got_mask

    # The checkpoint's EOS (id 1), then a token that greedy decoding produces early in a long row.
    got, got_mask = check(1)
    longest = int(np.argmax(got_mask.sum(-1)))
    eos_id = int(got[longest, 3])
    _, got_mask = check(eos_id)
    assert got_mask[longest].sum() <= 4  # that row now stops early


# --- logprobs ---------------------------------------------------------------------------------

SETTINGS = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.8),
            SamplingParams(temperature=1.3, top_k=10, top_p=0.7)]
EOS = 5


def _sample8(small_model, key, sampling=SETTINGS[-1], eos_id=EOS, **kw):
    """8 left-padded prompts (lengths 1..6), 12 new tokens: one compile shared by several tests."""
    graphdef, params = small_model
    tokens, mask = _left_padded([3, 6, 1, 6, 2, 5, 4, 6], 6, 64, seed=2)
    out = sample(graphdef, params, tokens, mask, key, max_new_tokens=12, eos_id=eos_id, pad_id=PAD,
                 sampling=sampling, **kw)
    return tokens, mask, out


def _recompute(graphdef, params, tokens, mask, out, sampling):
    """Completion log-probs [batch, n] by one full forward over the training layout (masked)."""
    seqs = Sequences.from_sample(jnp.asarray(tokens), jnp.asarray(mask), out)
    logp = sequence_logprobs(graphdef, params, seqs.tokens, seqs.positions, seqs.segment_ids,
                             start=seqs.prompt_length, sampling=sampling)
    return jnp.where(seqs.completion_mask > 0, logp, 0.0)


def test_generation_stops_at_any_of_several_eos_ids(small_model):
    """eos_id=(a, b) (e.g. Llama-3's two): each row ends at its first a or b, the same draws as free
    running (the same key) before that."""
    free = np.asarray(_sample8(small_model, jax.random.key(0), SETTINGS[-1], eos_id=-1)[2].tokens)
    ids = (int(free[0, 2]), int(free[1, 4]))
    out = _sample8(small_model, jax.random.key(0), SETTINGS[-1], eos_id=ids)[2]
    ends = [next((t for t, x in enumerate(row) if x in ids), len(row)) for row in free]
    expected = np.array([[t <= end for t in range(free.shape[1])] for end in ends], np.int32)
    assert min(ends) < free.shape[1] and ends[0] <= 2 and ends[1] <= 4
    np.testing.assert_array_equal(np.asarray(out.mask), expected)
    np.testing.assert_array_equal(np.asarray(out.tokens)[expected > 0], free[expected > 0])


@pytest.mark.parametrize("sampling", SETTINGS, ids=str)
def test_logprobs_match_full_forward(small_model, sampling):
    graphdef, params = small_model
    # EOS := the 3rd token of row 0 without EOS, so that row 0 stops there (same key, same draws).
    eos_id = int(_sample8(small_model, jax.random.key(0), sampling, eos_id=-1)[2].tokens[0, 2])
    tokens, mask, out = _sample8(small_model, jax.random.key(0), sampling, eos_id=eos_id)
    recomputed = _recompute(graphdef, params, tokens, mask, out, sampling)
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(recomputed), atol=1e-5, rtol=0)

    got, got_mask, lp = map(np.asarray, (out.tokens, out.mask, out.logprobs))
    assert got.dtype == np.int32 and lp.dtype == np.float32 and got.shape == (8, 12)
    np.testing.assert_array_equal(got_mask, np.asarray(completion_mask(out.tokens, eos_id)))
    np.testing.assert_array_equal(np.asarray(out.lengths), got_mask.sum(-1))
    assert (got[got_mask == 0] == PAD).all() and (lp[got_mask == 0] == 0).all()
    assert np.isfinite(lp).all() and (lp[got_mask == 1] <= 0).all()
    assert got_mask[0].sum() <= 3 and got[0, got_mask[0].sum() - 1] == eos_id


def test_sequence_logprobs_gradient_is_finite(small_model):
    graphdef, params = small_model
    sampling = SETTINGS[-1]  # top-k and top-p: -inf logits must not leak NaNs into the gradient
    tokens, mask, out = _sample8(small_model, jax.random.key(0), sampling)
    loss = lambda p: _recompute(graphdef, p, tokens, mask, out, sampling).sum()
    grads = jax.jit(jax.grad(loss))(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert any(bool((g != 0).any()) for g in jax.tree.leaves(grads))


def test_sample_sequences_runs_inside_a_jitted_rollout(small_model):
    """The public sampler traced inside a user's jit == the compiled entry point; layout checked."""
    graphdef, params = small_model
    tokens, mask = _left_padded([3, 6, 1, 6], 6, 64, seed=5)
    sampling = SamplingParams(temperature=0.9)

    @jax.jit
    def rollout(params, tokens, mask, key):
        out = sample_sequences(graphdef, params, tokens, mask, key, 5, PAD, max_new_tokens=7,
                               sampling=sampling)
        return Sequences.from_sample(tokens, mask, out)

    seqs = rollout(params, tokens, mask, jax.random.key(3))
    ref = sample(graphdef, params, tokens, mask, jax.random.key(3), max_new_tokens=7, eos_id=5,
                 pad_id=PAD, sampling=sampling)
    np.testing.assert_array_equal(np.asarray(seqs.tokens[:, 6:]), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(seqs.tokens[:, :6]), tokens)
    np.testing.assert_array_equal(np.asarray(seqs.completion_mask), np.asarray(ref.mask))
    np.testing.assert_allclose(np.asarray(seqs.logprobs), np.asarray(ref.logprobs), atol=1e-6)
    assert seqs.prompt_length == 6
    segs, pos = np.asarray(seqs.segment_ids), np.asarray(seqs.positions)
    np.testing.assert_array_equal(segs, np.concatenate([mask, np.asarray(ref.mask)], axis=1))
    for row in range(4):  # positions count the real tokens: prompt 0..p-1, then p, p+1, ...
        real = np.flatnonzero(segs[row])
        np.testing.assert_array_equal(pos[row, real], np.arange(len(real)))


def test_completion_mask_includes_first_eos_only():
    tokens = jnp.array([[4, 2, 7, 2], [2, 2, 2, 2], [4, 4, 4, 4]])
    np.testing.assert_array_equal(completion_mask(tokens, 2),
                                  [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])


def test_top_p_bisection_matches_sorted_reference():
    logits = np.random.RandomState(0).randn(64, 50).astype(np.float32) * 3
    for top_p in (0.05, 0.3, 0.9, 0.999):
        keep = np.asarray(_top_p_keep(jnp.asarray(logits), top_p))
        order = np.argsort(-logits, axis=-1)
        probs = np.take_along_axis(np.asarray(jax.nn.softmax(logits)), order, -1)
        before = np.cumsum(probs, -1) - probs
        expected = np.zeros_like(keep)
        np.put_along_axis(expected, order, before < top_p, -1)
        np.testing.assert_array_equal(keep, expected, err_msg=f"top_p={top_p}")


# --- distributions ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vocab8_model():
    """1 layer, vocab 8, with peaky logits so that top-k / top-p cut something."""
    cfg = ModelConfig.llama(vocab_size=8, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                            max_positions=32)
    return _init(cfg, seed=3, head_scale=40)


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.6), SamplingParams(temperature=1.0, top_k=3),
                                      SamplingParams(temperature=1.5, top_p=0.75)], ids=str)
def test_first_token_distribution(vocab8_model, sampling):
    graphdef, params = vocab8_model
    n = 4096
    prompt = np.array([[1, 6, 2]], np.int32)
    ones = np.ones_like(prompt)
    logits = nnx.merge(graphdef, params)(prompt, positions_from_mask(ones), ones)[0, -1]
    probs = np.exp(np.asarray(sampling_log_probs(logits, sampling), np.float64))
    out = sample(graphdef, params, np.repeat(prompt, n, 0), np.repeat(ones, n, 0), jax.random.key(7),
                 max_new_tokens=1, eos_id=-1, pad_id=0, sampling=sampling)
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=8)
    kept = probs > 0
    if sampling.top_k or sampling.top_p < 1:
        assert 1 <= kept.sum() < 8, probs  # the truncation removed something
    assert counts[~kept].sum() == 0
    assert scipy.stats.chisquare(counts[kept], probs[kept] / probs[kept].sum() * n).pvalue > 1e-3
    np.testing.assert_allclose(np.asarray(out.logprobs[:, 0]), np.log(probs[np.asarray(out.tokens[:, 0])]),
                               atol=1e-5)


def test_loop_stops_once_every_row_is_done(vocab8_model):
    """Rows that finished stop changing, and the decode loop exits when the last row emits EOS."""
    graphdef, params = vocab8_model
    tokens, mask = _left_padded([3, 6, 1, 6, 2, 5, 4, 6], 6, 8, seed=2)
    run = lambda eos_id: sample(graphdef, params, tokens, mask, jax.random.key(11), max_new_tokens=24,
                                eos_id=eos_id, pad_id=0, sampling=SamplingParams(temperature=1.5))
    free = run(-1)
    assert int(free.steps) == 24 and (np.asarray(free.lengths) == 24).all()
    drawn = np.asarray(free.tokens)
    # EOS := the token whose first occurrence, taken in the row where it comes latest, is earliest.
    last_first = {v: max(int(np.argmax(row == v)) if (row == v).any() else 99 for row in drawn)
                  for v in range(8)}
    eos_id = min(last_first, key=last_first.get)
    assert last_first[eos_id] < 20
    out = run(eos_id)
    lengths = np.asarray(out.lengths)
    assert int(out.steps) == lengths.max() == last_first[eos_id] + 1  # stopped early
    for row, n in zip(range(8), lengths):  # same draws up to each row's EOS, then padding
        np.testing.assert_array_equal(np.asarray(out.tokens)[row, :n], drawn[row, :n])
        assert drawn[row, n - 1] == eos_id and (np.asarray(out.tokens)[row, n:] == 0).all()


# --- seeds and sharding -----------------------------------------------------------------------

def _mesh(shape, axes):
    """A mesh with Auto axes (as rlft.parallel.sharding.make_mesh builds them) over 8 CPU devices."""
    return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=jax.devices()[:8])


def test_same_seed_same_samples_different_seed_different(small_model):
    a, b, c = (_sample8(small_model, jax.random.key(seed))[2] for seed in (1, 1, 2))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()


@pytest.mark.parametrize("shape,axes", [((8,), ("data",)), ((2, 4), ("data", "fsdp"))])
def test_sharded_equals_unsharded(small_model, shape, axes):
    assert jax.device_count() >= 8, "needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
    mesh = _mesh(shape, axes)
    _, params = small_model
    replicated = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.P()), params)
    ref = _sample8(small_model, jax.random.key(4))[2]
    out = _sample8(small_model, jax.random.key(4), mesh=mesh, param_shardings=replicated)[2]
    assert out.tokens.sharding.spec[0] in (axes, axes[0])
    assert len(out.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5, rtol=0)


def test_training_mesh_with_sharded_params_and_cache_equals_unsharded(small_model):
    """A (data 2, fsdp 2, tensor 2) mesh as training uses it: params sharded by the logical rules
    (FSDP over embed, heads/kv_heads/mlp/vocab over tensor), the KV cache over batch and kv_heads."""
    mesh = make_mesh((2, 2, 2))
    graphdef, params = small_model
    shardings = state_shardings(params, mesh)
    assert any("tensor" in str(s.spec) for s in jax.tree.leaves(shardings))
    ref = _sample8(small_model, jax.random.key(5))[2]
    out = _sample8(small_model, jax.random.key(5), mesh=mesh, param_shardings=shardings)[2]
    assert out.tokens.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5, rtol=0)
    # The cache lives inside the jit: its k [8, KV 2, 18 slots, Dh 8] and v [8, 2, 8, 18] are
    # constrained over batch and kv_heads, as KVCache.K_AXES / V_AXES and RULES say.
    tokens = np.ones((8, 6), np.int32)
    text = _sample_jit.lower(graphdef, jax.device_put(params, shardings), tokens, tokens,
                             jax.random.key(0), np.int32(EOS), np.int32(PAD), max_new_tokens=12,
                             sampling=SamplingParams(), mesh=mesh).as_text()
    for shape in ("8x2x18x8xf32", "8x2x8x18xf32"):
        assert f'[{{"data", "fsdp"}}, {{"tensor"}}, {{}}, {{}}]> : tensor<{shape}>' in text, shape


def test_decode_loop_does_not_copy_the_cache(small_model):
    """The cache layouts are chosen so that XLA updates them in place and reads them without a
    transpose: no copy or transpose of a cache-shaped array may run inside the decode loop (the
    first layout, [batch, length, kv_heads, head_dim], copied every layer's cache twice per step)."""
    graphdef, params = small_model
    tokens = np.ones((8, 6), np.int32)
    text = _sample_jit.lower(graphdef, params, tokens, tokens, jax.random.key(0), np.int32(EOS),
                             np.int32(PAD), max_new_tokens=12, sampling=SamplingParams(),
                             mesh=None).compile().as_text()
    cache_shaped = [line for line in text.splitlines()
                    if re.search(r"= f32\[8,2,(18,8|8,18)\]", line) and "while/body" in line]
    assert any("dynamic-update-slice" in line for line in cache_shaped)  # the loop writes the cache
    copies = [line for line in cache_shaped if re.search(r"\b(copy|transpose)", line.split("=")[0] +
                                                         line.split("=")[1].split("(")[0])]
    assert not copies, copies


def test_mesh_mistakes_are_clear_errors(small_model):
    graphdef, params = small_model
    prompts = np.ones((3, 4), np.int32)
    with pytest.raises(RlftError, match="not divisible"):
        sample(graphdef, params, prompts, prompts, jax.random.key(0), max_new_tokens=2, eos_id=1, pad_id=0,
               mesh=_mesh((8,), ("data",)))
    explicit = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:8])
    with pytest.raises(RlftError, match="Auto"):
        sample(graphdef, params, np.ones((8, 4), np.int32), np.ones((8, 4)), jax.random.key(0),
               max_new_tokens=2, eos_id=1, pad_id=0, mesh=explicit)


# --- user mistakes ----------------------------------------------------------------------------

def test_bad_settings_are_clear_errors(small_model):
    for bad in ({"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(RlftError, match="sampling"):
            SamplingParams(**bad)
    with pytest.raises(RlftError, match="rng"):
        _sample8(small_model, None)


# --- the `rlft sample` command ----------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint_with_tokenizer(tmp_path_factory):
    import torch
    import transformers

    from rlft.data.tokenizer import train_tokenizer

    path = str(tmp_path_factory.mktemp("gpt2_tok"))
    tokenizer = train_tokenizer([f"the film was {w} and {w}." for w in ("good", "bad", "long")] * 5,
                                300, path)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2,
                                     n_positions=32, eos_token_id=tokenizer.eos_token_id,
                                     bos_token_id=tokenizer.eos_token_id)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def test_sample_command_prints_completions(checkpoint_with_tokenizer, capsys):
    from rlft.cli.sample import sample_command

    args = [checkpoint_with_tokenizer, "--prompt", "the film was", "--prompt", "bad",
            "--max-new-tokens", "5", "--temperature", "0.8", "--top-k", "20", "--seed", "3"]
    assert sample_command(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("--- sample") == 2 and "\nthe film was" in printed and "\nbad" in printed
    assert sample_command(args) == 0
    assert capsys.readouterr().out == printed  # same seed, same text


def test_model_generate_on_a_mesh_equals_one_device(checkpoint_with_tokenizer):
    import rlft

    model = rlft.load(checkpoint_with_tokenizer)
    prompts = ["the film was", "bad", "good and", "long", "the", "was good", "film", "and bad"]
    kw = dict(max_new_tokens=6, temperature=0.9, top_k=20, seed=5)
    ref = model.generate(prompts, **kw)
    out = model.generate(prompts, mesh=make_mesh((-1, 1, 1)), **kw)  # 8 data shards
    assert out["text"] == ref["text"]
    np.testing.assert_array_equal(out["tokens"], ref["tokens"])
    np.testing.assert_allclose(out["logprobs"], ref["logprobs"], atol=1e-5, rtol=0)
    with pytest.raises(RlftError, match="not divisible"):
        model.generate(prompts[:3], mesh=make_mesh((-1, 1, 1)), **kw)


def test_model_generate_of_many_prompts_runs_the_continuous_engine_with_the_same_results(
        checkpoint_with_tokenizer, monkeypatch):
    """More than AUTO_SLOTS prompts go through the continuous-batching engine (spied), and the
    completions are those of one static batch (slots=0), of an explicit slot count and of engines
    on 4 devices (the queue split over a mesh)."""
    import rlft
    from rlft import api
    from rlft.generate import engine

    model = rlft.load(checkpoint_with_tokenizer)
    monkeypatch.setattr(api, "AUTO_SLOTS", 8)  # 64 in use; fewer here, for the test's compile time
    prompts = [f"the film was {w}" if i % 3 else w for i, w in enumerate(["good", "bad", "long"] * 4)]
    assert len(prompts) > api.AUTO_SLOTS
    calls = []
    real = engine.generate_continuous
    monkeypatch.setattr(engine, "generate_continuous", lambda *a, **kw: calls.append(kw["slots"]) or real(*a, **kw))
    kw = dict(max_new_tokens=6, temperature=1.0, seed=3)
    auto, static, three = model.generate(prompts, **kw), model.generate(prompts, slots=0, **kw), \
        model.generate(prompts, slots=3, **kw)
    assert calls == [api.AUTO_SLOTS, 3]
    assert auto["text"] == static["text"] == three["text"]
    np.testing.assert_array_equal(auto["tokens"], static["tokens"])
    np.testing.assert_allclose(three["logprobs"], static["logprobs"], atol=1e-5, rtol=0)
    with pytest.raises(RlftError, match="slots"):
        model.generate(prompts[:8], slots=-1, **kw)
    with pytest.raises(RlftError, match=r"generate\(slots=4\): .*multiple of the mesh"):
        model.generate(prompts[:8], slots=4, mesh=make_mesh((-1, 1, 1)), **kw)
    split = model.generate(prompts, slots=8, mesh=make_mesh((2, 2, 1), jax.devices()[:4]), **kw)
    assert split["text"] == static["text"]
    np.testing.assert_allclose(split["logprobs"], static["logprobs"], atol=1e-5, rtol=0)


def test_sample_command_errors(checkpoint_with_tokenizer, tmp_path):
    from rlft.cli.main import main
    from rlft.cli.sample import sample_command

    path = checkpoint_with_tokenizer
    cases = [([str(tmp_path / "nowhere"), "--prompt", "a"], "nowhere"),
             ([path], "--prompt"),
             ([path, "--prompt", "a", "--top-p", "2"], "--top-p"),
             ([path, "--prompt", "a", "--temperature", "-1"], "--temperature"),
             ([path, "--prompt", "a", "--max-new-tokens", "0"], "max-new-tokens"),
             ([path, "--prompt", "a", "--temperature", "hot"], "temperature"),
             ([path, "--prompt", "a", "--max-new-tokens", "40"], "max_positions"),
             ([path, "--prompt", "a", "--bogus"], "bogus")]
    for args, match in cases:
        with pytest.raises(RlftError, match=match):
            sample_command(args)
    assert main(["sample", path, "--prompt", "a", "--top-k", "-1"]) == 2


# --- shared prompt prefill ------------------------------------------------------------------------

def _groups(group):
    """4 left-padded prompts (lengths 3, 6, 1, 5), each repeated `group` times (prompt-major rows)."""
    tokens, mask = _left_padded([3, 6, 1, 5], 6, 64, seed=7)
    return np.repeat(tokens, group, axis=0), np.repeat(mask, group, axis=0)


@pytest.mark.parametrize("sampling,mesh_shape", [
    (SamplingParams(temperature=0.8, top_k=10, top_p=0.9), None), (SamplingParams(temperature=1.0), (2, 1, 1)),
    (SamplingParams(temperature=0.0), (2, 1, 1))], ids=["truncated-one-device", "t1-data2", "greedy-data2"])
def test_shared_prefill_gives_the_same_completions(small_model, sampling, mesh_shape):
    """group_size=4 prefills each prompt once: tokens and logprobs are those of prefilling every
    row (the same key), on one device and on a data-parallel mesh."""
    graphdef, params = small_model
    tokens, mask = _groups(4)
    mesh = None if mesh_shape is None else make_mesh(mesh_shape, jax.devices()[:2])
    run = lambda group: sample(graphdef, params, tokens, mask, jax.random.key(11), max_new_tokens=10, eos_id=EOS,
                               pad_id=PAD, sampling=sampling, mesh=mesh, group_size=group)
    shared, each = run(4), run(1)
    np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(each.tokens))
    np.testing.assert_array_equal(np.asarray(shared.mask), np.asarray(each.mask))
    np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(each.logprobs), atol=1e-6, rtol=0)
    if not sampling.greedy:  # the copies of a prompt draw different completions
        assert len({tuple(row) for row in np.asarray(shared.tokens)[:4].tolist()}) > 1


def test_shared_prefill_divides_prefill_flops_by_the_group():
    """From the compiled programs' cost analysis: prefilling 16 rows as 4 groups of 4 costs a quarter
    of prefilling every row (64-token prompts: the prefill is nearly all per-row matmuls)."""
    from rlft.generate.sampling import prefill

    cfg = ModelConfig.llama(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                            max_positions=128)
    graphdef, params = _init(cfg, seed=0, head_scale=1.0)
    tokens = np.ones((16, 64), np.int32)

    def flops(group):
        fn = jax.jit(lambda p, t, m: prefill(nnx.merge(graphdef, p), t, m, 80, group))
        return fn.lower(params, tokens, tokens).compile().cost_analysis()["flops"]

    ratio = flops(1) / flops(4)
    assert 3.6 < ratio <= 4.05, ratio


def test_group_size_must_describe_the_rows(small_model):
    graphdef, params = small_model
    tokens, mask = _groups(2)
    with pytest.raises(RlftError, match="group_size=3 must be >= 1 and divide"):
        sample(graphdef, params, tokens, mask, jax.random.key(0), max_new_tokens=2, eos_id=EOS, pad_id=PAD,
               group_size=3)
    with pytest.raises(RlftError, match="each group of 4 consecutive rows to hold one prompt"):
        sample(graphdef, params, tokens, mask, jax.random.key(0), max_new_tokens=2, eos_id=EOS, pad_id=PAD,
               group_size=4)
