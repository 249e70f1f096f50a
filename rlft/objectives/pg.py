"""Policy-gradient losses: the PPO clipped surrogate, CISPO, GSPO's sequence ratio, truncated
importance sampling, the clipped value loss, entropy, aggregation.

Each family is a `rlft.registry.Registry` that is also the dispatch, so a flag may name a user's own
"module:function" with the family's contract: policy losses (`POLICY_LOSSES`, rl.policy_loss,
called through `policy_loss`) and aggregations (`AGGREGATIONS`, rl.loss_aggregation, `aggregate`).

Policy losses by name, each fn(logp, old_logp, advantages,
log_ratio, *, eps_low, eps_high, clip) -> (loss [B, T], stats) with `log_ratio` [B, T] from
`log_ratios` (rl.ratio_level: per token, or GSPO's sequence ratio on every token):

    clipped   PPO's −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A)
    cispo     CISPO's −sg(min(r, 1 + ε_high))·A·log π: the weight is clipped, no token loses its gradient

Per-token losses are [batch, length] float32 and unaggregated; `aggregate` turns them into a
(sum, count) pair whose parts add across micro-batches and devices, so dividing once at the end
gives the same gradient however the batch is split:

    token-mean            Σ x·m / Σ m                    (every token weighs the same; PPO, DAPO)
    seq-mean-token-mean   Σ_b (Σ_t x·m / Σ_t m) / B      (every sequence weighs the same; GRPO)
    seq-mean-token-sum    Σ_b Σ_t x·m / B
    fixed-length          Σ x·m / (B · max_length)       (Dr. GRPO's constant normaliser)

B counts every row of the batch, including rows with no mask token (they add 0 to the sum), so a
split of the batch never changes the normaliser.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlft.errors import RlftError
from rlft.registry import Registry

Array = jax.Array


def _masked(per_token: Array, mask: Array) -> tuple[Array, Array]:
    """(x where mask > 0 else 0, mask as float32); padding values are never read."""
    keep = mask > 0
    return jnp.where(keep, jnp.asarray(per_token, jnp.float32), 0.0), keep.astype(jnp.float32)


def _rows(x: Array) -> Array:
    return jnp.asarray(x.shape[0], jnp.float32)


def _token_mean(per_token: Array, mask: Array, max_length: int) -> tuple[Array, Array]:
    """(Σ x·m, Σ m): the mean over all completion tokens of the batch."""
    del max_length
    x, m = _masked(per_token, mask)
    return jnp.sum(x), jnp.sum(m)


def _seq_mean_token_mean(per_token: Array, mask: Array, max_length: int) -> tuple[Array, Array]:
    """(Σ_b Σ_t x·m / max(Σ_t m, 1), B): the mean over sequences of each sequence's token mean."""
    del max_length
    x, m = _masked(per_token, mask)
    per_row = jnp.sum(x, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
    return jnp.sum(per_row), _rows(x)


def _seq_mean_token_sum(per_token: Array, mask: Array, max_length: int) -> tuple[Array, Array]:
    """(Σ x·m, B): the mean over sequences of each sequence's token sum."""
    del max_length
    x, _ = _masked(per_token, mask)
    return jnp.sum(x), _rows(x)


def _fixed_length(per_token: Array, mask: Array, max_length: int) -> tuple[Array, Array]:
    """(Σ x·m, B·max_length): a normaliser that does not depend on the completions' lengths."""
    x, _ = _masked(per_token, mask)
    return jnp.sum(x), _rows(x) * float(max_length)


AGGREGATIONS = Registry(
    "loss aggregation",
    "fn(per_token, mask, max_length) -> (loss_sum, count): per_token and mask float32 [rows, length] "
    "(mask 1 on the tokens in the loss), max_length the completion width (rl.max_new_tokens); two float32 "
    "scalars that add across micro-batches and devices (the loss is Σ loss_sum / Σ count)",
    {"token-mean": _token_mean, "seq-mean-token-mean": _seq_mean_token_mean,
     "seq-mean-token-sum": _seq_mean_token_sum, "fixed-length": _fixed_length})
"""rl.loss_aggregation: the built-ins above, or a user's "module:function" (AGGREGATIONS.contract)."""


def check_aggregation(name: str, field: str = "rl.loss_aggregation") -> None:
    """Raises RlftError naming `field` unless `name` is an entry of AGGREGATIONS or an importable
    "module:function"."""
    AGGREGATIONS.check(name, field)


def aggregate(per_token: Array, mask: Array, mode: str, max_length: int,
              field: str = "rl.loss_aggregation") -> tuple[Array, Array]:
    """(sum, count) float32 scalars of per_token [B, T] under mask [B, T] for a static `mode`
    (an entry of AGGREGATIONS or "module:function", its return checked).

    `max_length` is the completion length normaliser of "fixed-length" (usually the sampler's
    max_new_tokens); the other modes ignore it.
    """
    out = AGGREGATIONS.expect_pair(AGGREGATIONS.call(mode, field, per_token, mask, max_length), mode, field,
                                   "(loss_sum, count)")
    for part in out:
        AGGREGATIONS.expect_shape(part, (), mode, field, "returned a part of")
    return jnp.asarray(out[0], jnp.float32), jnp.asarray(out[1], jnp.float32)


def sequence_log_ratio(logp: Array, old_logp: Array, mask: Array) -> Array:
    """float32 [B]: GSPO's length-normalised sequence log-ratio Σ_t m·(logp − old_logp) / Σ_t m
    (Zheng et al. 2025); 0 for a row without mask tokens. logp, old_logp, mask: [B, T]."""
    keep = mask > 0
    diff = jnp.where(keep, jnp.asarray(logp, jnp.float32) - jnp.asarray(old_logp, jnp.float32), 0.0)
    return jnp.sum(diff, axis=-1) / jnp.maximum(jnp.sum(keep, axis=-1), 1).astype(jnp.float32)


RATIO_LEVELS = ("token", "sequence")


def log_ratios(logp: Array, old_logp: Array, mask: Array, level: str = "token") -> Array:
    """float32 [B, T]: the log importance ratio each token's loss uses (old_logp a constant).

    "token": logp − old_logp. "sequence" (GSPO-token): sg(sequence_log_ratio) + logp − sg(logp),
    whose value is the sequence's ratio on every token and whose gradient is each token's own
    ∇logp, so exp(·) = s_i·π(y_t)/sg(π(y_t)) as in GSPO's token form.
    """
    logp = jnp.asarray(logp, jnp.float32)
    old_logp = jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32))
    if level == "token":
        return logp - old_logp
    if level == "sequence":
        seq = jax.lax.stop_gradient(sequence_log_ratio(logp, old_logp, mask))
        return seq[:, None] + logp - jax.lax.stop_gradient(logp)
    raise RlftError(f"rl.ratio_level={level!r}: expected one of {list(RATIO_LEVELS)}")


def truncated_is_weights(trainer_logp: Array, sampler_logp: Array, mask: Array, level: str,
                         cap: float) -> Array:
    """float32 [B, T], constants: truncated importance-sampling weights against the sampler /
    trainer mismatch, min(π_trainer/π_sampler, cap) per token ("token") or of the whole sequence
    (exp(Σ_t m·(trainer − sampler)), "sequence"); 1 for "none". Inputs [B, T] log-probs of the
    sampled tokens under the trainer (before the update) and under the sampler."""
    if level == "none":
        return jnp.ones(jnp.shape(trainer_logp), jnp.float32)
    diff = jnp.where(mask > 0, jnp.asarray(trainer_logp, jnp.float32) - jnp.asarray(sampler_logp, jnp.float32), 0.0)
    if level == "sequence":
        diff = jnp.broadcast_to(jnp.sum(diff, axis=-1, keepdims=True), diff.shape)
    elif level != "token":
        raise RlftError(f"rl.tis={level!r}: expected one of ['none', 'token', 'sequence']")
    return jax.lax.stop_gradient(jnp.minimum(jnp.exp(diff), cap))


def clipped_surrogate(logp: Array, old_logp: Array, advantages: Array, log_ratio: Array | None = None, *,
                      eps_low: float, eps_high: float, clip: bool = True) -> tuple[Array, dict[str, Array]]:
    """PPO's clipped surrogate, per token (Schulman et al. 2017; asymmetric ε as in DAPO).

    Args:
      logp: [B, T] log-probs of the sampled tokens under the current policy (differentiated).
      old_logp: [B, T] log-probs under the policy that sampled them (treated as constants).
      advantages: [B, T] (sequence-level advantages broadcast over tokens by the caller).
      eps_low, eps_high: the ratio band [1 − eps_low, 1 + eps_high].
      log_ratio: [B, T] log-ratios to use (`log_ratios`, e.g. GSPO's sequence level); default
        logp − old_logp.
      clip: False gives the plain importance-weighted policy gradient −ratio·A, whose gradient
        at ratio 1 is −A·∇logp.

    Returns:
      (loss [B, T], stats), loss = −min(ratio·A, clip(ratio, 1 − eps_low, 1 + eps_high)·A) with
      ratio = exp(logp − old_logp). stats holds stop-gradient'ed per-token arrays:
        "ratio":     the importance ratio;
        "clipped":   1.0 where the clipped branch is strictly the smaller one, i.e. the clip
                     changed the objective and zeroed the token's gradient:
                     (A > 0 & ratio > 1 + eps_high) | (A < 0 & ratio < 1 − eps_low); 0 if clip=False;
        "approx_kl": (ratio − 1) − log ratio, the k3 estimator of KL(π_old‖π) on tokens sampled
                     from π_old (what trl/PPO report as policy/approxkl); >= 0, 0 at ratio 1.
    """
    logp = jnp.asarray(logp, jnp.float32)
    old_logp = jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32))
    advantages = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    log_ratio = logp - old_logp if log_ratio is None else log_ratio
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * advantages
    if clip:
        clipped_ratio = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
        loss = -jnp.minimum(unclipped, clipped_ratio * advantages)
        active = ((advantages > 0) & (ratio > 1.0 + eps_high)) | ((advantages < 0) & (ratio < 1.0 - eps_low))
    else:
        loss = -unclipped
        active = jnp.zeros(ratio.shape, bool)
    stats = {
        "ratio": ratio,
        "clipped": active.astype(jnp.float32),
        "approx_kl": (ratio - 1.0) - log_ratio,
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, stats)


def cispo_loss(logp: Array, old_logp: Array, advantages: Array, log_ratio: Array | None = None, *,
               eps_low: float = 0.0, eps_high: float, clip: bool = True) -> tuple[Array, dict[str, Array]]:
    """CISPO (MiniMax-M1, 2025) per token [B, T]: −sg(min(ratio, 1 + eps_high))·A·logp.

    The importance weight is clipped and held constant, so every token keeps a gradient,
    −min(ratio, 1 + ε_high)·A·∇logp (PPO's clip zeroes it instead). eps_low is unused (no lower
    bound); clip=False leaves the weight unclipped. stats as `clipped_surrogate`'s, "clipped"
    marking tokens whose weight was capped.
    """
    del eps_low
    logp = jnp.asarray(logp, jnp.float32)
    old_logp = jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32))
    advantages = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    log_ratio = logp - old_logp if log_ratio is None else log_ratio
    ratio = jax.lax.stop_gradient(jnp.exp(log_ratio))
    weight = jnp.minimum(ratio, 1.0 + eps_high) if clip else ratio
    loss = -weight * advantages * logp
    stats = {"ratio": ratio, "clipped": (clip & (ratio > 1.0 + eps_high)).astype(jnp.float32),
             "approx_kl": (ratio - 1.0) - jax.lax.stop_gradient(log_ratio)}
    return loss, stats


POLICY_LOSSES = Registry(
    "policy loss",
    "fn(logp, old_logp, advantages, log_ratio, *, eps_low, eps_high, clip) -> (loss, stats): logp [rows, "
    "length] the sampled tokens' log-probs under the policy being updated (differentiate through it or "
    "through log_ratio, rl.ratio_level's log-ratios), old_logp and advantages [rows, length] constants, "
    "eps_low/eps_high/clip rl.clip_eps_low/high and rl.clip; loss float32 [rows, length] per token "
    "(aggregated by rl.loss_aggregation), stats a dict of [rows, length] arrays, any of 'ratio', "
    "'clipped', 'approx_kl' (logged as policy/ratio, policy/clipfrac, policy/approxkl)",
    {"clipped": clipped_surrogate, "cispo": cispo_loss})
"""rl.policy_loss: the built-ins above, or a user's "module:function" (POLICY_LOSSES.contract)."""


def check_policy_loss(name: str, field: str = "rl.policy_loss") -> None:
    """Raises RlftError naming `field` unless `name` is an entry of POLICY_LOSSES or an importable
    "module:function"."""
    POLICY_LOSSES.check(name, field)


def policy_loss(name: str, logp: Array, old_logp: Array, advantages: Array, log_ratio: Array, *,
                eps_low: float, eps_high: float, clip: bool,
                field: str = "rl.policy_loss") -> tuple[Array, dict[str, Array]]:
    """(loss [B, T], stats) of the policy loss `name` (an entry of POLICY_LOSSES or "module:function"),
    its return checked against the contract (a clear error while the first step compiles)."""
    out = POLICY_LOSSES.call(name, field, logp, old_logp, advantages, log_ratio, eps_low=eps_low,
                             eps_high=eps_high, clip=clip)
    loss, stats = POLICY_LOSSES.expect_pair(out, name, field, "(loss, stats dict)")
    if not isinstance(stats, dict):
        raise RlftError(f"{field}={name!r} returned stats as a {type(stats).__name__}, expected a dict; the "
                        f"contract is {POLICY_LOSSES.contract}")
    POLICY_LOSSES.expect_shape(loss, logp.shape, name, field, "returned a loss of")
    for key, value in stats.items():
        POLICY_LOSSES.expect_shape(value, logp.shape, name, field, f"returned stats[{key!r}] of")
    return jnp.asarray(loss, jnp.float32), stats


def value_loss(values: Array, old_values: Array, returns: Array, *,
               clip_eps: float | None) -> tuple[Array, dict[str, Array]]:
    """PPO's clipped value loss per token [B, T].

    0.5·max((v − R)², (clip(v, v_old − ε, v_old + ε) − R)²); with `clip_eps` None or <= 0 (a
    static Python float) the unclipped 0.5·(v − R)². stats["clipped"] is 1.0 (stop-gradient'ed)
    where the clipped term is strictly the larger one, i.e. where clipping zeroed the gradient.
    """
    values = jnp.asarray(values, jnp.float32)
    old_values = jax.lax.stop_gradient(jnp.asarray(old_values, jnp.float32))
    returns = jax.lax.stop_gradient(jnp.asarray(returns, jnp.float32))
    unclipped = jnp.square(values - returns)
    if clip_eps is None or clip_eps <= 0:
        return 0.5 * unclipped, {"clipped": jnp.zeros(values.shape, jnp.float32)}
    clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    clipped = jnp.square(clipped_values - returns)
    loss = 0.5 * jnp.maximum(unclipped, clipped)
    return loss, {"clipped": jax.lax.stop_gradient((clipped > unclipped).astype(jnp.float32))}


def entropy_from_log_probs(log_probs: Array) -> Array:
    """Entropy −Σ_v p log p [...] of normalised log-probs [..., V], in float32.

    Entries of −inf (tokens removed by top-k/top-p truncation) contribute 0, and neither the
    value nor its gradient is NaN (the −inf is replaced before the product, not after).
    """
    log_probs = jnp.asarray(log_probs, jnp.float32)
    kept = log_probs != -jnp.inf  # a NaN input still gives NaN
    safe = jnp.where(kept, log_probs, 0.0)
    return -jnp.sum(jnp.where(kept, jnp.exp(safe) * safe, 0.0), axis=-1)


def check_pg_args(eps_low: float, eps_high: float, vf_clip: float | None = None) -> None:
    """Raises RlftError naming the out-of-range field: `rl.clip_eps_low` must be in [0, 1),
    `rl.clip_eps_high` >= 0 and `rl.vf_clip` None or >= 0 (0 = no value clipping)."""
    if not 0.0 <= eps_low < 1.0:
        raise RlftError(f"rl.clip_eps_low={eps_low}: must be in [0, 1)")
    if not eps_high >= 0.0:
        raise RlftError(f"rl.clip_eps_high={eps_high}: must be >= 0")
    if vf_clip is not None and not vf_clip >= 0.0:
        raise RlftError(f"rl.vf_clip={vf_clip}: must be >= 0 (or None for no value clipping)")
