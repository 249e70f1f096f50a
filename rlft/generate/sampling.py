"""Sampling from a Decoder: one jitted prefill + `lax.while_loop` decode over a static KV cache.

Conventions (DESIGN.md section 6):
- Prompts are left-padded; `positions = clip(cumsum(mask) - 1, 0)`. The new token of step s of a
  row sits at position `prompt_length + s`, whatever the row's padding.
- A fixed number of tokens is sampled; everything after a row's first EOS is `pad_id` with mask 0
  and logprob 0. The loop exits early once every row has produced EOS.
- Logprobs are those of the distribution actually sampled from (`rlft.generate.logprobs`, the one path the
  losses use too): logits / temperature, then top-k, then top-p. Greedy decoding (temperature 0)
  reports the temperature-1 logprob of the argmax under the untruncated distribution.
- `sample_sequences` is the pure, jittable sampler (call it inside a jitted rollout);
  `Sequences.from_sample` lays prompt + completion out as a training batch on device;
  `sample` is the checked, compiled entry point for callers outside jit.
- RNG is explicit and per row: row r draws its token s with `fold_in(fold_in(rng, r), s)`
  (`row_keys`, `step_uniforms`), so a row's completion depends on its index and the key alone:
  not on the batch it shares, how that is sharded, or (`rlft.generate.engine`) which slot of a
  continuous batch it runs in and when.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import AxisType, Mesh

from rlft.parallel.distributed import put_global
from rlft.errors import RlftError
from rlft.models.decoder import KVCache, positions_from_mask
from rlft.generate.logprobs import SamplingParams, sampling_logits
from rlft.ops import first_argmax
from rlft.parallel.sharding import batch_axes, batch_shards, batch_sharding, checked_sharding, mesh_rules, replicated

Array = jax.Array


@struct.dataclass
class SampleOutput:
    """Sampled completions; every field is [batch, max_new_tokens] except `lengths` and `steps`."""

    tokens: Array  # int32, pad_id after the first EOS
    mask: Array  # int32, 1 up to and including the first EOS, 0 after
    logprobs: Array  # float32, logprob of each token under the sampled distribution, 0 where masked
    lengths: Array  # int32 [batch], number of unmasked tokens (EOS included)
    steps: Array  # int32 scalar, tokens generated per row before the loop stopped: max_new_tokens,
    #               or max(lengths) when every row produced EOS earlier


def _last_positive(w: Array) -> Array:
    """Index of the last entry > 0 along the last axis of w (0 if none)."""
    iota = jax.lax.broadcasted_iota(jnp.int32, w.shape, w.ndim - 1)
    return jnp.max(jnp.where(w > 0, iota, 0), axis=-1)


def row_keys(rng: Array, rows: Array) -> Array:
    """Typed PRNG keys [n]: the stream of each row index of `rows` int [n], fold_in(rng, row)."""
    return jax.vmap(jax.random.fold_in, (None, 0))(rng, rows)


def step_uniforms(keys: Array, steps: Array) -> Array:
    """float32 [n]: each row's uniform for its token `steps` (int [] or [n]) from its key (`row_keys`)."""
    steps = jnp.broadcast_to(jnp.asarray(steps, jnp.int32), keys.shape)
    return jax.vmap(lambda key, step: jax.random.uniform(jax.random.fold_in(key, step), ()))(keys, steps)


def _draw(uniforms: Array, logits: Array) -> Array:
    """One token [batch] per row of logits [batch, vocab] (-inf = excluded), by inverse CDF of the
    row's uniform [batch].

    One uniform per row and a two-level (block, then within-block) cumulative sum: the Gumbel
    trick of `jax.random.categorical` draws a uniform per vocabulary entry, which on CPU costs
    ~30x more for a GPT-2 vocabulary. Excluded tokens have weight 0 and are never drawn.
    """
    batch, vocab = logits.shape
    block = 1 << max(0, math.ceil(math.log2(math.sqrt(vocab))))
    n_blocks = -(-vocab // block)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.pad(weights, ((0, 0), (0, n_blocks * block - vocab))).reshape(batch, n_blocks, block)
    block_mass = jnp.sum(weights, axis=-1)
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    target = uniforms[:, None] * block_cdf[:, -1:]
    b = jnp.minimum(jnp.sum(block_cdf <= target, axis=-1), _last_positive(block_mass))
    in_block = jnp.take_along_axis(weights, b[:, None, None], axis=1)[:, 0]  # [batch, block]
    previous = jnp.take_along_axis(block_cdf, jnp.maximum(b - 1, 0)[:, None], axis=-1)[:, 0]
    before = jnp.where(b > 0, previous, 0.0)  # mass of the blocks before block b
    i = jnp.sum(before[:, None] + jnp.cumsum(in_block, axis=-1) <= target, axis=-1)
    return b * block + jnp.minimum(i, _last_positive(in_block))


def choose_tokens(logits: Array, uniforms: Array, sampling: SamplingParams) -> tuple[Array, Array]:
    """Next tokens [batch] and their logprobs [batch] from float32 logits [batch, vocab] and each
    row's uniform [batch] (`step_uniforms`; unused when greedy)."""
    if sampling.greedy:
        tokens = first_argmax(logits)
    else:
        logits = sampling_logits(logits, sampling)
        tokens = _draw(uniforms, logits)
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), picked - jax.nn.logsumexp(logits, axis=-1)


def is_eos(tokens: Array, eos_id: Array | int | Sequence[int]) -> Array:
    """bool, tokens' shape: the token is one of the EOS ids (`eos_id`: one id or several, e.g.
    Llama-3's <|end_of_text|> and <|eot_id|>; a traced int32 scalar or [k] array too). Negative
    ids never match."""
    ids = jnp.reshape(jnp.asarray(eos_id, jnp.int32), (-1,))
    return jnp.any((tokens[..., None] == ids) & (ids >= 0), axis=-1)


def completion_mask(tokens: Array, eos_id: Array | int | Sequence[int]) -> Array:
    """int32 [batch, length]: 1 up to and including the first EOS (any of `eos_id`) of each row, 0 after."""
    eos = is_eos(tokens, eos_id).astype(jnp.int32)
    return (jnp.cumsum(eos, axis=-1) - eos == 0).astype(jnp.int32)


def prefill(model: nnx.Module, prompt_tokens: Array, prompt_mask: Array, cache_length: int,
            group_size: int = 1, constrain_cache: Callable[[KVCache], KVCache] = lambda cache: cache
            ) -> tuple[Array, KVCache]:
    """The prompts' pass through the model: last-column logits [batch, vocab] and a KV cache of
    `cache_length` slots holding left-padded prompts [batch, prompt_len] (`prompt_mask` 0/1).

    group_size G > 1: rows p·G .. p·G + G − 1 hold the same prompt (RL's prompt-major groups), so
    only row p·G runs the model and its cache rows and logits are copied to the group: prefill
    FLOPs divided by G, the same values (each row's computation does not depend on the others).
    `constrain_cache` places the empty cache of the rows that run (e.g. a sharding constraint).
    """
    batch = prompt_tokens.shape[0]
    if batch % group_size:
        raise RlftError(f"sampling: group_size={group_size} does not divide the batch of {batch} rows")
    unique_tokens, unique_mask = prompt_tokens[::group_size], prompt_mask[::group_size]
    cache = constrain_cache(KVCache.zeros(model.config, batch // group_size, cache_length))
    hidden, cache = model.hidden(unique_tokens, positions_from_mask(unique_mask), unique_mask, cache)
    # Left padding: the last column holds every row's last real token; the LM head runs only there.
    logits = model.logits_from_hidden(hidden[:, -1:])[:, 0]
    if group_size > 1:
        cache = cache.map_arrays(lambda x, axes: jnp.repeat(x, group_size, axis=axes.index("batch")))
        logits = jnp.repeat(logits, group_size, axis=0)
    return logits, cache


def sample_sequences(graphdef: nnx.GraphDef, params: nnx.State, prompt_tokens: Array,
                     prompt_mask: Array, rng: Array, eos_id: Array | int | Sequence[int], pad_id: Array | int, *,
                     max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
                     mesh: Mesh | None = None, group_size: int = 1, first_row: Array | int = 0) -> SampleOutput:
    """Prefill + while-loop decode of left-padded prompts [batch, prompt_len]: a pure function.

    Jittable and meant to be called inside a jitted rollout (graphdef, max_new_tokens, sampling
    and mesh are static). eos_id (one id or several: generation stops at any) and pad_id may be
    traced int32 arrays. With a mesh (Auto axes),
    the KV cache and every batch-major array are constrained by the same logical-axis rules as
    training (batch over ('data', 'fsdp'), kv_heads over 'tensor'). No argument checks: `sample`
    does those for callers outside jit. group_size G > 1 (static): rows come in groups of G copies
    of one prompt (prompt-major), each prompt is prefilled once (`prefill`); the completions are
    the same as with G = 1. first_row (int32 [], may be traced): batch row r draws with the
    stream of row first_row + r, so one list of prompts sampled in several batches gets the
    streams it would get as one batch.
    """
    model = nnx.merge(graphdef, params)
    batch, prompt_len = prompt_tokens.shape
    steps = max_new_tokens

    def constrain(x: Array, axes: tuple) -> Array:
        if mesh is None:
            return x
        return jax.lax.with_sharding_constraint(
            x, checked_sharding(mesh, x.shape, axes, mesh_rules(mesh), "sampler array"))

    def constrain_cache(cache: KVCache) -> KVCache:
        return cache.map_arrays(constrain)

    prompt_mask = (prompt_mask > 0).astype(jnp.int32)
    prompt_lengths = jnp.sum(prompt_mask, axis=-1)
    ways = batch_shards(mesh)
    placed = constrain_cache if (batch // group_size) % ways == 0 else (lambda cache: cache)
    logits, cache = prefill(model, prompt_tokens, prompt_mask, prompt_len + steps, group_size, placed)
    cache = constrain_cache(cache)
    keys = row_keys(rng, first_row + jnp.arange(batch))
    token, logprob = choose_tokens(logits, step_uniforms(keys, 0), sampling)
    tokens = constrain(jnp.full((batch, steps), pad_id, jnp.int32).at[:, 0].set(token), ("batch", "length"))
    logprobs = constrain(jnp.zeros((batch, steps), jnp.float32).at[:, 0].set(logprob), ("batch", "length"))

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < steps) & ~jnp.all(done)

    def body(state):
        step, cache, last, done, tokens, logprobs = state
        # Feed the previous token (position prompt_length + step - 1); finished rows feed segment 0.
        logits, cache = model.decode(last[:, None], (prompt_lengths + step - 1)[:, None],
                                     (~done).astype(jnp.int32)[:, None], cache)
        token, logprob = choose_tokens(logits[:, 0], step_uniforms(keys, step), sampling)
        token = jnp.where(done, pad_id, token)
        logprob = jnp.where(done, 0.0, logprob)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
        logprobs = jax.lax.dynamic_update_slice(logprobs, logprob[:, None], (0, step))
        return step + 1, constrain_cache(cache), token, done | is_eos(token, eos_id), tokens, logprobs

    state = (jnp.ones((), jnp.int32), cache, token, is_eos(token, eos_id), tokens, logprobs)
    steps_run, _, _, _, tokens, logprobs = jax.lax.while_loop(cond, body, state)
    mask = completion_mask(tokens, eos_id)
    rows = ("batch", "length")
    return SampleOutput(tokens=constrain(jnp.where(mask > 0, tokens, pad_id).astype(jnp.int32), rows),
                        mask=constrain(mask, rows), logprobs=constrain(jnp.where(mask > 0, logprobs, 0.0), rows),
                        lengths=constrain(jnp.sum(mask, axis=-1), ("batch",)), steps=steps_run)


_sample_jit = jax.jit(sample_sequences, static_argnames=("graphdef", "max_new_tokens", "sampling", "mesh",
                                                       "group_size"))


@struct.dataclass
class Sequences:
    """Prompt + completion rows in the training layout (what the RL losses consume).

    tokens, positions, segment_ids: int32 [batch, prompt_len + max_new_tokens] (left-padded prompt,
    then the completion; padding and tokens after the first EOS have segment 0);
    completion_mask: float32 [batch, max_new_tokens], 1 on completion tokens up to and including
    the first EOS; logprobs: float32 [batch, max_new_tokens], the sampler's log-probs (0 where
    masked). The prompt width is `tokens.shape[1] - completion_mask.shape[1]`.
    """

    tokens: Array
    positions: Array
    segment_ids: Array
    completion_mask: Array
    logprobs: Array

    @property
    def prompt_length(self) -> int:
        """Columns of the (left-padded) prompt; completion column s is token column prompt_length + s."""
        return self.tokens.shape[1] - self.completion_mask.shape[1]

    @classmethod
    def from_sample(cls, prompt_tokens: Array, prompt_mask: Array, out: SampleOutput) -> "Sequences":
        """The training layout of `sample_sequences` output; pure, runs on device inside jit."""
        segment_ids = jnp.concatenate([(prompt_mask > 0).astype(jnp.int32), out.mask.astype(jnp.int32)], axis=1)
        return cls(tokens=jnp.concatenate([prompt_tokens.astype(jnp.int32), out.tokens], axis=1),
                   positions=positions_from_mask(segment_ids), segment_ids=segment_ids,
                   completion_mask=out.mask.astype(jnp.float32), logprobs=out.logprobs)


_CONFIGS: dict[nnx.GraphDef, object] = {}  # graphdef -> ModelConfig: merging costs ms per call


def _model_config(graphdef: nnx.GraphDef, params: nnx.State):
    """The ModelConfig of the Decoder that `graphdef` describes."""
    if graphdef not in _CONFIGS:
        _CONFIGS[graphdef] = nnx.merge(graphdef, params).config
    return _CONFIGS[graphdef]


def _check_prompts(graphdef, params, prompt_tokens, prompt_mask, total_len: int) -> None:
    if prompt_tokens.ndim != 2 or prompt_tokens.shape != prompt_mask.shape:
        raise RlftError(f"sampling: prompt_tokens {prompt_tokens.shape} and prompt_mask "
                        f"{prompt_mask.shape} must be the same [batch, length] shape")
    cfg = _model_config(graphdef, params)
    if not cfg.uses_rope and total_len > cfg.max_positions:
        raise RlftError(f"sampling: prompt length + max_new_tokens = {total_len} exceeds the "
                        f"model's max_positions={cfg.max_positions}")


def sampling_key(rng: Array | None, sampling: SamplingParams, what: str) -> Array:
    """`rng`, or for greedy decoding (which draws nothing) a fixed key when it is None; an RlftError
    starting with `what` when sampling needs a key and has none."""
    if rng is not None:
        return rng
    if not sampling.greedy:
        raise RlftError(f"{what}: an rng key is required unless temperature == 0 (greedy)")
    return jax.random.key(0)


def sample(graphdef: nnx.GraphDef, params: nnx.State, prompt_tokens: Array, prompt_mask: Array,
           rng: Array | None, *, max_new_tokens: int, eos_id: int | Sequence[int], pad_id: int,
           sampling: SamplingParams = SamplingParams(), mesh: Mesh | None = None,
           param_shardings=None, group_size: int = 1, first_row: int = 0) -> SampleOutput:
    """Sample [batch, max_new_tokens] completions of left-padded prompts [batch, prompt_len].

    Every row needs at least one real prompt token (mask 1). `rng` may be None for greedy
    decoding. `eos_id`: one id or several (generation stops at any); a negative id never fires. With `mesh`, every
    batch-major array (prompts, KV cache, outputs) is sharded over the mesh's ('data', 'fsdp') axes;
    parameters keep the shardings they carry, or are put on `param_shardings` when given.
    group_size G > 1: the rows are groups of G identical prompts (row p·G + g is copy g of prompt
    p; checked for host arrays), each prefilled once; the completions are those of G = 1.
    first_row: the batch's rows draw the streams of rows first_row.. (`sample_sequences`).
    """
    if max_new_tokens < 1:
        raise RlftError(f"sampling: max_new_tokens={max_new_tokens} must be >= 1")
    # Host arrays stay numpy until placed: every process of a multi-process run holds the whole batch.
    as_array = lambda x, dtype: x.astype(dtype) if isinstance(x, jax.Array) else np.asarray(x, dtype)
    prompt_tokens, prompt_mask = as_array(prompt_tokens, np.int32), as_array(prompt_mask, np.int32)
    _check_prompts(graphdef, params, prompt_tokens, prompt_mask, prompt_tokens.shape[1] + max_new_tokens)
    if group_size < 1 or prompt_tokens.shape[0] % group_size:
        raise RlftError(f"sampling: group_size={group_size} must be >= 1 and divide the batch of "
                        f"{prompt_tokens.shape[0]} rows")
    if group_size > 1 and isinstance(prompt_tokens, np.ndarray):
        grouped = lambda x: x.reshape(-1, group_size, x.shape[1])
        if not all((grouped(x) == grouped(x)[:, :1]).all() for x in (prompt_tokens, prompt_mask)):
            raise RlftError(f"sampling: group_size={group_size} needs each group of {group_size} consecutive "
                            f"rows to hold one prompt")
    rng = sampling_key(rng, sampling, "sampling")
    if mesh is not None:
        if any(t != AxisType.Auto for t in mesh.axis_types):  # with_sharding_constraint needs Auto
            raise RlftError(f"sampling: mesh axis types {mesh.axis_types} must all be Auto, as "
                            "rlft.parallel.sharding.make_mesh makes them (jax.make_mesh(..., axis_types=...))")
        if prompt_tokens.shape[0] % batch_shards(mesh):
            raise RlftError(f"sampling: batch size {prompt_tokens.shape[0]} is not divisible by the "
                            f"mesh's {batch_axes(mesh)} axes (size {batch_shards(mesh)})")
        prompt_tokens, prompt_mask = put_global((prompt_tokens, prompt_mask), batch_sharding(mesh, 2))
        rng = put_global(rng, replicated(mesh))
    if param_shardings is not None:
        params = jax.device_put(params, param_shardings)
    return _sample_jit(graphdef, params, prompt_tokens, prompt_mask, rng,
                       jnp.asarray(np.asarray(eos_id, np.int32).reshape(-1)), jnp.int32(pad_id),
                       max_new_tokens=max_new_tokens,
                       sampling=sampling, mesh=mesh, group_size=group_size, first_row=np.int32(first_row))
