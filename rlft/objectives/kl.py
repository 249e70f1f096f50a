"""KL to the reference policy: per-token estimators, where the penalty goes, and its coefficient.

With samples from the policy π and r = π_ref/π (log r = ref_logp − logp), per token:

    k1 = −log r               unbiased for KL(π‖π_ref), high variance, can be negative
    k2 = ½ (log r)²           biased, low variance, >= 0
    k3 = (r − 1) − log r      unbiased, low variance, >= 0   (Schulman, "Approximating KL", 2020)

k3 exponentiates log r clipped to [−20, 20], so it never overflows: exact below −20 (the policy
far more confident than the reference), continued linearly with slope 1 above +20.

`KL_ESTIMATORS` is a `rlft.registry.Registry`: rl.kl.estimator may name a user's "module:function".

Placements (`KL_PLACEMENTS`): "reward" subtracts β·k per token from the reward (PPO/RLHF; k1 there
gives the right gradient), "loss" adds β·mean(k) to the loss (GRPO; k3 as a loss is biased).

The coefficient β is a float32 scalar in the RL state, updated after each batch by a controller:
"fixed" keeps it, "adaptive" is Ziegler et al. (2019):
    β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon),  n = sequences in this update.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from rlft.errors import RlftError
from rlft.registry import Registry

Array = jax.Array

LOG_RATIO_CLIP = 20.0  # k3 exponentiates a clipped log-ratio, so it never overflows


def _k1(log_ratio: Array) -> Array:
    return -log_ratio


def _k2(log_ratio: Array) -> Array:
    return 0.5 * jnp.square(log_ratio)


def _k3(log_ratio: Array) -> Array:
    # exp of the clipped log-ratio c keeps it finite. Below −20 the result stays exact to float32
    # (expm1(l) = −1 there) and keeps its gradient; above +20 it continues linearly with slope 1
    # (a lower bound of the true value): expm1(c) − c + |l − c| is >= 0 and finite everywhere.
    clipped = jnp.clip(log_ratio, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    return jnp.expm1(clipped) - clipped + jnp.abs(log_ratio - clipped)


KL_ESTIMATORS = Registry(
    "KL estimator",
    "fn(log_ratio) -> kl: log_ratio float32 [...] = log π_ref − log π of the sampled tokens (sampled from "
    "π), kl the per-token estimate of KL(π‖π_ref), same shape (masking is the caller's)",
    {"k1": _k1, "k2": _k2, "k3": _k3})
"""rl.kl.estimator: k1, k2, k3 or a user's "module:function" (KL_ESTIMATORS.contract)."""

KL_PLACEMENTS: tuple[str, ...] = ("reward", "loss")


def kl_estimate(logp: Array, ref_logp: Array, estimator: str, field: str = "rl.kl.estimator") -> Array:
    """Per-token KL estimate [...] (float32) from policy and reference log-probs of the sampled tokens.

    `logp` and `ref_logp` have the same shape (e.g. [batch, length]); masking is the caller's.
    `estimator` is a static entry of KL_ESTIMATORS or a "module:function" (its return shape checked).
    """
    log_ratio = jnp.asarray(ref_logp, jnp.float32) - jnp.asarray(logp, jnp.float32)
    out = KL_ESTIMATORS.call(estimator, field, log_ratio)
    KL_ESTIMATORS.expect_shape(out, log_ratio.shape, estimator, field)
    return jnp.asarray(out, jnp.float32)


def check_kl_estimator(name: str, field: str = "rl.kl.estimator") -> None:
    """Raises RlftError naming `field` unless `name` is an entry of KL_ESTIMATORS or an importable
    "module:function"."""
    KL_ESTIMATORS.check(name, field)


def check_kl_placement(name: str, field: str = "rl.kl.placement") -> None:
    """Raises RlftError naming `field` when `name` is not in KL_PLACEMENTS."""
    if name not in KL_PLACEMENTS:
        raise RlftError(f"{field}={name!r}: expected one of {list(KL_PLACEMENTS)}")


def fixed_kl_coef(coef: Array | float, observed_kl: Array | float, n_steps: Array | int, *,
                  target: float | None = None, horizon: float | None = None) -> Array:
    """The fixed controller: returns `coef` unchanged (as float32 [])."""
    del observed_kl, n_steps, target, horizon
    return jnp.asarray(coef, jnp.float32)


def adaptive_kl_coef(coef: Array | float, observed_kl: Array | float, n_steps: Array | int, *,
                     target: float, horizon: float) -> Array:
    """Ziegler et al.'s proportional controller; float32 [].

    β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon), where `observed_kl` is the batch's mean
    KL per sequence and `n_steps` the number of sequences in this update.
    """
    coef = jnp.asarray(coef, jnp.float32)
    error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * jnp.asarray(n_steps, jnp.float32) / horizon)


KL_CONTROLLERS: dict[str, Callable[..., Array]] = {"fixed": fixed_kl_coef, "adaptive": adaptive_kl_coef}


def check_kl_controller(name: str, *, target: float | None = None, horizon: float | None = None,
                        field: str = "rl.kl.controller") -> None:
    """Raises RlftError naming the bad field: an unknown controller, or, for "adaptive", a target
    (`rl.kl.target`) or horizon (`rl.kl.horizon`) that is missing or not > 0."""
    if name not in KL_CONTROLLERS:
        raise RlftError(f"{field}={name!r}: expected one of {sorted(KL_CONTROLLERS)}")
    if name == "adaptive":
        for key, value in (("target", target), ("horizon", horizon)):
            if value is None or not value > 0:
                raise RlftError(f"rl.kl.{key}={value}: must be > 0 for {field}='adaptive'")


def check_kl_coef(coef: float, field: str = "rl.kl.coef") -> None:
    """Raises RlftError naming `field` when the initial KL coefficient is negative or NaN."""
    if not coef >= 0:
        raise RlftError(f"{field}={coef}: must be >= 0")
