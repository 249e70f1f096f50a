"""Continuous batching: a fixed number of slots decode a queue of prompts larger than the slots.

    generate_continuous(graphdef, params, prompt_tokens [N, P], prompt_mask [N, P], rng, slots=S, ...)
        -> SampleOutput [N, max_new_tokens] in the queue's order (tokens, mask, exact logprobs, lengths)

A static batch (`rlft.generate.sampling.sample`) runs until its longest row ends, and rows that
ended early hold their slots. Here decoding runs in jitted chunks over S slots (a chunk ends once
`refill_rows` rows have ended, or after `chunk_steps` steps); between chunks the host collects the
rows that produced EOS (or reached max_new_tokens) and refills their slots with the next prompts of
the queue (`_refill`: one prefill of those prompts, their caches placed into the slots), so the
slots stay busy while lengths differ.

The KV cache is a ring (`KVCache(ring=True)`) of P + max_new_tokens slots per row: every decode
step writes all rows at one shared column (index + 1 mod the ring's length), and a refilled row's
prompt is placed in the P columns before that index. Attention reads a row's live keys whatever
their column order (positions are in the keys and inputs); stale columns have segment 0.

Determinism: row i of the queue draws its token s with fold_in(fold_in(rng, i), s), exactly as
`sample` draws for batch row i (`row_keys`, `step_uniforms`), so the completions do not depend on
the slot count, the chunk size or when a row was scheduled: continuous == static, token for token
(tests/test_engine.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from rlft.errors import RlftError
from rlft.generate.logprobs import SamplingParams
from rlft.generate.sampling import (SampleOutput, _check_prompts, choose_tokens, is_eos, prefill, row_keys,
                                    sampling_key, step_uniforms)
from rlft.models.decoder import KVCache

Array = jax.Array


@struct.dataclass
class Slots:
    """The device state of S slots; [S] unless noted.

    cache: the ring KV cache [S, ..., P + T]; key: the PRNG key of the slot's row (`row_keys` of its
    queue index; meaningless when idle); gen: tokens generated so far; done: the row ended (or the slot is idle);
    last: the last token drawn (fed next); prompt_len: real prompt tokens; tokens / logprobs [S, T]:
    the row's completion so far (pad / 0 after its end).
    """

    cache: KVCache
    key: Array
    gen: Array
    done: Array
    last: Array
    prompt_len: Array
    tokens: Array
    logprobs: Array


def _empty_slots(config, slots: int, prompt_width: int, max_new_tokens: int, pad_id: int, rng: Array) -> Slots:
    cache = KVCache.zeros(config, slots, prompt_width + max_new_tokens).replace(ring=True)
    zeros = lambda: jnp.zeros((slots,), jnp.int32)  # distinct buffers: the state is donated
    return Slots(cache=cache, key=row_keys(rng, zeros()), gen=zeros(), done=jnp.ones((slots,), bool), last=zeros(),
                 prompt_len=zeros(),
                 tokens=jnp.full((slots, max_new_tokens), pad_id, jnp.int32),
                 logprobs=jnp.zeros((slots, max_new_tokens), jnp.float32))


def _place(ring: KVCache, prompts: KVCache, slot_ids: Array) -> KVCache:
    """The ring with rows `slot_ids` [R] replaced by the prompt caches [R, ..., P], their P columns
    ending just before the ring's index (ids out of range are dropped: padding of a refill)."""
    width, length = prompts.segment_ids.shape[1], ring.segment_ids.shape[1]
    shift = ring.index - width  # prompt column j goes to ring column (index − P + j) mod length

    def one(big: Array, small: Array, axes: tuple) -> Array:
        batch_axis, length_axis = axes.index("batch"), axes.index("length")
        padding = [(0, 0)] * small.ndim
        padding[length_axis] = (0, length - width)
        rolled = jnp.roll(jnp.pad(small.astype(big.dtype), padding), shift, axis=length_axis)
        at = (slice(None),) * batch_axis + (slot_ids,)
        return big.at[at].set(rolled, mode="drop")

    def each(big, small, axes):
        if isinstance(big, tuple):
            return tuple(one(b, s, axes) for b, s in zip(big, small))
        return one(big, small, ("layers", *axes))

    return ring.replace(k=each(ring.k, prompts.k, KVCache.K_AXES), v=each(ring.v, prompts.v, KVCache.V_AXES),
                        segment_ids=one(ring.segment_ids, prompts.segment_ids, ("batch", "length")))


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("state",))
def _refill(graphdef: nnx.GraphDef, params: nnx.State, state: Slots, slot_ids: Array, rows: Array,
            prompt_tokens: Array, prompt_mask: Array, rng: Array, eos_id: Array, *,
            sampling: SamplingParams) -> Slots:
    """Start rows `rows` [R] (queue indices; prompts [R, P]) in slots `slot_ids` [R] (S = padding):
    one prefill, the caches placed in the ring, the first token drawn (the row's token 0)."""
    model = nnx.merge(graphdef, params)
    prompt_mask = (prompt_mask > 0).astype(jnp.int32)
    logits, cache = prefill(model, prompt_tokens, prompt_mask, prompt_tokens.shape[1])
    keys = row_keys(rng, rows)
    token, logprob = choose_tokens(logits, step_uniforms(keys, 0), sampling)
    limit = state.tokens.shape[1]
    put = lambda field, value: field.at[slot_ids].set(value, mode="drop")
    first = lambda fill, value, dtype: jnp.full((len(rows), limit), fill, dtype).at[:, 0].set(value)
    return state.replace(
        cache=_place(state.cache, cache, slot_ids), key=put(state.key, keys), gen=put(state.gen, 1),
        done=put(state.done, is_eos(token, eos_id) | (limit == 1)), last=put(state.last, token),
        prompt_len=put(state.prompt_len, jnp.sum(prompt_mask, axis=-1)),
        tokens=put(state.tokens, first(0, token, jnp.int32)),
        logprobs=put(state.logprobs, first(0.0, logprob, jnp.float32)))


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "steps"), donate_argnames=("state",))
def _decode_chunk(graphdef: nnx.GraphDef, params: nnx.State, state: Slots, eos_id: Array, refill_at: Array, *,
                  steps: int, sampling: SamplingParams) -> tuple[Slots, Array]:
    """Up to `steps` decode steps of every live slot; stops early once every slot is done or
    `refill_at` (int32 []) rows have ended in this chunk (their slots are worth refilling). Also
    returns how many steps ran (int32 [])."""
    model = nnx.merge(graphdef, params)
    limit = state.tokens.shape[1]
    columns = jnp.arange(limit)

    def body(carry):
        i, st = carry
        live = ~st.done
        logits, cache = model.decode(st.last[:, None], (st.prompt_len + st.gen - 1)[:, None],
                                     live.astype(jnp.int32)[:, None], st.cache)
        token, logprob = choose_tokens(logits[:, 0], step_uniforms(st.key, st.gen), sampling)
        # each live row's column gen: a select over [S, T] (a scatter is a serial loop on CPU)
        write = live[:, None] & (columns[None, :] == st.gen[:, None])
        tokens = jnp.where(write, token[:, None], st.tokens)
        logprobs = jnp.where(write, logprob[:, None], st.logprobs)
        gen = st.gen + live
        done = st.done | (live & (is_eos(token, eos_id) | (gen >= limit)))
        return i + 1, st.replace(cache=cache, gen=gen, done=done, last=jnp.where(live, token, st.last),
                                 tokens=tokens, logprobs=logprobs)

    done_before = state.done
    cond = lambda carry: ((carry[0] < steps) & ~jnp.all(carry[1].done)
                          & (jnp.sum(carry[1].done & ~done_before) < refill_at))
    steps_run, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
    return state, steps_run


def generate_continuous(graphdef: nnx.GraphDef, params: nnx.State, prompt_tokens, prompt_mask, rng: Array | None,
                        *, slots: int, max_new_tokens: int, eos_id: int | Sequence[int], pad_id: int,
                        sampling: SamplingParams = SamplingParams(), chunk_steps: int = 32,
                        refill_rows: int | None = None, stats: dict | None = None) -> SampleOutput:
    """Completions [N, max_new_tokens] of left-padded prompts [N, P] through `slots` slots (module doc).

    Same fields and values as `rlft.generate.sampling.sample` of the whole batch (lengths include
    the EOS; steps is the longest length). A jitted chunk decodes until `refill_rows` rows (default
    slots // 4) have ended, or for at most chunk_steps steps; then the host refills the free slots.
    Fewer chunks mean fewer host round trips, earlier refills fewer idle slots
    (benchmarks/README.md has the A/B). One device (no mesh).
    stats: a dict to receive "decode_steps" (steps run) and "slot_occupancy" (the fraction of
    slot-steps that decoded a live row's token).
    """
    tokens, mask = np.asarray(prompt_tokens, np.int32), np.asarray(prompt_mask, np.int32)
    rows, width = tokens.shape
    refill_rows = max(1, slots // 4) if refill_rows is None else refill_rows
    if slots < 1 or chunk_steps < 1 or max_new_tokens < 1 or refill_rows < 1:
        raise RlftError(f"continuous batching: slots={slots}, chunk_steps={chunk_steps}, refill_rows={refill_rows} "
                        f"and max_new_tokens={max_new_tokens} must be >= 1")
    _check_prompts(graphdef, params, tokens, mask, width + max_new_tokens)
    if rows and not (mask.sum(-1) > 0).all():
        raise RlftError("continuous batching: every prompt needs at least one real token (mask 1)")
    rng = sampling_key(rng, sampling, "continuous batching")
    eos = jnp.asarray(np.asarray(eos_id, np.int32).reshape(-1))
    config = nnx.merge(graphdef, params).config
    state = _empty_slots(config, slots, width, max_new_tokens, pad_id, rng)
    out_tokens = np.full((rows, max_new_tokens), pad_id, np.int32)
    out_logprobs = np.zeros((rows, max_new_tokens), np.float32)
    lengths = np.zeros((rows,), np.int32)
    owner = np.full((slots,), -1)  # the queue row each slot is running (-1: free)
    queued, decode_steps = 0, []
    while True:
        done, gen = jax.device_get((state.done, state.gen))
        ended = np.flatnonzero(done & (owner >= 0))
        if len(ended):
            slot_tokens, slot_logprobs = jax.device_get((state.tokens, state.logprobs))
            for s in ended:
                r = owner[s]
                out_tokens[r], out_logprobs[r], lengths[r] = slot_tokens[s], slot_logprobs[s], gen[s]
                owner[s] = -1
        free = np.flatnonzero(owner < 0)
        take = min(len(free), rows - queued)
        if take:
            bucket = min(slots, 1 << (take - 1).bit_length())  # few shapes: one compile per power of two
            slot_ids = np.full((bucket,), slots, np.int32)  # `slots` = padding, dropped
            slot_ids[:take] = free[:take]
            new_rows = np.zeros((bucket,), np.int32)  # padding rows prefill row 0, then are dropped
            new_rows[:take] = np.arange(queued, queued + take)
            state = _refill(graphdef, params, state, jnp.asarray(slot_ids), jnp.asarray(new_rows),
                            jnp.asarray(tokens[new_rows]), jnp.asarray(mask[new_rows]), rng, eos, sampling=sampling)
            owner[free[:take]] = new_rows[:take]
            queued += take
        if (owner < 0).all():
            break
        # End the chunk early once enough rows ended to refill (none while the queue is empty).
        refill_at = np.int32(min(refill_rows, rows - queued) if queued < rows else slots + 1)
        state, steps_run = _decode_chunk(graphdef, params, state, eos, refill_at, steps=chunk_steps,
                                         sampling=sampling)
        decode_steps.append(steps_run)
    if stats is not None:  # the first token of a row comes from its prefill, the others from decode steps
        total = int(sum(jax.device_get(decode_steps)))
        stats.update(decode_steps=total, slot_occupancy=float((lengths - 1).clip(0).sum() / max(total * slots, 1)))
    completion = (np.arange(max_new_tokens)[None, :] < lengths[:, None]).astype(np.int32)
    return SampleOutput(tokens=jnp.asarray(np.where(completion > 0, out_tokens, pad_id)),
                        mask=jnp.asarray(completion),
                        logprobs=jnp.asarray(np.where(completion > 0, out_logprobs, 0.0)),
                        lengths=jnp.asarray(lengths), steps=jnp.asarray(lengths.max(initial=0), jnp.int32))
