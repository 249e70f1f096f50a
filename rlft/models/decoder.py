"""The Flax NNX decoder: GPT-2, Llama and Qwen2 blocks from one ModelConfig.

Every parameter is an `nnx.Param` carrying `logical_axes` metadata (see rlft/parallel/sharding.py for the
rules that map them to mesh axes). The forward is a pure function of (params, inputs) once the
module is split with `nnx.split`; dense layers run on 2-D [tokens, features] activations, which is
about 2x faster for the backward on XLA:CPU than 3-D ones and no slower elsewhere.

Masking is expressed with segment ids: token i attends to token j iff j <= i (by slot) and
segment_ids[i] == segment_ids[j] != 0. An unpacked row uses 1 for real tokens and 0 for padding;
packed rows number their examples 1, 2, ... Positions are explicit, so left padding works
(positions = clip(cumsum(mask) - 1, 0)).

Big models: `ModelConfig.remat` checkpoints each block of the no-cache forward under a named policy
(`REMAT_POLICY`), and `ModelConfig.scan_layers` stacks the blocks' parameters on a leading "layers"
axis and runs them with one `lax.scan` (compile time flat in depth); the KV cache is then stacked
the same way and updated in place by the scanned decode.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from rlft.models.config import REMAT_POLICIES, ModelConfig
from rlft.models.lora import Adapter, LoraConfig
from rlft.parallel.sharding import constrain_activation

Array = jax.Array

_normal = nnx.initializers.normal

# ModelConfig.remat -> `jax.checkpoint` policy (what the backward may read instead of recomputing).
# "dots" keeps the dense projections (2-D matmuls without batch dimensions: q/k/v/o, MLP) and
# recomputes the attention scores and probabilities ([B, KV, G, T, T] batched einsums), whose memory
# grows with the square of the length; `dots_saveable` would keep those too.
REMAT_POLICY: dict[str, Callable | None] = {
    "full": None,  # save nothing inside a block: only its input is kept
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
assert set(REMAT_POLICY) | {"none"} == set(REMAT_POLICIES)


def _param(rngs: nnx.Rngs, shape: tuple, axes: tuple, init=None) -> nnx.Param:
    """A float32 parameter with its logical axis names (one name per dimension)."""
    assert len(shape) == len(axes), (shape, axes)
    init = init or _normal(0.02)
    return nnx.Param(init(rngs.params(), shape, jnp.float32), logical_axes=axes)


def _const(value: float, shape: tuple, axes: tuple) -> nnx.Param:
    return nnx.Param(jnp.full(shape, value, jnp.float32), logical_axes=axes)


def dense(x: Array, w: Array, b: Array | None, n_in: int, dtype, axes: tuple[str, str]) -> Array:
    """Contract the last `n_in` dims of x with the first `n_in` dims of w, as one 2-D matmul.

    axes: the logical axes of the input and output features (the weight's first input and output
    axis), by which the 2-D activations are kept sharded (`constrain_activation`).
    """
    lead, in_shape, out_shape = x.shape[: x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
    x2 = constrain_activation(x.reshape(-1, math.prod(in_shape)).astype(dtype), axes[0])
    y = jnp.dot(x2, w.reshape(math.prod(in_shape), -1).astype(dtype))
    if b is not None:
        y = y + b.reshape(-1).astype(dtype)
    return constrain_activation(y, axes[1]).reshape(*lead, *out_shape)


def add_adapters(module: nnx.Module, lora: LoraConfig | None, dtype, rngs: nnx.Rngs) -> None:
    """Give each weight of `module` that `lora` targets an `Adapter` named `<weight>_lora`.

    The adapter's A and B take the logical axes of the weight's input and output (`DENSE_AXES`).
    """
    for name, (in_axis, out_axis) in module.DENSE_AXES.items():
        if lora is None or name not in lora.targets or not hasattr(module, name):
            continue
        w = getattr(module, name)
        n_in = 2 if name == "o" else 1
        setattr(module, f"{name}_lora", Adapter(math.prod(w.shape[:n_in]), math.prod(w.shape[n_in:]),
                                                lora, in_axis, out_axis, dtype, rngs))


def project(module: nnx.Module, name: str, x: Array, n_in: int, dtype) -> Array:
    """`dense` of x with weight `name` of `module` (and its bias and LoRA adapter, when present)."""
    bias = getattr(module, f"{name}_bias", None)
    y = dense(x, getattr(module, name)[...], None if bias is None else bias[...], n_in, dtype,
              module.DENSE_AXES[name])
    adapter = getattr(module, f"{name}_lora", None)
    if adapter is not None:
        flat = x.reshape(-1, math.prod(x.shape[x.ndim - n_in:]))
        y = y + adapter(flat.astype(dtype)).reshape(y.shape).astype(y.dtype)
    return y


def activation(name: str, x: Array) -> Array:
    """The MLP non-linearity by its Hugging Face name."""
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu(x)
    return jax.nn.silu(x)


def rope_inverse_frequencies(cfg: ModelConfig) -> Array:
    """RoPE inverse frequencies [head_dim // 2], with Llama-3 scaling when configured."""
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    if cfg.rope_scaling is None:
        return inv
    kind, factor, low, high, old_len = cfg.rope_scaling
    assert kind == "llama3", kind
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)


def rope_cos_sin(positions: Array, inv_freq: Array) -> tuple[Array, Array]:
    """(cos, sin) float32 [batch, length, 1, head_dim] of the RoPE angles; shared by every layer."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate x [batch, length, heads, head_dim] by angles from `rope_cos_sin` (HF rotate-half)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


@struct.dataclass
class KVCache:
    """A static key/value cache: fixed [batch, max_len] slots, written at `index`.

    Per layer, k: [batch, kv_heads, max_len, head_dim] and v: [batch, kv_heads, head_dim, max_len],
    the operand layouts XLA:CPU's fast (YNNPACK) batched matmuls take as they are: with
    [batch, max_len, kv_heads, head_dim] XLA copied every layer's cache twice per decode step.
    k and v are tuples of one array per layer, or (`ModelConfig.scan_layers`) one array each with
    a leading layer axis [n_layers, ...], which the scanned decoder updates in place.
    segment_ids: [batch, max_len] (0 = empty slot or padding); index: int32 scalar, the next slot
    to write. ring (static): a ring buffer of slots for continuous batching (`rlft.generate.engine`):
    it takes one token per call, written at `index` (then index + 1 mod max_len), which attends to
    every slot of its row's segment whatever the slot order; rows keep only their own live tokens
    in non-zero segments (attention does not depend on the slots' order: positions are in the
    keys and inputs).
    """

    k: tuple | Array
    v: tuple | Array
    segment_ids: Array
    index: Array
    ring: bool = struct.field(pytree_node=False, default=False)

    K_AXES = ("batch", "kv_heads", "length", "head_dim")  # logical axes (rlft.parallel.sharding.RULES)
    V_AXES = ("batch", "kv_heads", "head_dim", "length")

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int) -> "KVCache":
        """An empty cache for `batch` rows of up to `max_len` tokens (stacked if cfg.scan_layers)."""
        k_shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        v_shape = (batch, cfg.n_kv_heads, cfg.head_dim, max_len)
        dtype = jnp.dtype(cfg.dtype)
        if cfg.scan_layers:
            k = jnp.zeros((cfg.n_layers, *k_shape), dtype)
            v = jnp.zeros((cfg.n_layers, *v_shape), dtype)
        else:
            k = tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.n_layers))
            v = tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.n_layers))
        return cls(k=k, v=v, segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

    def map_arrays(self, fn: Callable[[Array, tuple], Array]) -> "KVCache":
        """Apply fn(array, logical_axes) to k, v and segment_ids (e.g. a sharding constraint)."""
        def one(x, axes):
            if isinstance(x, tuple):
                return tuple(fn(a, axes) for a in x)
            return fn(x, ("layers", *axes))

        return self.replace(k=one(self.k, self.K_AXES), v=one(self.v, self.V_AXES),
                            segment_ids=fn(self.segment_ids, ("batch", "length")))


class Norm(nnx.Module):
    """LayerNorm (GPT-2) or RMSNorm (Llama/Qwen2), computed in float32."""

    def __init__(self, cfg: ModelConfig):
        self.rms = cfg.family != "gpt2"
        self.eps = cfg.norm_eps
        self.scale = _const(1.0, (cfg.d_model,), ("embed",))
        if not self.rms:
            self.bias = _const(0.0, (cfg.d_model,), ("embed",))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        if self.rms:
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
            return (y * self.scale[...]).astype(x.dtype)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def attention_weights_mask(q_segments: Array, k_segments: Array, q_slots: Array) -> Array:
    """allowed[b, t, s]: key slot s is visible from query t (causal, same non-zero segment).

    q_segments [B, T], k_segments [B, S], q_slots [T] (the cache slot of each query).
    """
    causal = jnp.arange(k_segments.shape[1])[None, :] <= q_slots[:, None]  # [T, S]
    same = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
    return same & causal[None]


class Attention(nnx.Module):
    """Multi-head / grouped-query self-attention with optional RoPE and KV cache."""

    # weight -> logical axes of its input and output features (activation sharding, LoRA adapters)
    DENSE_AXES = {"q": ("embed", "heads"), "k": ("embed", "kv_heads"), "v": ("embed", "kv_heads"),
                  "o": ("heads", "embed")}

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: LoraConfig | None = None):
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.cfg = cfg
        out_init = _normal(0.02 / math.sqrt(2 * cfg.n_layers))
        self.q = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"))
        self.k = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        self.v = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        self.o = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), out_init)
        if cfg.qkv_bias:
            self.q_bias = _const(0.0, (h, hd), ("heads", "head_dim"))
            self.k_bias = _const(0.0, (kv, hd), ("kv_heads", "head_dim"))
            self.v_bias = _const(0.0, (kv, hd), ("kv_heads", "head_dim"))
        if cfg.out_bias:
            self.o_bias = _const(0.0, (d,), ("embed",))
        add_adapters(self, lora, jnp.dtype(cfg.dtype), rngs)

    def __call__(self, x: Array, allowed: Array, kv: tuple | None,
                 rope: tuple[Array, Array] | None = None):
        """x [B, T, D] -> ([B, T, D], (k, v)); kv: the cache to extend, or None.

        kv is (k_cache, v_cache, index) with this layer's cache arrays, or (k_cache, v_cache, index,
        layer) with the stacked [n_layers, ...] arrays of a scanned decoder and this layer's int32
        index into them; the returned (k, v) are the updated cache arrays of the same shapes (without
        a cache: this call's keys [B, KV, T, Dh] and values [B, KV, Dh, T]).
        rope: (cos, sin) from `rope_cos_sin` for RoPE families (computed once per forward), else None.
        """
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        q, k, v = (project(self, name, x, 1, dtype) for name in ("q", "k", "v"))
        if cfg.uses_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1)  # [B, KV, T, Dh], [B, KV, Dh, T]
        new_kv = (k, v)
        if kv is not None and len(kv) == 3:
            k_cache, v_cache, index = kv
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, index, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, 0, index))
            new_kv = (k, v)
        elif kv is not None:  # stacked cache: write this layer's slots in place, then read the layer
            k_cache, v_cache, index, layer = kv
            new_kv = (jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype),
                                                   (layer, 0, 0, index, 0)),
                      jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype),
                                                   (layer, 0, 0, 0, index)))
            k, v = (jax.lax.dynamic_index_in_dim(c, layer, keepdims=False) for c in new_kv)
        b, t, h, hd = q.shape
        groups = h // cfg.n_kv_heads
        q = q.reshape(b, t, cfg.n_kv_heads, groups, hd)
        scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(hd)
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out = jnp.einsum("bkgts,bkds->btkgd", probs, v.astype(dtype)).reshape(b, t, h, hd)
        return project(self, "o", out, 2, dtype), new_kv


class MLP(nnx.Module):
    """GELU MLP with biases (GPT-2) or SwiGLU (Llama/Qwen2)."""

    DENSE_AXES = {"gate": ("embed", "mlp"), "up": ("embed", "mlp"), "down": ("mlp", "embed")}

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: LoraConfig | None = None):
        d, f = cfg.d_model, cfg.d_ff
        self.cfg = cfg
        out_init = _normal(0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.gated_mlp:
            self.gate = _param(rngs, (d, f), ("embed", "mlp"))
        self.up = _param(rngs, (d, f), ("embed", "mlp"))
        self.down = _param(rngs, (f, d), ("mlp", "embed"), out_init)
        if cfg.mlp_bias:
            if cfg.gated_mlp:
                self.gate_bias = _const(0.0, (f,), ("mlp",))
            self.up_bias = _const(0.0, (f,), ("mlp",))
            self.down_bias = _const(0.0, (d,), ("embed",))
        add_adapters(self, lora, jnp.dtype(cfg.dtype), rngs)

    def __call__(self, x: Array) -> Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        up = project(self, "up", x, 1, dtype)
        if cfg.gated_mlp:
            up = activation(cfg.activation, project(self, "gate", x, 1, dtype)) * up
        else:
            up = activation(cfg.activation, up)
        return project(self, "down", up, 1, dtype)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lora: LoraConfig | None = None):
        self.attn_norm = Norm(cfg)
        self.attn = Attention(cfg, rngs, lora)
        self.mlp_norm = Norm(cfg)
        self.mlp = MLP(cfg, rngs, lora)

    def __call__(self, x, allowed, kv, rope=None):
        a, kv = self.attn(self.attn_norm(x), allowed, kv, rope)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), kv


def stack_blocks(blocks: list[Block]) -> Block:
    """One Block whose parameters stack those of `blocks` on a leading "layers" axis [L, ...].

    Built from the same per-layer initialisation as the unrolled decoder, so a scanned Decoder
    starts from exactly the stacked parameters of an unrolled one with the same seed.
    """
    graphdef, first = nnx.split(blocks[0])
    states = [first] + [nnx.state(b) for b in blocks[1:]]

    def stack(*vs: nnx.Variable) -> nnx.Variable:
        return vs[0].replace(value=jnp.stack([v[...] for v in vs]),
                             logical_axes=("layers", *vs[0].get_metadata()["logical_axes"]))

    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _run_block(graphdef: nnx.GraphDef, state: nnx.State, x: Array, allowed: Array, kv: tuple | None,
               rope: tuple[Array, Array] | None) -> tuple[Array, tuple]:
    """A block as a pure function of its parameters: (x [B, T, D], kv) as `Block.__call__`."""
    return nnx.merge(graphdef, state)(x, allowed, kv, rope)


class Decoder(nnx.Module):
    """A decoder-only language model; `__call__` gives logits, `decode` reads/writes a KVCache.

    `layers` is an nnx.List of Blocks, or with `cfg.scan_layers` one Block whose parameters carry a
    leading [n_layers] axis (logical axis "layers", never sharded). `lora` adds low-rank adapters
    to the targeted dense weights (rlft/models/lora.py); None builds the plain model.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
        self.config = cfg
        self.lora = lora
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        if not cfg.uses_rope:
            self.pos_embed = _param(rngs, (cfg.max_positions, cfg.d_model), ("positions", "embed"),
                                    _normal(0.01))
        blocks = [Block(cfg, rngs, lora) for _ in range(cfg.n_layers)]
        self.layers = stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.final_norm = Norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

    def hidden(self, tokens: Array, positions: Array, segment_ids: Array,
               cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
        """Final-norm hidden states [batch, length, d_model] (and the updated cache, if given).

        tokens, positions, segment_ids: int [batch, length]. With a cache, the tokens are written
        at slots [cache.index, cache.index + length) and attend to every earlier valid slot.
        """
        dtype = jnp.dtype(self.config.dtype)
        x = self.embed[...][tokens].astype(dtype)
        if not self.config.uses_rope:
            x = x + self.pos_embed[...][positions].astype(dtype)
        length = tokens.shape[1]
        if cache is None:
            allowed = attention_weights_mask(segment_ids, segment_ids, jnp.arange(length))
        else:
            key_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                                        (0, cache.index))
            if cache.ring and length != 1:
                raise ValueError(f"a ring KV cache takes one token per call, got {length}")
            # A ring's slots are not in time order: every slot of the row's segment is earlier.
            q_slots = jnp.full((1,), key_segments.shape[1] - 1) if cache.ring else cache.index + jnp.arange(length)
            allowed = attention_weights_mask(segment_ids, key_segments, q_slots)
        # RoPE angles depend only on positions: computed once here, shared by every layer.
        rope = (rope_cos_sin(positions, rope_inverse_frequencies(self.config))
                if self.config.uses_rope else None)
        if self.config.scan_layers:
            x, new_k, new_v = self._scan_blocks(x, allowed, cache, rope)
        else:
            x, new_k, new_v = self._unrolled_blocks(x, allowed, cache, rope)
        x = self.final_norm(x)
        if cache is not None:
            index = (cache.index + length) % key_segments.shape[1] if cache.ring else cache.index + length
            cache = KVCache(k=new_k, v=new_v, segment_ids=key_segments, index=index, ring=cache.ring)
        return x, cache

    def _remat(self, fn: Callable, prevent_cse: bool = True) -> Callable:
        """`fn` under `jax.checkpoint` with the config's policy (unchanged for remat="none")."""
        if self.config.remat == "none":
            return fn
        return jax.checkpoint(fn, policy=REMAT_POLICY[self.config.remat], prevent_cse=prevent_cse)

    def _unrolled_blocks(self, x: Array, allowed: Array, cache: KVCache | None,
                         rope: tuple[Array, Array] | None) -> tuple[Array, tuple, tuple]:
        """The blocks one after another: (x [B, T, D], per-layer k tuple, per-layer v tuple)."""
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            if cache is not None:  # decoding is never differentiated: no remat
                x, (k, v) = layer(x, allowed, (cache.k[i], cache.v[i], cache.index), rope)
            elif self.config.remat == "none":
                x, (k, v) = layer(x, allowed, None, rope)
            else:
                graphdef, state = nnx.split(layer)
                x, (k, v) = self._remat(lambda s, x: _run_block(graphdef, s, x, allowed, None, rope))(state, x)
            new_k.append(k)
            new_v.append(v)
        return x, tuple(new_k), tuple(new_v)

    def _scan_blocks(self, x: Array, allowed: Array, cache: KVCache | None,
                     rope: tuple[Array, Array] | None) -> tuple[Array, Array | None, Array | None]:
        """The stacked blocks under one `lax.scan` over the layer axis: (x, stacked k, stacked v).

        Without a cache the body (one block) is rematerialised per the config and the keys/values
        are not returned (None). With a cache, the stacked [L, ...] k/v arrays are carried through
        the scan and each layer writes its new slots in place (no per-layer copy of the cache).
        """
        graphdef, stacked = nnx.split(self.layers)
        if cache is None:
            def body(x, state):
                return _run_block(graphdef, state, x, allowed, None, rope)[0], None

            # prevent_cse=False: scan already keeps XLA from merging the recomputation (JAX docs).
            x, _ = jax.lax.scan(self._remat(body, prevent_cse=False), x, stacked)
            return x, None, None

        def decode_body(carry, layer_input):
            x, k, v = carry
            state, layer = layer_input
            x, (k, v) = _run_block(graphdef, state, x, allowed, (k, v, cache.index, layer), rope)
            return (x, k, v), None

        layers = jnp.arange(self.config.n_layers, dtype=jnp.int32)
        (x, k, v), _ = jax.lax.scan(decode_body, (x, cache.k, cache.v), (stacked, layers))
        return x, k, v

    def logits_from_hidden(self, x: Array) -> Array:
        """LM-head logits in float32: [batch, length, d_model] -> [batch, length, vocab]."""
        dtype = jnp.dtype(self.config.dtype)
        w = self.embed[...].T if self.config.tie_embeddings else self.lm_head[...]
        return dense(x, w, None, 1, dtype, ("embed", "vocab")).astype(jnp.float32)

    def logits_block(self, x: Array, start: Array | int, size: int) -> Array:
        """float32 [batch, length, size]: the logits of vocabulary columns [start, start + size) of
        hidden x [batch, length, d_model] (start may be traced), for `vocab_chunked_logprobs`."""
        dtype = jnp.dtype(self.config.dtype)
        if self.config.tie_embeddings:
            w = jax.lax.dynamic_slice_in_dim(self.embed[...], start, size, axis=0).T
        else:
            w = jax.lax.dynamic_slice_in_dim(self.lm_head[...], start, size, axis=1)
        return dense(x, w, None, 1, dtype, ("embed", "vocab")).astype(jnp.float32)

    def __call__(self, tokens: Array, positions: Array, segment_ids: Array) -> Array:
        """Logits float32 [batch, length, vocab] for int [batch, length] inputs (no cache)."""
        return self.logits_from_hidden(self.hidden(tokens, positions, segment_ids)[0])

    def decode(self, tokens: Array, positions: Array, segment_ids: Array,
               cache: KVCache) -> tuple[Array, KVCache]:
        """Like `__call__`, reading and extending a KVCache: (logits [B, T, V], new cache)."""
        x, cache = self.hidden(tokens, positions, segment_ids, cache)
        return self.logits_from_hidden(x), cache


def positions_from_mask(mask: Array) -> Array:
    """Positions [batch, length] of left- or right-padded rows: clip(cumsum(mask) - 1, 0)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
