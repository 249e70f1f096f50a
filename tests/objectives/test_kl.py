"""KL estimators against closed forms (Monte Carlo), KL controllers against their formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlft.errors import RlftError
from rlft.objectives import kl

P = np.array([0.6, 0.2, 0.1, 0.07, 0.03])  # the policy
Q = np.array([0.1, 0.2, 0.3, 0.2, 0.2])  # the reference


@pytest.fixture(scope="module")
def samples():
    tokens = np.random.default_rng(0).choice(len(P), size=200_000, p=P)
    return np.log(P)[tokens].astype(np.float32), np.log(Q)[tokens].astype(np.float32)


def monte_carlo_check(values, exact_mean, exact_second_moment):
    n = values.size
    sigma = np.sqrt(max(exact_second_moment - exact_mean**2, 0.0) / n)
    assert abs(values.mean() - exact_mean) < 5 * sigma + 1e-4, (values.mean(), exact_mean, sigma)


def test_k1_and_k3_are_unbiased_for_kl(samples):
    logp, ref_logp = samples
    log_pq = np.log(P / Q)
    exact_kl = np.sum(P * log_pq)
    assert exact_kl > 0.1  # the distributions are far enough apart for the check to mean something
    k1 = np.asarray(kl.kl_estimate(logp, ref_logp, "k1"), np.float64)
    monte_carlo_check(k1, exact_kl, np.sum(P * log_pq**2))
    k3_per_token = (Q / P - 1) - np.log(Q / P)
    k3 = np.asarray(kl.kl_estimate(logp, ref_logp, "k3"), np.float64)
    monte_carlo_check(k3, exact_kl, np.sum(P * k3_per_token**2))
    # A biased estimator would fail: k2's mean is a different number here.
    assert abs(0.5 * np.sum(P * log_pq**2) - exact_kl) > 0.2


def test_k2_mean_is_half_second_moment(samples):
    logp, ref_logp = samples
    log_pq = np.log(P / Q)
    k2 = np.asarray(kl.kl_estimate(logp, ref_logp, "k2"), np.float64)
    monte_carlo_check(k2, 0.5 * np.sum(P * log_pq**2), np.sum(P * (0.5 * log_pq**2) ** 2))


def test_estimators_per_token_formulas():
    logp = np.array([[-1.0, -2.0, -0.5]], np.float32)
    ref_logp = np.array([[-1.5, -1.0, -0.5]], np.float32)
    log_r = ref_logp - logp  # (−0.5, 1, 0)
    np.testing.assert_allclose(kl.kl_estimate(logp, ref_logp, "k1"), [[0.5, -1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(kl.kl_estimate(logp, ref_logp, "k2"), [[0.125, 0.5, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(kl.kl_estimate(logp, ref_logp, "k3"), np.expm1(log_r) - log_r, rtol=1e-6, atol=1e-7)
    out = kl.kl_estimate(jnp.asarray(logp, jnp.bfloat16), ref_logp, "k3")
    assert out.dtype == jnp.float32 and out.shape == (1, 3)


def test_k3_nonnegative_and_finite_everywhere():
    rng = np.random.default_rng(1)
    logp = rng.uniform(-60, 0, size=(64, 64)).astype(np.float32)
    ref_logp = rng.uniform(-60, 0, size=(64, 64)).astype(np.float32)
    k3 = np.asarray(kl.kl_estimate(logp, ref_logp, "k3"))
    assert np.all(np.isfinite(k3)) and np.all(k3 >= 0)
    extreme = np.array([-1e4, -100.0, -20.5, -20.0, 0.0, 20.0, 20.5, 100.0, 1e4], np.float32)
    k3 = np.asarray(kl.kl_estimate(np.zeros_like(extreme), extreme, "k3"))
    assert np.all(np.isfinite(k3)) and np.all(k3 >= 0)
    # Exact below the clip: the policy far more confident than the reference (log r = −30).
    np.testing.assert_allclose(kl.kl_estimate(0.0, -30.0, "k3"), np.expm1(-30.0) + 30.0, rtol=1e-6)
    # ... and its gradient survives there: d k3 / d logp = 1 − r.
    grad = jax.grad(lambda lp: kl.kl_estimate(lp, -30.0, "k3"))(0.0)
    np.testing.assert_allclose(grad, 1.0, rtol=1e-6)
    # Continuous at the upper clip.
    below, above = kl.kl_estimate(0.0, 20.0 - 1e-3, "k3"), kl.kl_estimate(0.0, 20.0 + 1e-3, "k3")
    np.testing.assert_allclose(below, above, rtol=1e-3)


def test_kl_estimate_jits():
    logp, ref_logp = np.log([[0.3, 0.6]]).astype(np.float32), np.log([[0.5, 0.5]]).astype(np.float32)
    for name in kl.KL_ESTIMATORS:
        fn = jax.jit(kl.kl_estimate, static_argnums=2)
        np.testing.assert_allclose(fn(logp, ref_logp, name), kl.kl_estimate(logp, ref_logp, name), rtol=1e-6)


def test_adaptive_controller_formula():
    target, horizon, n = 6.0, 10_000.0, 256
    step = lambda kl_value: kl.adaptive_kl_coef(jnp.float32(0.2), kl_value, n, target=target, horizon=horizon)
    # KL/target − 1 = 0.1: inside the clip.
    np.testing.assert_allclose(step(6.6), 0.2 * (1 + 0.1 * n / horizon), rtol=1e-6)
    # KL/target − 1 = −0.05: inside, below target the coefficient falls.
    np.testing.assert_allclose(step(5.7), 0.2 * (1 - 0.05 * n / horizon), rtol=1e-6)
    # Far above target (error 1.0) and far below (error −1.0): clipped to ±0.2.
    np.testing.assert_allclose(step(12.0), 0.2 * (1 + 0.2 * n / horizon), rtol=1e-6)
    np.testing.assert_allclose(step(0.0), 0.2 * (1 - 0.2 * n / horizon), rtol=1e-6)
    np.testing.assert_allclose(step(6.0), 0.2, rtol=1e-6)
    assert step(7.0) > 0.2 > step(5.0)
    out = jax.jit(lambda c, k, s: kl.adaptive_kl_coef(c, k, s, target=target, horizon=horizon))(
        jnp.float32(0.2), jnp.float32(12.0), jnp.int32(n))
    assert out.dtype == jnp.float32 and out.shape == ()
    np.testing.assert_allclose(out, 0.2 * (1 + 0.2 * n / horizon), rtol=1e-6)


def test_fixed_controller_is_constant():
    for observed in (0.0, 3.0, 100.0):
        out = kl.fixed_kl_coef(jnp.float32(0.05), observed, 512, target=6.0, horizon=10_000.0)
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, 0.05)
    assert set(kl.KL_CONTROLLERS) == {"fixed", "adaptive"}
    assert kl.KL_CONTROLLERS["adaptive"] is kl.adaptive_kl_coef


def test_checkers():
    assert set(kl.KL_ESTIMATORS) == {"k1", "k2", "k3"}
    assert kl.KL_PLACEMENTS == ("reward", "loss")
    with pytest.raises(RlftError, match=r"rl\.kl\.estimator='k9': expected one of \['k1', 'k2', 'k3'\]"):
        kl.kl_estimate(np.zeros(2), np.zeros(2), "k9")
    with pytest.raises(RlftError, match=r"rl\.kl\.estimator='k4'"):
        kl.check_kl_estimator("k4")
    with pytest.raises(RlftError, match=r"rl\.kl\.placement='advantage'"):
        kl.check_kl_placement("advantage")
    with pytest.raises(RlftError, match=r"rl\.kl\.controller='pid'"):
        kl.check_kl_controller("pid")
    with pytest.raises(RlftError, match=r"rl\.kl\.target=0"):
        kl.check_kl_controller("adaptive", target=0.0, horizon=10.0)
    with pytest.raises(RlftError, match=r"rl\.kl\.target=None"):
        kl.check_kl_controller("adaptive", horizon=10.0)
    with pytest.raises(RlftError, match=r"rl\.kl\.horizon=-1"):
        kl.check_kl_controller("adaptive", target=6.0, horizon=-1)
    with pytest.raises(RlftError, match=r"rl\.kl\.coef=-0\.1"):
        kl.check_kl_coef(-0.1)
    for name in kl.KL_ESTIMATORS:
        kl.check_kl_estimator(name)
    for name in kl.KL_PLACEMENTS:
        kl.check_kl_placement(name)
    kl.check_kl_controller("fixed")
    kl.check_kl_controller("adaptive", target=6.0, horizon=10_000)
    kl.check_kl_coef(0.0)
