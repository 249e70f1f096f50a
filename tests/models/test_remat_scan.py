"""Big-model options: remat policies and scanned layers give the unrolled model's numbers.

Remat (ModelConfig.remat) must not change the loss or gradients, only what the backward keeps;
the scanned layout (ModelConfig.scan_layers) must give the same logits, gradients, samples and
Hugging Face tensors as the unrolled one, with parameters converted between layouts by name.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

import rlft
from rlft.train.checkpoints import save_model_config
from rlft.errors import RlftError
from rlft.models import Decoder, ModelConfig
from rlft.models.hf import hf_tensors_from_params, params_from_hf_tensors, read_safetensors, save_hf_checkpoint
from rlft.models.params import fill_params, flatten_params, stack_layers, unstack_layers
from rlft.objectives.sft import sft_loss
from rlft.generate.sampling import _sample_jit, sample
from rlft.generate.logprobs import SamplingParams
from rlft.parallel.sharding import make_mesh, state_shardings
from rlft.train.steps import decay_mask
from tests.conftest import tiny_hf_configs

CONFIGS = {
    "gpt2": ModelConfig.gpt2(vocab_size=96, d_model=32, n_layers=3, n_heads=4, max_positions=64),
    "llama": ModelConfig.llama(vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48,
                               max_positions=64),
}


def _abstract(cfg: ModelConfig) -> nnx.State:
    return nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))


def _graphdef(cfg: ModelConfig) -> nnx.GraphDef:
    return nnx.graphdef(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))


def _model(cfg: ModelConfig, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params), initialised eagerly: its per-op compilations are shared by every test,
    while a jitted init is one more slow (random-number heavy) compilation per config."""
    return nnx.split(Decoder(cfg, rngs=nnx.Rngs(seed)))


def _logits(graphdef: nnx.GraphDef, params: nnx.State, batch: dict) -> jax.Array:
    """float32 [batch, length, vocab] from one jitted forward."""
    return jax.jit(lambda p, b: nnx.merge(graphdef, p)(b["tokens"], b["positions"], b["segment_ids"]))(
        params, batch)


def _batch(rows: int = 3, length: int = 12, vocab: int = 96) -> dict:
    """Two packed examples in row 0, right padding in row 2: every masking case at once."""
    rng = np.random.RandomState(0)
    segments = np.ones((rows, length), np.int32)
    segments[0, 7:] = 2
    segments[2, 9:] = 0
    positions = np.zeros_like(segments)
    for r in range(rows):
        for s in set(segments[r]) - {0}:
            positions[r, segments[r] == s] = np.arange(np.sum(segments[r] == s))
    return dict(tokens=jnp.asarray(rng.randint(0, vocab, (rows, length)), jnp.int32),
                positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments),
                loss_mask=jnp.asarray((segments > 0).astype(np.float32)))


def _loss_and_grads(graphdef, params, batch):
    loss = lambda p: sft_loss(graphdef, p, batch)[0]
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), flatten_params(grads)


def _assert_close(a: dict, b: dict, atol: float):
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), atol=atol, rtol=1e-5,
                                   err_msg=name)


# --- config ---------------------------------------------------------------------------------


def test_config_fields_round_trip_and_old_dicts_load():
    cfg = CONFIGS["llama"].replace(remat="dots", scan_layers=True)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = {k: v for k, v in CONFIGS["llama"].to_dict().items() if k not in ("remat", "scan_layers")}
    assert ModelConfig.from_dict(old) == CONFIGS["llama"]
    with pytest.raises(RlftError, match="model.remat='everything': expected one of none, full, dots"):
        CONFIGS["llama"].replace(remat="everything")
    with pytest.raises(RlftError, match="scan_layers"):
        CONFIGS["llama"].replace(scan_layers="yes")


def test_old_model_config_json_is_the_same_model(tmp_path):
    """A run directory written before the new fields existed resumes under the defaults."""
    cfg = CONFIGS["gpt2"]
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("remat", "scan_layers")}
    (tmp_path / "model_config.json").write_text(json.dumps(old))
    save_model_config(tmp_path, cfg)  # no "describes another model"
    with pytest.raises(RlftError, match="scan_layers"):
        save_model_config(tmp_path, cfg.replace(scan_layers=True))


# --- remat ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_remat_policies_keep_loss_and_gradients(scan):
    cfg = CONFIGS["llama"].replace(scan_layers=scan)
    batch = _batch()
    params = _model(cfg)[1]
    results, residuals = {}, {}
    for policy in ("none", "full", "dots"):
        graphdef = _graphdef(cfg.replace(remat=policy))
        results[policy] = _loss_and_grads(graphdef, params, batch)
        # What the backward keeps: every activation > matmul outputs only > block inputs only.
        vjp = jax.eval_shape(lambda p: jax.vjp(lambda q: sft_loss(graphdef, q, batch)[0], p)[1], params)
        residuals[policy] = sum(x.size for x in jax.tree.leaves(vjp))
    loss, grads = results["none"]
    for policy in ("full", "dots"):
        assert results[policy][0] == pytest.approx(loss, rel=1e-6)
        _assert_close(results[policy][1], grads, atol=1e-6)
    assert residuals["none"] > residuals["dots"] > residuals["full"], residuals


# --- scanned layout -------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(CONFIGS))
def test_scanned_equals_unrolled(family):
    cfg = CONFIGS[family]
    scanned_cfg = cfg.replace(scan_layers=True, remat="full")
    graphdef, params = _model(cfg)
    scanned_graphdef, scanned = _model(scanned_cfg)
    # The same seed initialises the same per-layer values, and conversion by name agrees with it.
    converted = fill_params(_abstract(scanned_cfg), flatten_params(params), "unrolled")
    _assert_close(flatten_params(converted), flatten_params(scanned), atol=0)
    assert flatten_params(scanned)["layers.attn.q"].shape[0] == cfg.n_layers
    back = fill_params(_abstract(cfg), flatten_params(scanned), "scanned")
    _assert_close(flatten_params(back), flatten_params(params), atol=0)

    batch = _batch()
    np.testing.assert_allclose(_logits(scanned_graphdef, scanned, batch), _logits(graphdef, params, batch),
                               atol=2e-5, rtol=0)
    loss, grads = _loss_and_grads(graphdef, params, batch)
    scanned_loss, scanned_grads = _loss_and_grads(scanned_graphdef, scanned, batch)
    assert scanned_loss == pytest.approx(loss, rel=1e-5)
    _assert_close(unstack_layers(scanned_grads), grads, atol=1e-5)


def test_warm_start_converts_an_in_memory_state_between_layouts():
    from rlft.train.warm_start import decoder_state

    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, jax.devices()[:2])
    cfg = CONFIGS["llama"]
    _, params = _model(cfg)
    scanned = decoder_state(cfg.replace(scan_layers=True), params, mesh)
    assert scanned["layers"]["attn"]["q"][...].shape[0] == cfg.n_layers
    _assert_close(unstack_layers(flatten_params(scanned)), flatten_params(params), atol=0)
    back = decoder_state(cfg, scanned, mesh)
    _assert_close(flatten_params(back), flatten_params(params), atol=0)
    with pytest.raises(RlftError, match="warm-start params: parameters do not match the model config"):
        decoder_state(cfg.replace(n_layers=2), params, mesh)


def test_layer_names_convert_both_ways_and_gaps_are_errors():
    values = {"embed": np.zeros(2), "backbone.layers.0.mlp.up": np.zeros(3),
              "backbone.layers.1.mlp.up": np.ones(3)}
    stacked = stack_layers(values)
    assert set(stacked) == {"embed", "backbone.layers.mlp.up"}
    assert stacked["backbone.layers.mlp.up"].shape == (2, 3)
    assert {k: v.tolist() for k, v in unstack_layers(stacked).items()} == \
        {k: v.tolist() for k, v in values.items()}
    with pytest.raises(RlftError, match=r"layers \[0, 2\] are not numbered 0..1"):
        stack_layers({"layers.0.x": np.zeros(1), "layers.2.x": np.zeros(1)})


def test_scanned_params_shard_with_an_unsharded_layer_axis():
    cfg = CONFIGS["llama"].replace(scan_layers=True)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = state_shardings(_abstract(cfg), mesh)
    assert shardings["layers"]["attn"]["q"].get_value().spec == P(None, "fsdp", "tensor", None)
    assert shardings["layers"]["mlp"]["down"].get_value().spec == P(None, "tensor", "fsdp")
    # Weight decay still skips stacked norms and biases (they are 2-D now).
    decay = {".".join(map(str, path)): v.get_value() for path, v in
             nnx.to_flat_state(decay_mask(_model(CONFIGS["gpt2"].replace(scan_layers=True))[1]))}
    assert decay["layers.attn.q"] and not decay["layers.attn.q_bias"] and not decay["layers.attn_norm.scale"]


def test_greedy_sampling_scanned_equals_unrolled():
    cfg = CONFIGS["llama"]
    graphdef, params = _model(cfg, seed=1)
    scanned_graphdef, _ = _model(cfg.replace(scan_layers=True), seed=1)
    scanned = fill_params(_abstract(cfg.replace(scan_layers=True)), flatten_params(params), "unrolled")
    prompts = np.full((4, 6), 3, np.int32)
    mask = np.zeros_like(prompts)
    for row, n in enumerate((6, 3, 1, 5)):  # left-padded
        prompts[row, 6 - n:] = np.arange(10 + row, 10 + row + n)
        mask[row, 6 - n:] = 1
    kw = dict(max_new_tokens=10, eos_id=1, pad_id=3, sampling=SamplingParams(temperature=0.0))
    a = sample(graphdef, params, prompts, mask, jax.random.key(0), **kw)
    b = sample(scanned_graphdef, scanned, prompts, mask, jax.random.key(0), **kw)
    np.testing.assert_array_equal(b.tokens, a.tokens)
    np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-5)


def test_scanned_decode_updates_the_stacked_cache_in_place():
    """The scanned decode carries the [layers, ...] cache and writes each layer's slots with a
    dynamic-update-slice: no copy or transpose of a whole stacked cache inside the decode loop."""
    cfg = CONFIGS["llama"].replace(scan_layers=True)
    graphdef, params = _model(cfg)
    tokens = np.ones((8, 6), np.int32)
    text = _sample_jit.lower(graphdef, params, tokens, tokens, jax.random.key(0), np.int32(1),
                             np.int32(3), max_new_tokens=12, sampling=SamplingParams(),
                             mesh=None).compile().as_text()
    stacked = [line for line in text.splitlines()
               if re.search(r"= f32\[3,8,2,(18,8|8,18)\]", line) and "while/body" in line]
    assert any("dynamic-update-slice" in line for line in stacked)
    copies = [line for line in stacked if re.search(r"\b(copy|transpose)", line.split("=")[0] +
                                                     line.split("=")[1].split("(")[0])]
    assert not copies, copies


# --- Hugging Face ---------------------------------------------------------------------------


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("name", list(tiny_hf_configs()))
def test_hf_import_into_scanned_model_and_export_round_trip(hf_checkpoints, name, tmp_path):
    import transformers

    path, torch_model = hf_checkpoints[name]
    cfg = rlft.load(path).config.replace(scan_layers=True)
    tensors = read_safetensors(path)
    params = params_from_hf_tensors(cfg, tensors, path)
    assert flatten_params(params)["layers.mlp_norm.scale"].shape == (cfg.n_layers, cfg.d_model)
    ids = np.random.RandomState(0).randint(2, 96, size=(2, 10))
    ours = _logits(_graphdef(cfg), params, dict(tokens=jnp.asarray(ids), segment_ids=jnp.ones(ids.shape, jnp.int32),
                                                positions=jnp.broadcast_to(jnp.arange(10), ids.shape)))
    np.testing.assert_allclose(ours, _torch_logits(torch_model, ids), atol=1e-4, rtol=0)

    exported = hf_tensors_from_params(cfg, params)
    ignorable = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
    kept = {k for k in tensors if not k.endswith(ignorable) and not (k == "lm_head.weight" and cfg.tie_embeddings)}
    assert set(exported) == kept
    for k in kept:
        np.testing.assert_array_equal(exported[k], tensors[k].astype(np.float32), err_msg=k)
    save_hf_checkpoint(cfg, params, str(tmp_path / "out"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(_torch_logits(reloaded, ids), ours, atol=1e-4, rtol=0)
