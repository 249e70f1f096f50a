"""Mesh rules: sharded forward == single-device forward; parameters carry the ruled shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rlft.errors import RlftError
from rlft.models import Decoder, ModelConfig, ScalarModel, positions_from_mask
from rlft.models.params import flatten_params
from rlft.parallel.sharding import make_mesh, shard_batch, sharded_init, state_shardings, RULES, logical_to_spec

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
CONFIGS = {
    "gpt2": ModelConfig.gpt2(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_positions=32),
    "llama": ModelConfig.llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48),
}


def _batch():
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 64, (8, 16)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[::3, :5] = 0
    return tokens, np.asarray(positions_from_mask(mask)), mask


@pytest.fixture(scope="module")
def reference():
    out = {}
    for name, cfg in CONFIGS.items():
        graphdef, params = sharded_init(lambda cfg=cfg: Decoder(cfg, rngs=nnx.Rngs(0)),
                                        make_mesh((1, 1, 1), jax.devices()[:1]))
        forward = jax.jit(lambda p, b: nnx.merge(graphdef, p)(*b))
        out[name] = (graphdef, params, np.asarray(forward(params, _batch())))
    return out


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("family", list(CONFIGS))
def test_sharded_forward_equals_single_device(reference, family, shape):
    assert len(jax.devices()) == 8
    cfg = CONFIGS[family]
    mesh = make_mesh(shape)
    graphdef, params = sharded_init(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), mesh)
    _, ref_params, ref_logits = reference[family]
    for name, value in flatten_params(params).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flatten_params(ref_params)[name]))
    batch = shard_batch(_batch(), mesh)
    logits = jax.jit(lambda p, b: nnx.merge(graphdef, p)(*b))(params, batch)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-5, rtol=0)
    _check_ruled_shardings(params, mesh, family)


def _check_ruled_shardings(params, mesh, family):
    """Spot checks by hand, then: every parameter carries what the rules derive from its axes."""
    q = params["layers"][0]["attn"]["q"]
    assert q.get_metadata()["logical_axes"] == ("embed", "heads", "head_dim")
    assert q[...].sharding == NamedSharding(mesh, P("fsdp", "tensor", None))
    assert params["embed"][...].sharding == NamedSharding(mesh, P("tensor", "fsdp"))
    assert params["layers"][0]["mlp"]["down"][...].sharding == NamedSharding(mesh, P("tensor", "fsdp"))
    assert params["final_norm"]["scale"][...].sharding == NamedSharding(mesh, P("fsdp"))
    for path, var in nnx.to_flat_state(params):
        expected = NamedSharding(mesh, logical_to_spec(var.get_metadata()["logical_axes"], RULES))
        assert var[...].sharding == expected, path


def test_scalar_model_shards_too():
    mesh = make_mesh((2, 2, 2))
    _, params = sharded_init(lambda: ScalarModel(CONFIGS["gpt2"], rngs=nnx.Rngs(0)), mesh)
    assert params["head"]["kernel"][...].sharding == NamedSharding(mesh, P("fsdp"))


def test_unknown_logical_axis_is_an_error():
    class Odd(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((4, 4)), logical_axes=("embed", "mystery"))

    abstract = nnx.state(nnx.eval_shape(Odd))
    with pytest.raises(RlftError, match=r"logical axis 'mystery' of w has no rule"):
        state_shardings(abstract, make_mesh((8, 1, 1)))


def test_indivisible_dimension_is_an_error():
    cfg = ModelConfig.llama(vocab_size=64, d_model=32, n_layers=1, n_heads=3, n_kv_heads=3, d_ff=48,
                            head_dim=8)
    with pytest.raises(RlftError, match=r"heads=3 is not divisible by mesh axes tensor of size 2"):
        sharded_init(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), make_mesh((2, 2, 2)))


def test_mesh_resolves_minus_one_and_checks_device_count():
    assert dict(make_mesh({"data": -1, "fsdp": 2, "tensor": 1}).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(RlftError, match="needs 16 devices, 8 are available"):
        make_mesh((4, 4, 1))
    with pytest.raises(RlftError, match="batch size 6 is not divisible by the data-parallel mesh size 8"):
        shard_batch(np.zeros((6, 3)), make_mesh((8, 1, 1)))
