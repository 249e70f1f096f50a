"""Log-probabilities of tokens under the distribution a sampler draws from: the one path.

The sampler, the rollout, the policy-gradient loss, DPO and reward scoring all take token
log-probs from here, so a temperature or a top-k/top-p setting means the same thing everywhere
(DESIGN.md section 6): logits / temperature, then top-k, then top-p over the renormalised top-k
set, renormalised again. Greedy decoding (temperature 0) scores under the untruncated
temperature-1 distribution. Top-k and top-p truncate by value: every token whose logit ties the
cut-off is kept. Truncation cut-offs are constants for the gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from rlft.errors import RlftError

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How next tokens are drawn: temperature (0 = greedy), top-k (0 = off), top-p (1 = off)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise RlftError(f"sampling.temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise RlftError(f"sampling.top_k={self.top_k}: must be an integer >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise RlftError(f"sampling.top_p={self.top_p}: must be in (0, 1] (1 = off)")

    @property
    def greedy(self) -> bool:
        """Temperature 0 means argmax decoding."""
        return self.temperature == 0


def _float_order_keys(x: Array) -> Array:
    """int32 keys that sort like the float32 values x (for exact bisection over floats)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _top_p_keep(logits: Array, top_p: float) -> Array:
    """bool [..., vocab]: the smallest highest-probability set with mass >= top_p (no sort).

    Bisection over the float order finds the largest logit c with P(logit >= c) >= top_p in 32
    masked-sum passes: a full-vocabulary sort costs far more on CPU (e.g. 450 ms vs 30 ms for
    [32, 50257]). Equivalent to keeping token i of the descending order while the mass strictly
    before it is < top_p.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    keys = _float_order_keys(logits)

    def halve(_, bounds):
        lo, hi = bounds  # invariant: mass(keys >= lo) >= top_p > mass(keys >= hi), or lo = min
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
        enough = jnp.sum(jnp.where(keys >= mid, probs, 0.0), axis=-1, keepdims=True) >= top_p
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    bounds = (jnp.min(keys, axis=-1, keepdims=True), jnp.max(keys, axis=-1, keepdims=True))
    lo, _ = jax.lax.fori_loop(0, 32, halve, bounds)
    return keys >= lo


def _truncate(logits: Array, top_k: int, top_p: float) -> Array:
    """Set logits [..., vocab] outside the top-k / top-p set to -inf (ties with the cut-off kept)."""
    vocab = logits.shape[-1]
    if not 0 < top_k < vocab:
        if top_p < 1:
            logits = jnp.where(jax.lax.stop_gradient(_top_p_keep(logits, top_p)), logits, -jnp.inf)
        return logits
    ranked = jax.lax.top_k(logits, top_k)[0]  # sorted, descending
    if top_p < 1:  # top-p over the renormalised top-k set: a k-long cumsum
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # 0 for the first token: it is always kept
        n_keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(ranked, n_keep - 1, axis=-1)
    else:
        cutoff = ranked[..., -1:]
    return jnp.where(logits >= jax.lax.stop_gradient(cutoff), logits, -jnp.inf)


def sampling_logits(logits: Array, sampling: SamplingParams) -> Array:
    """The logits [..., vocab] actually sampled from: / temperature, truncated (-inf outside).

    Greedy decoding returns the logits unchanged (its logprobs are temperature-1 ones).
    """
    if sampling.greedy:
        return logits.astype(jnp.float32)
    return _truncate(logits.astype(jnp.float32) / sampling.temperature, sampling.top_k, sampling.top_p)


def sampling_log_probs(logits: Array, sampling: SamplingParams) -> Array:
    """Log-probs [..., vocab] of the distribution sampled from (-inf on truncated tokens)."""
    return jax.nn.log_softmax(sampling_logits(logits, sampling), axis=-1)


def logprobs_of(logits: Array, targets: Array, sampling: SamplingParams = SamplingParams()) -> Array:
    """float32 [...]: log-prob of `targets` [...] under the sampling distribution of logits [..., vocab].

    Computed as picked logit - logsumexp, without materialising the full log-softmax.
    """
    z = sampling_logits(logits, sampling)
    picked = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(z, axis=-1)


def vocab_chunked_logprobs(logits_block: Callable[[Array, int], Array], vocab: int, chunk: int,
                           targets: Array, sampling: SamplingParams,
                           entropy: bool = False) -> tuple[Array, Array | None]:
    """(log-prob of `targets` [...], entropy [...] or None) under softmax(logits / temperature),
    reading the logits `chunk` vocabulary columns at a time: no [..., vocab] array is made.

    logits_block(start, size) -> float32 [..., size]: the logits of columns [start, start + size)
    (`Decoder.logits_block`; start is traced). An online logsumexp (running max and rescaled sums)
    over ceil(vocab / chunk) blocks in a `lax.scan` whose body is rematerialised, so the backward
    keeps one block at a time too; the last block is shifted left to end at `vocab` and its
    columns already seen are masked. Equal to `logprobs_of` (and `entropy_from_log_probs`) up to
    float32 rounding. Truncated sampling (top-k / top-p) needs the whole vocabulary: refused.
    """
    if sampling.top_k or sampling.top_p < 1:
        raise RlftError("vocabulary chunks need untruncated sampling (top_k=0, top_p=1): top-k and "
                        "top-p read the whole vocabulary")
    if not 0 < chunk < vocab:
        raise RlftError(f"vocabulary chunk {chunk}: must be in [1, {vocab})")
    temperature = 1.0 if sampling.greedy else sampling.temperature
    blocks = -(-vocab // chunk)
    targets = targets.astype(jnp.int32)

    @jax.checkpoint
    def body(carry, i):
        top, total, weighted, picked = carry
        start = jnp.minimum(i * chunk, vocab - chunk)
        columns = start + jnp.arange(chunk)
        fresh = columns >= i * chunk  # the shifted last block: columns of earlier blocks are masked
        z = logits_block(start, chunk) / temperature  # finite; columns seen before are <= top
        new_top = jnp.maximum(top, jax.lax.stop_gradient(jnp.max(jnp.where(fresh, z, -jnp.inf), axis=-1)))
        scale = jnp.exp(top - new_top)
        e = jnp.where(fresh, jnp.exp(z - new_top[..., None]), 0.0)
        total = total * scale + jnp.sum(e, axis=-1)
        if entropy:
            weighted = weighted * scale + jnp.sum(e * z, axis=-1)
        picked = picked + jnp.sum(jnp.where((columns == targets[..., None]) & fresh, z, 0.0), axis=-1)
        return (new_top, total, weighted, picked), None

    zeros = jnp.zeros(targets.shape, jnp.float32)
    init = (jnp.full(targets.shape, -jnp.inf, jnp.float32), zeros, zeros, zeros)
    (top, total, weighted, picked), _ = jax.lax.scan(body, init, jnp.arange(blocks))
    lse = top + jnp.log(total)
    return picked - lse, (lse - weighted / total) if entropy else None


def next_tokens(tokens: Array) -> Array:
    """int32 [B, T]: tokens[:, t + 1] at t; the last column (no next token) repeats column 0."""
    tokens = tokens.astype(jnp.int32)
    return jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)


def token_logprobs(logits: Array, tokens: Array, sampling: SamplingParams = SamplingParams()) -> Array:
    """[B, T] log p(tokens[:, t] | tokens[:, :t]) from logits [B, T, V]; entry 0 is 0.

    logits[:, t - 1] predicts tokens[:, t]. The targets are shifted rather than the logits, so no
    [B, T - 1, V] slice of the logits (nor a padded copy of its gradient) is made.
    """
    logp = logprobs_of(logits, next_tokens(tokens), sampling)  # position t scores tokens[:, t + 1]
    return jnp.concatenate([jnp.zeros_like(logp[:, :1]), logp[:, :-1]], axis=1)


def sequence_logprobs(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array, positions: Array,
                      segment_ids: Array, *, start: int = 1,
                      sampling: SamplingParams = SamplingParams()) -> Array:
    """float32 [B, T - start]: log p(tokens[:, t] | tokens[:, :t]) for t >= start, under `sampling`.

    One forward of the Decoder `graphdef`/`params` over int [B, T] inputs; only the columns that
    predict tokens[:, start:] go through the LM head (start = the prompt width for left-padded
    prompt + completion rows, 1 for right-padded rows). Entries of padding may be -inf under top-k/top-p:
    mask them with `jnp.where`, not a multiplication.
    """
    if not 1 <= start < tokens.shape[1] + 1:
        raise RlftError(f"sequence_logprobs: start={start} outside [1, {tokens.shape[1]}]")
    model = nnx.merge(graphdef, params)
    hidden, _ = model.hidden(tokens, positions, segment_ids)
    logits = model.logits_from_hidden(hidden[:, start - 1:-1])
    return logprobs_of(logits, tokens[:, start:], sampling)
