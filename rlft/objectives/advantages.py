"""Advantage estimators for RL on language models: GAE, GRPO (and Dr. GRPO), RLOO, REINFORCE.

Token-level (PPO):
    gae(rewards, values, mask, γ, λ) -> (advantages, returns), all [batch, length]
Sequence-level (one scalar score per completion; the caller broadcasts the advantage over the
completion's tokens):
    grpo(scores [prompts, group])        (r − mean_group) / (std_group + ε)   (Shao et al. 2024)
    grpo(..., scale_by_std=False)        r − mean_group                        (Dr. GRPO, Liu et al. 2025)
    rloo(scores [prompts, group])        r − mean of the group's *other* samples (Ahmadian et al. 2024)
    reinforce(scores, baseline)          r − b, b an exponential moving average of past scores

`ESTIMATORS` (a `rlft.registry.Registry`) is the dispatch of rl.advantage: a user's sequence-level
estimator is "module:function" with the contract of `ESTIMATORS.contract`, called through
`sequence_advantages` like the built-ins.

`whiten` normalises advantages with masked statistics; PPO applies it after the returns have been
computed from the raw advantages, so the value targets are not whitened.

Everything is pure and jittable, computed in float32; the moving-average baseline is a float32
scalar that lives in the RL state and is threaded through `update_baseline`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlft.errors import RlftError
from rlft.ops import masked_mean
from rlft.registry import Registry

Array = jax.Array


def _f32(x: Array | float) -> Array:
    return jnp.asarray(x, dtype=jnp.float32)


def gae(rewards: Array, values: Array, mask: Array, gamma: float | Array,
        lam: float | Array) -> tuple[Array, Array]:
    """Generalised advantage estimation (Schulman et al. 2016) over masked completions.

    Args:
      rewards: [batch, length] per-token rewards (e.g. the score at the last real token plus a
        per-token KL penalty).
      values: [batch, length] value estimates V(s_t) of the state before token t.
      mask: [batch, length], 1 on a row's completion tokens (a contiguous block starting at
        column 0), 0 elsewhere.
      gamma, lam: discount γ and GAE parameter λ (Python floats or traced scalars).

    Returns:
      (advantages, returns), both float32 [batch, length] and 0 where mask is 0:
      δ_t = r_t + γ V_{t+1} − V_t and A_t = δ_t + γλ A_{t+1}, where V and A past a row's last real
      token are 0 (the episode ends there); returns = advantages + values. No whitening here.

    A reverse `lax.scan` over time; values and rewards at masked-out positions are never read
    (they may hold anything, even NaN).
    """
    mask = mask > 0
    rewards = jnp.where(mask, _f32(rewards), 0.0)
    values = jnp.where(mask, _f32(values), 0.0)
    gamma, lam = _f32(gamma), _f32(lam)

    def step(carry: tuple[Array, Array], xs: tuple[Array, Array, Array]):
        next_value, next_adv = carry  # already 0 past the last real token
        r, v, m = xs
        delta = r + gamma * next_value - v
        adv = jnp.where(m, delta + gamma * lam * next_adv, 0.0)
        return (v, adv), adv  # v is already 0 where m is 0

    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    _, adv_t = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
    advantages = adv_t.T
    returns = jnp.where(mask, advantages + values, 0.0)
    return advantages, returns


def _group_size(scores: Array, minimum: int, what: str) -> int:
    if scores.ndim != 2:
        raise RlftError(f"{what} expects scores of shape [prompts, group], got {scores.shape}")
    group = scores.shape[-1]
    if group < minimum:
        raise RlftError(f"rl.group_size={group}: {what} needs at least {minimum} samples per prompt")
    return group


def grpo(scores: Array, *, scale_by_std: bool = True, ddof: int = 1, eps: float = 1e-4, **_options) -> Array:
    """Group-relative advantages [prompts, group] of scores [prompts, group].

    (r − mean_group) / (std_group + eps), the std computed with `ddof` (1 = unbiased sample std,
    0 = population std). With `scale_by_std=False` the advantage is r − mean_group (Dr. GRPO,
    which drops the std to avoid up-weighting groups of nearly equal scores). A group whose
    scores are all equal gets advantage 0.
    """
    scores = _f32(scores)
    _group_size(scores, ddof + 1 if scale_by_std else 1, f"grpo (ddof={ddof})")
    # Exactly 0 for a group of equal scores, for any eps (0 included): the float mean of equal
    # values can differ from them in the last bit, and 0/0 would be NaN.
    equal = jnp.max(scores, axis=-1, keepdims=True) == jnp.min(scores, axis=-1, keepdims=True)
    centred = jnp.where(equal, 0.0, scores - jnp.mean(scores, axis=-1, keepdims=True))
    if not scale_by_std:
        return centred
    std = jnp.where(equal, 1.0, jnp.std(scores, axis=-1, keepdims=True, ddof=ddof))
    return centred / (std + eps)


def rloo(scores: Array, **_options) -> Array:
    """Leave-one-out advantages [prompts, group]: r_i − mean_{j≠i} r_j within each group.

    Equals G/(G − 1)·(r_i − mean_group) for group size G >= 2; no sample is its own baseline,
    so the estimator stays unbiased.
    """
    scores = _f32(scores)
    group = _group_size(scores, 2, "rloo")
    total = jnp.sum(scores, axis=-1, keepdims=True)
    return scores - (total - scores) / (group - 1)


def reinforce(scores: Array, baseline: Array | float | None = None, **_options) -> Array:
    """REINFORCE advantages: scores minus a scalar baseline (None = no baseline), same shape."""
    scores = _f32(scores)
    return scores if baseline is None else scores - _f32(baseline)


def update_baseline(baseline: Array | float, scores: Array, decay: float | Array) -> Array:
    """The moving-average baseline after a batch: decay·b + (1 − decay)·mean(scores), float32 []."""
    decay = _f32(decay)
    return decay * _f32(baseline) + (1.0 - decay) * jnp.mean(_f32(scores))


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """Masked whitening of x [...] (e.g. advantages [batch, length]).

    Uses the masked mean and the masked population variance (divided by the number of mask
    entries, not n − 1): (x − mean) / sqrt(var + eps). With `shift_mean=False` the mean is added
    back, so only the scale changes. Entries where mask is 0 are 0 in the result and their
    values never affect it.
    """
    keep = mask > 0
    x = jnp.where(keep, _f32(x), 0.0)
    mean = masked_mean(x, keep)
    var = masked_mean(jnp.square(x - mean), keep)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(keep, out, 0.0)


TOKEN_LEVEL = "gae"  # the token-level estimator (it needs a critic); every other entry is sequence-level

ESTIMATORS = Registry(
    "advantage estimator",
    "fn(scores, **options) -> advantages: scores float32 [prompts, group] (each completion's total reward, "
    "a prompt's completions in one row), advantages of the same shape, broadcast over each completion's "
    "tokens; options by keyword: baseline (float32 [], the moving average of past scores), scale_by_std, "
    "ddof, eps (rl.grpo_*): take **options and ignore what you do not use",
    {"gae": gae, "grpo": grpo, "rloo": rloo, "reinforce": reinforce})
"""rl.advantage: "gae" (token-level: gae(rewards, values, mask, gamma, lam) -> (advantages, returns)) or
a sequence-level estimator, built in (grpo, rloo, reinforce) or a user's "module:function", with the
contract fn(scores [prompts, group], **options) -> advantages [prompts, group] (ESTIMATORS.contract)."""


def sequence_advantages(name: str, scores: Array, field: str = "rl.advantage", **options) -> Array:
    """Advantages [prompts, group] of scores [prompts, group] by the sequence-level estimator `name`
    (a built-in or "module:function"), its return shape checked (a clear error at the first step)."""
    if name == TOKEN_LEVEL:
        raise RlftError(f"{field}={name!r} is token-level (it reads a critic's values), not sequence-level")
    out = ESTIMATORS.call(name, field, scores, **options)
    ESTIMATORS.expect_shape(out, scores.shape, name, field)
    return jnp.asarray(out, jnp.float32)


def check_estimator(name: str, field: str = "rl.advantage") -> None:
    """Raises RlftError naming `field` unless `name` is an entry of ESTIMATORS or an importable
    "module:function"."""
    ESTIMATORS.check(name, field)
