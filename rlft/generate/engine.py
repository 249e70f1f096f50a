"""Continuous batching: a fixed number of slots decode a queue of prompts larger than the slots.

    generate_continuous(graphdef, params, prompt_tokens [N, P], prompt_mask [N, P], rng, slots=S, ...)
        -> SampleOutput [N, max_new_tokens] in the queue's order (tokens, mask, exact logprobs, lengths)

A static batch (`rlft.generate.sampling.sample`) runs until its longest row ends, and rows that
ended early hold their slots. Here S slots decode in chunks (a chunk ends once `refill_rows` rows
have ended, or after `chunk_steps` steps); after each chunk the rows that produced EOS (or reached
max_new_tokens) are copied out (`_collect`) and their slots refilled with the next prompts of the
queue (`_refill`: one prefill of those prompts, their caches placed into the slots), so the slots
stay busy while lengths differ. The whole queue runs as one jitted program (`_run_queue`, nested
`lax.while_loop`s): no host round trip between chunks, which on an accelerator cost more than the
decode steps they schedule (benchmarks/README.md). On a mesh the queue is split over the batch
shards and each runs such an engine of its own (`shard_map`; no collective in the loop).

The KV cache is a ring (`KVCache(ring=True)`) of P + max_new_tokens slots per row: every decode
step writes all rows at one shared column (index + 1 mod the ring's length), and a refilled row's
prompt is placed in the P columns before that index. Attention reads a row's live keys whatever
their column order (positions are in the keys and inputs); stale columns have segment 0.

Determinism: row i of the queue draws its token s with fold_in(fold_in(rng, i), s), exactly as
`sample` draws for batch row i (`row_keys`, `step_uniforms`), so the completions do not depend on
the slot count, the chunk size, the shard or when a row was scheduled: continuous == static, token
for token (tests/test_engine.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, PartitionSpec

from rlft.errors import RlftError
from rlft.generate.logprobs import SamplingParams
from rlft.generate.sampling import (SampleOutput, _check_prompts, choose_tokens, is_eos, prefill, row_keys,
                                    sampling_key, step_uniforms)
from rlft.models.decoder import KVCache
from rlft.parallel.distributed import put_global
from rlft.parallel.sharding import batch_axes, batch_shards, batch_sharding, replicated

Array = jax.Array


@struct.dataclass
class Slots:
    """The device state of S slots; [S] unless noted.

    cache: the ring KV cache [S, ..., P + T]; key: the PRNG key of the slot's row (`row_keys` of its
    queue index; meaningless when idle); gen: tokens generated so far; done: the row ended (or the slot is idle);
    last: the last token drawn (fed next); prompt_len: real prompt tokens; tokens / logprobs [S, T]:
    the row's completion so far (0 after its end).
    """

    cache: KVCache
    key: Array
    gen: Array
    done: Array
    last: Array
    prompt_len: Array
    tokens: Array
    logprobs: Array


def _empty_slots(config, slots: int, prompt_width: int, max_new_tokens: int, rng: Array) -> Slots:
    """S idle slots (done) with an empty ring cache of prompt_width + max_new_tokens columns."""
    zeros = lambda: jnp.zeros((slots,), jnp.int32)
    return Slots(cache=KVCache.zeros(config, slots, prompt_width + max_new_tokens).replace(ring=True),
                 key=row_keys(rng, zeros()), gen=zeros(), done=jnp.ones((slots,), bool), last=zeros(),
                 prompt_len=zeros(), tokens=jnp.zeros((slots, max_new_tokens), jnp.int32),
                 logprobs=jnp.zeros((slots, max_new_tokens), jnp.float32))


def _place(ring: KVCache, prompts: KVCache, slot_ids: Array) -> KVCache:
    """The ring with rows `slot_ids` [R] holding the prompt caches [R, ..., P] in the P columns
    just before the ring's index (ids out of range are dropped: padding of a refill).

    Only those P columns of k and v are written; the rows' other columns keep stale keys, hidden
    by segment 0 (each row's segment ids are rewritten whole)."""
    width, length = prompts.segment_ids.shape[1], ring.segment_ids.shape[1]
    columns = (ring.index - width + jnp.arange(width)) % length  # prompt column j -> ring column
    rows, cols = slot_ids[:, None], columns[None, :]

    def one(big: Array, small: Array, axes: tuple) -> Array:
        batch_axis, length_axis = axes.index("batch"), axes.index("length")
        # advanced indices on the batch and length axes: the update is [R, P, (the other axes)]
        small = jnp.moveaxis(small.astype(big.dtype), (batch_axis, length_axis), (0, 1))
        at = [slice(None)] * big.ndim
        at[batch_axis], at[length_axis] = rows, cols
        return big.at[tuple(at)].set(small, mode="drop")

    def each(big, small, axes):
        if isinstance(big, tuple):
            return tuple(one(b, s, axes) for b, s in zip(big, small))
        return one(big, small, ("layers", *axes))

    segments = jnp.zeros((len(slot_ids), length), jnp.int32).at[:, columns].set(prompts.segment_ids)
    return ring.replace(k=each(ring.k, prompts.k, KVCache.K_AXES), v=each(ring.v, prompts.v, KVCache.V_AXES),
                        segment_ids=ring.segment_ids.at[slot_ids].set(segments, mode="drop"))


@struct.dataclass
class Queue:
    """The engine's whole state inside its one jitted loop: the slots and the queue's results.

    slots: the S slots (`Slots`); owner int32 [S]: the queue row each slot runs (-1: free);
    queued int32 []: rows started so far (the next to start); tokens / logprobs [N, T], lengths [N]:
    each finished row's completion (written when its slot is collected); decode_steps int32 []:
    decode steps run.
    """

    slots: Slots
    owner: Array
    queued: Array
    tokens: Array
    logprobs: Array
    lengths: Array
    decode_steps: Array


def _collect(run: Queue) -> Queue:
    """Copy every ended row's completion out of its slot into the results; free the slot."""
    ended = run.slots.done & (run.owner >= 0)
    rows = jnp.where(ended, run.owner, run.lengths.shape[0])  # out of range: dropped
    put = lambda out, value: out.at[rows].set(value, mode="drop")
    return run.replace(owner=jnp.where(ended, -1, run.owner), tokens=put(run.tokens, run.slots.tokens),
                       logprobs=put(run.logprobs, run.slots.logprobs), lengths=put(run.lengths, run.slots.gen))


def _refill(model: nnx.Module, run: Queue, prompt_tokens: Array, prompt_mask: Array, rows: Array, first_row: Array,
            rng: Array, eos_id: Array, bucket: int, sampling: SamplingParams) -> Queue:
    """Start the next min(bucket, free slots, rows left) rows of the queue (prompts [N, P], `rows`
    of them real; local row r draws the stream of row first_row + r) in the lowest free slots: one
    prefill of `bucket` rows (the surplus are copies of row 0, dropped), the caches placed in the
    ring, each row's token 0 drawn."""
    state, slots = run.slots, run.owner.shape[0]
    free = run.owner < 0
    take = jnp.minimum(jnp.sum(free), rows - run.queued)
    valid = jnp.arange(bucket) < take
    slot_ids = jnp.where(valid, jnp.nonzero(free, size=bucket, fill_value=slots)[0], slots)  # `slots`: dropped
    new_rows = jnp.where(valid, run.queued + jnp.arange(bucket), 0)
    mask = (prompt_mask[new_rows] > 0).astype(jnp.int32)
    logits, cache = prefill(model, prompt_tokens[new_rows], mask, prompt_tokens.shape[1])
    keys = row_keys(rng, first_row + new_rows)
    token, logprob = choose_tokens(logits, step_uniforms(keys, 0), sampling)
    limit = state.tokens.shape[1]
    put = lambda field, value: field.at[slot_ids].set(value, mode="drop")
    first = lambda value, dtype: jnp.zeros((bucket, limit), dtype).at[:, 0].set(value)
    state = state.replace(
        cache=_place(state.cache, cache, slot_ids), key=put(state.key, keys), gen=put(state.gen, 1),
        done=put(state.done, is_eos(token, eos_id) | (limit == 1)), last=put(state.last, token),
        prompt_len=put(state.prompt_len, jnp.sum(mask, axis=-1)), tokens=put(state.tokens, first(token, jnp.int32)),
        logprobs=put(state.logprobs, first(logprob, jnp.float32)))
    return run.replace(slots=state, owner=put(run.owner, new_rows), queued=run.queued + jnp.minimum(take, bucket))


def _decode_chunk(model: nnx.Module, state: Slots, eos_id: Array, refill_at: Array, steps: int,
                  sampling: SamplingParams) -> tuple[Slots, Array]:
    """Up to `steps` decode steps of every live slot; stops early once every slot is done or
    `refill_at` (int32 []) rows have ended in this chunk (their slots are worth refilling). Also
    returns how many steps ran (int32 [])."""
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


def _run_shard(graphdef: nnx.GraphDef, params: nnx.State, prompt_tokens: Array, prompt_mask: Array, rows: Array,
               first_row: Array, rng: Array, eos_id: Array, *, slots: int, max_new_tokens: int, chunk_steps: int,
               refill_rows: int, sampling: SamplingParams) -> tuple[Array, Array, Array, Array]:
    """One queue (prompts [C, P], the first `rows` int32 [1] of them real, drawing the streams of
    rows first_row int32 [1] + r) through `slots` slots: collect the ended rows, refill the free
    slots, decode a chunk; repeat until every row has ended. Returns each row's tokens and logprobs
    [C, T] (0 after its end), its length [C] and the decode steps run [1]."""
    model = nnx.merge(graphdef, params)
    capacity, width = prompt_tokens.shape
    rows, first_row = rows[0], first_row[0]
    run = Queue(slots=_empty_slots(model.config, slots, width, max_new_tokens, rng),
                owner=jnp.full((slots,), -1, jnp.int32), queued=jnp.zeros((), jnp.int32),
                tokens=jnp.zeros((capacity, max_new_tokens), jnp.int32),
                logprobs=jnp.zeros((capacity, max_new_tokens), jnp.float32),
                lengths=jnp.zeros((capacity,), jnp.int32), decode_steps=jnp.zeros((), jnp.int32))
    # Prefill buckets refill_rows, 2 * refill_rows, ... slots: the smallest that takes every row that
    # can start (a full wave is one prefill, a few ended rows a small one).
    buckets = sorted({min(slots, refill_rows << k) for k in range(max(slots // refill_rows, 1).bit_length() + 1)})
    refills = [functools.partial(_refill, model, prompt_tokens=prompt_tokens, prompt_mask=prompt_mask, rows=rows,
                                 first_row=first_row, rng=rng, eos_id=eos_id, bucket=b, sampling=sampling)
               for b in buckets]

    def refill(run: Queue) -> Queue:
        starting = jnp.minimum(jnp.sum(run.owner < 0), rows - run.queued)
        return jax.lax.switch(jnp.sum(jnp.asarray(buckets[:-1]) < starting), refills, run)

    can_start = lambda run: jnp.any(run.owner < 0) & (run.queued < rows)

    def round_(run: Queue) -> Queue:
        run = jax.lax.while_loop(can_start, refill, _collect(run))
        # End the chunk early once enough rows ended to refill (none while the queue is empty).
        refill_at = jnp.where(run.queued < rows, jnp.minimum(refill_rows, rows - run.queued), slots + 1)
        state, steps_run = _decode_chunk(model, run.slots, eos_id, refill_at, chunk_steps, sampling)
        return run.replace(slots=state, decode_steps=run.decode_steps + steps_run)

    run = jax.lax.while_loop(lambda run: jnp.any(run.owner >= 0) | (run.queued < rows), round_, run)
    return run.tokens, run.logprobs, run.lengths, run.decode_steps[None]


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "slots", "max_new_tokens", "chunk_steps",
                                             "refill_rows", "sampling"))
def _run_queue(graphdef: nnx.GraphDef, params: nnx.State, prompt_tokens: Array, prompt_mask: Array, rows: Array,
               first_row: Array, rng: Array, eos_id: Array, pad_id: Array, *, mesh: Mesh | None, slots: int,
               max_new_tokens: int, chunk_steps: int, refill_rows: int,
               sampling: SamplingParams) -> tuple[SampleOutput, Array]:
    """The queue in one program: `_run_shard` on one device, or on each of the mesh's W batch shards
    (`shard_map`; prompts [W x C, P], rows / first_row [W]: shard w's queue). Returns the
    completions [W x C, max_new_tokens] (rows past each shard's count empty) and the slot
    occupancy (float32 [])."""
    run = functools.partial(_run_shard, graphdef, slots=slots, max_new_tokens=max_new_tokens,
                            chunk_steps=chunk_steps, refill_rows=refill_rows, sampling=sampling)
    if mesh is not None:  # each shard an engine of its own: no collective in the loop
        shard = PartitionSpec(batch_axes(mesh))
        run = jax.shard_map(run, mesh=mesh, in_specs=(PartitionSpec(), shard, shard, shard, shard, PartitionSpec(),
                                                      PartitionSpec()), out_specs=shard, check_vma=False)
    tokens, logprobs, lengths, decode_steps = run(params, prompt_tokens, prompt_mask, rows, first_row, rng, eos_id)
    # The first token of a row comes from its prefill, the others from decode steps.
    occupancy = jnp.sum(jnp.maximum(lengths - 1, 0)) / jnp.maximum(jnp.sum(decode_steps) * slots, 1)
    mask = (jnp.arange(max_new_tokens)[None, :] < lengths[:, None]).astype(jnp.int32)
    out = SampleOutput(tokens=jnp.where(mask > 0, tokens, pad_id), mask=mask,
                       logprobs=jnp.where(mask > 0, logprobs, 0.0), lengths=lengths, steps=jnp.max(lengths))
    return out, occupancy.astype(jnp.float32)


def generate_continuous(graphdef: nnx.GraphDef, params: nnx.State, prompt_tokens, prompt_mask, rng: Array | None,
                        *, slots: int, max_new_tokens: int, eos_id: int | Sequence[int], pad_id: int,
                        sampling: SamplingParams = SamplingParams(), chunk_steps: int = 32,
                        refill_rows: int | None = None, mesh: Mesh | None = None,
                        stats: dict | None = None) -> SampleOutput:
    """Completions [N, max_new_tokens] of left-padded prompts [N, P] through `slots` slots (module doc).

    Same fields and values as `rlft.generate.sampling.sample` of the whole batch (lengths include
    the EOS; steps is the longest length). One jitted program runs the queue: a chunk decodes until
    `refill_rows` rows (default slots // 4) have ended, or for at most chunk_steps steps; then the
    free slots are refilled, with one prefill of the smallest bucket (refill_rows times a power of
    two, at most slots) that takes them all. A host queue is padded to a power of two rows (one
    compile per size).
    mesh: the queue is split into W contiguous parts over the mesh's batch axes (W = their size),
    each run by an engine of slots / W slots on its own devices (the params, on the mesh's
    devices, are gathered whole on each); row i still draws row i's stream, so the completions
    are the same. Host prompts are split here (one process); prompts that are jax arrays on the
    mesh with a multiple of W rows are used where they are, each shard's block its queue, and the
    completions come back batch-sharded the same way (so a mesh across processes works too).
    stats: a dict to receive "slot_occupancy" (float32 [] on device: the fraction of slot-steps that
    decoded a live row's token). Returns device arrays without waiting for them (an asynchronous
    RL step scores the previous rollout meanwhile).
    """
    rows, width = prompt_tokens.shape
    ways = batch_shards(mesh)
    refill_rows = max(1, slots // ways // 4) if refill_rows is None else refill_rows
    if slots < 1 or chunk_steps < 1 or max_new_tokens < 1 or refill_rows < 1:
        raise RlftError(f"continuous batching: slots={slots}, chunk_steps={chunk_steps}, refill_rows={refill_rows} "
                        f"and max_new_tokens={max_new_tokens} must be >= 1")
    if slots % ways:
        raise RlftError(f"continuous batching: slots={slots} must be a multiple of the mesh's {batch_axes(mesh)} "
                        f"shards ({ways}): each shard runs slots / {ways} of them")
    # Prompts already on the mesh (jax arrays, rows a multiple of the shards) stay there: each shard's
    # queue is its own block of rows, which also works when the mesh spans processes.
    placed = mesh is not None and all(isinstance(x, jax.Array) for x in (prompt_tokens, prompt_mask)) \
        and rows % ways == 0
    if mesh is not None and mesh.is_multi_process and not placed:
        raise RlftError(f"continuous batching: on a mesh of several processes the prompts must be global arrays "
                        f"on it with a multiple of its {ways} batch shards as rows (got {type(prompt_tokens).__name__} "
                        f"of {rows} rows)")
    _check_prompts(graphdef, params, prompt_tokens, prompt_mask, width + max_new_tokens)
    if placed:
        prompt_tokens, prompt_mask = (jax.device_put(x.astype(jnp.int32), batch_sharding(mesh, 2))
                                      for x in (prompt_tokens, prompt_mask))
        all_real = bool(jax.device_get(jnp.all(jnp.sum(prompt_mask > 0, axis=-1) > 0)))
    else:
        prompt_tokens, prompt_mask = np.asarray(prompt_tokens, np.int32), np.asarray(prompt_mask, np.int32)
        all_real = bool((prompt_mask.sum(-1) > 0).all())
    if rows and not all_real:
        raise RlftError("continuous batching: every prompt needs at least one real token (mask 1)")
    rng = sampling_key(rng, sampling, "continuous batching")
    per_shard = -(-rows // ways)
    capacity = per_shard if placed else 1 << max(per_shard - 1, 0).bit_length()  # a power of two: few compiles
    firsts = np.arange(ways, dtype=np.int32) * per_shard  # shard w runs rows firsts[w] .. + counts[w]
    counts = np.clip(rows - firsts, 0, per_shard).astype(np.int32)
    order = np.concatenate([w * capacity + np.arange(n) for w, n in enumerate(counts)])  # queue row -> output row

    def shards(x):  # [N, P] -> [W x C, P]: shard w's rows, zero-padded to C
        out = np.zeros((ways * capacity, x.shape[1]), x.dtype)
        out[order] = x
        return out

    queues = (prompt_tokens, prompt_mask) if placed else (shards(prompt_tokens), shards(prompt_mask))
    if mesh is not None:
        queues = queues if placed else jax.device_put(queues, (batch_sharding(mesh, 2),) * 2)
        counts, firsts = put_global((counts, firsts), batch_sharding(mesh, 1))
        rng = put_global(rng, replicated(mesh))
    out, occupancy = _run_queue(graphdef, params, *queues, counts, firsts, rng,
                                np.asarray(eos_id, np.int32).reshape(-1), np.int32(pad_id), mesh=mesh,
                                slots=slots // ways, max_new_tokens=max_new_tokens, chunk_steps=chunk_steps,
                                refill_rows=min(refill_rows, slots // ways), sampling=sampling)
    if stats is not None:
        stats["slot_occupancy"] = occupancy
    if placed:
        return out  # already in queue order, batch-sharded over the mesh
    if ways == 1:
        return jax.tree.map(lambda x: x[:rows] if x.ndim else x, out)  # device arrays: nothing waits here
    return jax.tree.map(lambda x: x[order] if x.ndim else x, out)
