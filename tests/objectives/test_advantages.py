"""Advantage estimators against plain numpy loops and hand-computed numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlft.errors import RlftError
from rlft.objectives import advantages as adv


def gae_reference(rewards, values, lengths, gamma, lam):
    """The textbook double loop: for each row, walk back from its last real token."""
    batch, length = rewards.shape
    advantages = np.zeros((batch, length))
    for b in range(batch):
        for t in range(lengths[b]):
            total = 0.0
            for k in range(t, lengths[b]):
                next_value = values[b, k + 1] if k + 1 < lengths[b] else 0.0
                delta = rewards[b, k] + gamma * next_value - values[b, k]
                total += (gamma * lam) ** (k - t) * delta
            advantages[b, t] = total
    returns = np.where(np.arange(length) < np.asarray(lengths)[:, None], advantages + values, 0.0)
    return advantages, returns


def random_batch(seed, lengths, length=9):
    rng = np.random.default_rng(seed)
    batch = len(lengths)
    rewards = rng.normal(size=(batch, length)).astype(np.float32)
    values = rng.normal(size=(batch, length)).astype(np.float32)
    mask = (np.arange(length) < np.asarray(lengths)[:, None]).astype(np.float32)
    return rewards, values, mask


LENGTHS = [9, 1, 5, 0, 3]  # a full row, a row of length 1, an empty row


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (0.5, 0.0), (1.0, 1.0)])
def test_gae_matches_numpy_loop(gamma, lam):
    rewards, values, mask = random_batch(0, LENGTHS)
    advantages, returns = adv.gae(rewards, values, mask, gamma, lam)
    expected_adv, expected_ret = gae_reference(rewards.astype(np.float64), values.astype(np.float64),
                                               LENGTHS, gamma, lam)
    assert advantages.dtype == jnp.float32 and advantages.shape == rewards.shape
    np.testing.assert_allclose(advantages, expected_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, expected_ret, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, np.where(mask > 0, np.asarray(advantages) + values, 0.0), atol=1e-6)


def test_gae_is_zero_outside_mask_and_ignores_padding_values():
    rewards, values, mask = random_batch(1, LENGTHS)
    advantages, returns = adv.gae(rewards, values, mask, 0.9, 0.95)
    assert np.all(np.asarray(advantages)[mask == 0] == 0) and np.all(np.asarray(returns)[mask == 0] == 0)
    garbage_r = np.where(mask > 0, rewards, np.nan)
    garbage_v = np.where(mask > 0, values, 1e6)
    adv2, ret2 = adv.gae(garbage_r, garbage_v, mask, 0.9, 0.95)
    np.testing.assert_array_equal(adv2, advantages)
    np.testing.assert_array_equal(ret2, returns)


def test_gae_last_token_bootstraps_zero():
    # One token: A = r − V (no value after the episode ends), whatever the next column holds.
    rewards = np.array([[2.0, 5.0, 7.0]], np.float32)
    values = np.array([[0.5, 100.0, 100.0]], np.float32)
    mask = np.array([[1.0, 0.0, 0.0]], np.float32)
    advantages, returns = adv.gae(rewards, values, mask, 0.9, 0.95)
    np.testing.assert_allclose(advantages, [[1.5, 0.0, 0.0]])
    np.testing.assert_allclose(returns, [[2.0, 0.0, 0.0]])


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards, values, mask = random_batch(2, LENGTHS)
    advantages, returns = adv.gae(rewards, values, mask, 1.0, 1.0)
    masked_r = rewards * mask
    reward_to_go = np.cumsum(masked_r[:, ::-1], axis=1)[:, ::-1]
    np.testing.assert_allclose(advantages, (reward_to_go - values) * mask, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, reward_to_go * mask, rtol=1e-5, atol=1e-5)


def test_gae_hand_example():
    # γ = 0.5, λ = 0.5, two tokens: δ1 = 1 − 2 = −1, δ0 = 0 + 0.5·2 − 1 = 0, A0 = 0 + 0.25·(−1).
    advantages, returns = adv.gae(np.array([[0.0, 1.0]]), np.array([[1.0, 2.0]]), np.ones((1, 2)), 0.5, 0.5)
    np.testing.assert_allclose(advantages, [[-0.25, -1.0]])
    np.testing.assert_allclose(returns, [[0.75, 1.0]])


def test_gae_jits_with_traced_gamma_lambda():
    rewards, values, mask = random_batch(3, LENGTHS)
    fn = jax.jit(adv.gae)
    for gamma, lam in [(0.9, 0.8), (1.0, 0.95)]:
        eager = adv.gae(rewards, values, mask, gamma, lam)
        jitted = fn(rewards, values, mask, gamma, lam)
        for a, b in zip(eager, jitted):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_grpo_hand_example():
    scores = np.array([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 1.0]], np.float32)
    # Row 0: mean 3, deviations (−2, −1, 0, 3); unbiased var = 14/3, population var = 14/4.
    # Row 1: mean 0.5, deviations ±0.5; unbiased var = 1/3, population var = 1/4.
    out = adv.grpo(scores, eps=0.0)
    np.testing.assert_allclose(out[0], np.array([-2.0, -1.0, 0.0, 3.0]) / np.sqrt(14 / 3), rtol=1e-6)
    np.testing.assert_allclose(out[1], np.array([-0.5, -0.5, 0.5, 0.5]) / np.sqrt(1 / 3), rtol=1e-6)
    pop = adv.grpo(scores, ddof=0, eps=0.0)
    np.testing.assert_allclose(pop[0], np.array([-2.0, -1.0, 0.0, 3.0]) / np.sqrt(3.5), rtol=1e-6)
    np.testing.assert_allclose(pop[1], [-1.0, -1.0, 1.0, 1.0], rtol=1e-6)
    # ddof 0 divides by a smaller std, so the advantages are larger by sqrt(G / (G − 1)).
    np.testing.assert_allclose(pop, out * np.sqrt(4 / 3), rtol=1e-6)
    # eps is added to the std, not the variance.
    with_eps = adv.grpo(scores, eps=0.5)
    np.testing.assert_allclose(with_eps[1], np.array([-0.5, -0.5, 0.5, 0.5]) / (np.sqrt(1 / 3) + 0.5), rtol=1e-6)


def test_dr_grpo_is_mean_centred_only():
    scores = np.array([[1.0, 2.0, 3.0, 6.0]], np.float32)
    np.testing.assert_allclose(adv.grpo(scores, scale_by_std=False), [[-2.0, -1.0, 0.0, 3.0]])


def test_equal_scores_get_zero_advantage():
    scores = np.array([[0.7, 0.7, 0.7], [-2.0, -2.0, -2.0]], np.float32)
    for out in (adv.grpo(scores), adv.grpo(scores, ddof=0), adv.grpo(scores, scale_by_std=False),
                adv.rloo(scores)):
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out, 0.0, atol=1e-6)


@pytest.mark.parametrize("ddof", [0, 1])
def test_equal_scores_get_exactly_zero_advantage_for_any_eps(ddof):
    """rl.grpo_eps=0 passes validation: a group of equal rewards must still give 0, not 0/0 = NaN
    (values whose float mean differs from them in the last bit included), beside a normal group."""
    scores = np.array([[0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3], [1e-30, 1e-30, 1e-30, 1e-30, 1e-30, 1e-30, 1e-30],
                       [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]], np.float32)
    out = np.asarray(adv.grpo(scores, eps=0.0, ddof=ddof))
    assert np.all(out[:2] == 0.0), out
    centred = scores[2] - scores[2].mean()
    np.testing.assert_allclose(out[2], centred / scores[2].std(ddof=ddof), rtol=1e-5)
    assert np.all(np.asarray(adv.grpo(scores, scale_by_std=False))[:2] == 0.0)


def test_rloo_excludes_the_sample_itself():
    scores = np.array([[1.0, 2.0, 3.0, 6.0]], np.float32)
    out = np.asarray(adv.rloo(scores))
    # Entry 3: 6 − mean(1, 2, 3) = 4; entry 0: 1 − mean(2, 3, 6) = 1 − 11/3.
    np.testing.assert_allclose(out[0, 3], 4.0, rtol=1e-6)
    np.testing.assert_allclose(out[0, 0], 1.0 - 11.0 / 3.0, rtol=1e-6)
    np.testing.assert_allclose(out, [[1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 4.0]], rtol=1e-6)
    np.testing.assert_allclose(adv.rloo(np.array([[1.0, 3.0]])), [[-2.0, 2.0]])


def test_group_size_errors():
    with pytest.raises(RlftError, match="rl.group_size=1"):
        adv.rloo(np.ones((3, 1)))
    with pytest.raises(RlftError, match="rl.group_size=1"):
        adv.grpo(np.ones((3, 1)), ddof=1)
    np.testing.assert_allclose(adv.grpo(np.ones((3, 1)), ddof=0), 0.0)


def test_reinforce_and_baseline():
    scores = np.array([[1.0, 2.0], [3.0, 6.0]], np.float32)
    np.testing.assert_allclose(adv.reinforce(scores), scores)
    np.testing.assert_allclose(adv.reinforce(scores, jnp.float32(2.5)), scores - 2.5)
    # 0.9·1 + 0.1·mean(1, 2, 3, 6) = 0.9 + 0.3
    new = adv.update_baseline(jnp.float32(1.0), scores, 0.9)
    assert new.dtype == jnp.float32 and new.shape == ()
    np.testing.assert_allclose(new, 1.2, rtol=1e-6)
    np.testing.assert_allclose(adv.update_baseline(5.0, scores, 0.0), 3.0)
    np.testing.assert_allclose(adv.update_baseline(5.0, scores, 1.0), 5.0)
    step = jax.jit(lambda b, s: (adv.reinforce(s, b), adv.update_baseline(b, s, 0.5)))
    a, b = step(jnp.float32(1.0), scores)
    np.testing.assert_allclose(a, scores - 1.0)
    np.testing.assert_allclose(b, 0.5 + 0.5 * 3.0)


def test_whiten_masked_statistics():
    rng = np.random.default_rng(4)
    x = rng.normal(3.0, 5.0, size=(4, 7)).astype(np.float32)
    mask = (np.arange(7) < np.array([7, 2, 5, 1])[:, None]).astype(np.float32)
    out = np.asarray(adv.whiten(x, mask))
    kept = out[mask > 0]
    np.testing.assert_allclose(kept.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(kept.std(), 1.0, rtol=1e-4)  # population std
    assert np.all(out[mask == 0] == 0)
    padded = np.where(mask > 0, x, np.float32(1e9))
    np.testing.assert_allclose(adv.whiten(padded, mask), out, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.isfinite(adv.whiten(np.where(mask > 0, x, np.nan), mask)), True)
    # Hand example: values (1, 3) -> mean 2, population std 1.
    np.testing.assert_allclose(adv.whiten(np.array([1.0, 3.0, 50.0]), np.array([1, 1, 0]), eps=0.0), [-1, 1, 0])
    # (1, 5): mean 3, std 2 -> (−1, 1), plus the mean again without the shift.
    np.testing.assert_allclose(adv.whiten(np.array([1.0, 5.0, 50.0]), np.array([1, 1, 0]), shift_mean=False,
                                          eps=0.0), [2.0, 4.0, 0])
    no_shift = np.asarray(adv.whiten(x, mask, shift_mean=False))[mask > 0]
    np.testing.assert_allclose(no_shift.mean(), x[mask > 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(no_shift.std(), 1.0, rtol=1e-4)
    np.testing.assert_allclose(jax.jit(adv.whiten)(x, mask), out, rtol=1e-6, atol=1e-6)


def test_registry_and_checker():
    assert set(adv.ESTIMATORS) == {"gae", "grpo", "rloo", "reinforce"}
    for name in adv.ESTIMATORS:
        adv.check_estimator(name)
    with pytest.raises(RlftError, match=r"rl\.advantage='ppo': expected one of \['gae', 'grpo'"):
        adv.check_estimator("ppo")
    with pytest.raises(RlftError, match=r"^x\.y='a'"):
        adv.check_estimator("a", field="x.y")
