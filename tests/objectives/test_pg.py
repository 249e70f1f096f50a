"""Loss aggregation, the clipped surrogate, the value loss and entropy, on hand examples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlft.errors import RlftError
from rlft.objectives import pg, sequence_log_ratio
from rlft.objectives.pg import cispo_loss, clipped_surrogate, log_ratios, truncated_is_weights

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "fixed-length"]


def hand_batch():
    # 9 marks padding (never read); row lengths 4, 2, 1, 0.
    per_token = np.array([[1, 2, 3, 4], [5, 6, 9, 9], [7, 9, 9, 9], [9, 9, 9, 9]], np.float32)
    mask = (np.arange(4) < np.array([4, 2, 1, 0])[:, None]).astype(np.float32)
    return per_token, mask


@pytest.mark.parametrize("mode,expected", [
    ("token-mean", (28.0, 7.0)),                      # all completion tokens
    ("seq-mean-token-mean", (10 / 4 + 11 / 2 + 7.0, 4.0)),  # row means 2.5, 5.5, 7, 0; B = 4 rows
    ("seq-mean-token-sum", (28.0, 4.0)),              # row sums over B = 4 rows
    ("fixed-length", (28.0, 4.0 * 6)),                # B · max_length = 4 · 6
])
def test_aggregation_hand_example(mode, expected):
    per_token, mask = hand_batch()
    total, count = pg.aggregate(per_token, mask, mode, max_length=6)
    assert total.dtype == jnp.float32 and count.dtype == jnp.float32 and total.shape == count.shape == ()
    np.testing.assert_allclose((total, count), expected, rtol=1e-6)
    # NaN in the padding does not leak.
    garbage = np.where(mask > 0, per_token, np.nan)
    np.testing.assert_allclose(pg.aggregate(garbage, mask, mode, max_length=6), expected, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunks", [2, 4])
def test_aggregation_is_additive_over_row_chunks(mode, chunks):
    rng = np.random.default_rng(chunks)
    per_token = rng.normal(size=(8, 6)).astype(np.float32)
    lengths = np.array([6, 1, 3, 0, 5, 2, 6, 4])
    mask = (np.arange(6) < lengths[:, None]).astype(np.float32)
    total, count = pg.aggregate(per_token, mask, mode, 6)
    parts = [pg.aggregate(x, m, mode, 6) for x, m in zip(np.split(per_token, chunks), np.split(mask, chunks))]
    chunk_total = sum(p[0] for p in parts)
    chunk_count = sum(p[1] for p in parts)
    np.testing.assert_allclose(chunk_count, count, rtol=1e-6)
    np.testing.assert_allclose(chunk_total / chunk_count, total / count, rtol=1e-5)
    # The gradient of the whole batch's mean equals the chunks' gradients over the total count.
    whole = jax.grad(lambda x: jnp.divide(*pg.aggregate(x, mask, mode, 6)))(per_token)
    split = np.concatenate([
        jax.grad(lambda x, m=m: pg.aggregate(x, m, mode, 6)[0])(x) / chunk_count
        for x, m in zip(np.split(per_token, chunks), np.split(mask, chunks))])
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-7)


def test_aggregation_checker_and_jit():
    assert list(pg.AGGREGATIONS) == MODES
    for mode in MODES:
        pg.check_aggregation(mode)
        per_token, mask = hand_batch()
        jitted = jax.jit(pg.aggregate, static_argnums=(2, 3))(per_token, mask, mode, 6)
        np.testing.assert_allclose(jitted, pg.aggregate(per_token, mask, mode, 6), rtol=1e-6)
    with pytest.raises(RlftError, match=r"rl\.loss_aggregation='seq-mean': expected one of \["):
        pg.check_aggregation("seq-mean")
    with pytest.raises(RlftError, match=r"rl\.loss_aggregation='sum'"):
        pg.aggregate(np.zeros((1, 1)), np.ones((1, 1)), "sum", 1)


ADV = np.array([[1.5, -2.0, 0.5], [-0.3, 0.0, 3.0]], np.float32)


def surrogate_grad(logp, old_logp, advantages, **kw):
    return jax.grad(lambda lp: jnp.sum(pg.clipped_surrogate(lp, old_logp, advantages, **kw)[0]))(logp)


@pytest.mark.parametrize("clip", [True, False])
def test_surrogate_at_ratio_one(clip):
    old_logp = np.log(np.array([[0.3, 0.2, 0.9], [0.5, 0.1, 0.01]], np.float32))
    loss, stats = pg.clipped_surrogate(old_logp, old_logp, ADV, eps_low=0.2, eps_high=0.2, clip=clip)
    np.testing.assert_allclose(loss, -ADV, rtol=1e-6)
    np.testing.assert_allclose(stats["ratio"], 1.0)
    np.testing.assert_array_equal(stats["clipped"], 0.0)
    np.testing.assert_allclose(stats["approx_kl"], 0.0, atol=1e-7)
    assert all(v.shape == ADV.shape and v.dtype == jnp.float32 for v in stats.values())
    # The policy gradient: d loss / d logp = −A per token.
    np.testing.assert_allclose(surrogate_grad(old_logp, old_logp, ADV, eps_low=0.2, eps_high=0.2, clip=clip),
                               -ADV, rtol=1e-6)


def test_surrogate_outside_the_band():
    old_logp = np.zeros((1, 4), np.float32)
    ratio = np.array([[1.5, 1.5, 0.5, 0.5]], np.float32)
    advantages = np.array([[2.0, -2.0, -2.0, 2.0]], np.float32)
    logp = np.log(ratio)
    loss, stats = pg.clipped_surrogate(logp, old_logp, advantages, eps_low=0.2, eps_high=0.2)
    # A > 0 and ratio above 1 + ε: the clipped branch (1.2·A) wins, no gradient.
    # A < 0 and ratio above the band: the unclipped branch (more pessimistic) stays, gradient −A·ratio.
    # A < 0 and ratio below 1 − ε: clipped (0.8·A), no gradient.  A > 0 and ratio below: unclipped.
    np.testing.assert_allclose(loss, [[-2.4, 3.0, 1.6, -1.0]], rtol=1e-6)
    np.testing.assert_array_equal(stats["clipped"], [[1.0, 0.0, 1.0, 0.0]])
    grad = surrogate_grad(logp, old_logp, advantages, eps_low=0.2, eps_high=0.2)
    np.testing.assert_allclose(grad, [[0.0, 3.0, 0.0, -1.0]], rtol=1e-6)
    np.testing.assert_allclose(stats["ratio"], ratio, rtol=1e-6)
    np.testing.assert_allclose(stats["approx_kl"], (ratio - 1) - np.log(ratio), rtol=1e-5)
    assert np.all(np.asarray(stats["approx_kl"]) > 0)


def test_surrogate_asymmetric_band():
    old_logp = np.zeros((1, 4), np.float32)
    ratio = np.array([[1.25, 1.3, 0.85, 0.75]], np.float32)
    advantages = np.array([[1.0, 1.0, -1.0, -1.0]], np.float32)
    loss, stats = pg.clipped_surrogate(np.log(ratio), old_logp, advantages, eps_low=0.2, eps_high=0.28)
    np.testing.assert_array_equal(stats["clipped"], [[0.0, 1.0, 0.0, 1.0]])
    np.testing.assert_allclose(loss, [[-1.25, -1.28, 0.85, 0.8]], rtol=1e-6)


def test_plain_policy_gradient_when_clip_is_false():
    old_logp = np.zeros((1, 4), np.float32)
    ratio = np.array([[1.5, 1.5, 0.5, 0.5]], np.float32)
    advantages = np.array([[2.0, -2.0, -2.0, 2.0]], np.float32)
    loss, stats = pg.clipped_surrogate(np.log(ratio), old_logp, advantages, eps_low=0.2, eps_high=0.2, clip=False)
    np.testing.assert_allclose(loss, -ratio * advantages, rtol=1e-6)
    np.testing.assert_array_equal(stats["clipped"], 0.0)
    grad = surrogate_grad(np.log(ratio), old_logp, advantages, eps_low=0.2, eps_high=0.2, clip=False)
    np.testing.assert_allclose(grad, -ratio * advantages, rtol=1e-6)


def test_surrogate_stats_and_inputs_carry_no_gradient():
    logp = np.log(np.array([[0.3, 0.6]], np.float32))
    old = np.log(np.array([[0.2, 0.7]], np.float32))
    adv = np.array([[1.0, -1.0]], np.float32)
    for key in ("ratio", "clipped", "approx_kl"):
        stat = lambda lp, k=key: jnp.sum(pg.clipped_surrogate(lp, old, adv, eps_low=0.2, eps_high=0.2)[1][k])
        np.testing.assert_array_equal(jax.grad(stat)(logp), 0.0)
    g_old = jax.grad(lambda o: jnp.sum(pg.clipped_surrogate(logp, o, adv, eps_low=0.2, eps_high=0.2)[0]))(old)
    np.testing.assert_array_equal(g_old, 0.0)
    jitted = jax.jit(lambda a, b, c: pg.clipped_surrogate(a, b, c, eps_low=0.2, eps_high=0.3))(logp, old, adv)
    eager = pg.clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.3)
    np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)


def test_value_loss_clipping_hand_example():
    values = np.array([[1.0, 3.0, 0.5]], np.float32)
    old_values = np.array([[0.0, 2.9, 0.0]], np.float32)
    returns = np.array([[2.0, 0.0, 0.0]], np.float32)
    loss, stats = pg.value_loss(values, old_values, returns, clip_eps=0.2)
    # 0: unclipped (1 − 2)² = 1, clipped (0.2 − 2)² = 3.24 -> the clipped term, no gradient.
    # 1: v inside the band: both 9.   2: unclipped 0.25 > clipped (0.2)² = 0.04.
    np.testing.assert_allclose(loss, [[1.62, 4.5, 0.125]], rtol=1e-6)
    np.testing.assert_array_equal(stats["clipped"], [[1.0, 0.0, 0.0]])
    grad = jax.grad(lambda v: jnp.sum(pg.value_loss(v, old_values, returns, clip_eps=0.2)[0]))(values)
    np.testing.assert_allclose(grad, [[0.0, 3.0, 0.5]], rtol=1e-6)
    for off in (None, 0.0, -1.0):
        unclipped, stats = pg.value_loss(values, old_values, returns, clip_eps=off)
        np.testing.assert_allclose(unclipped, [[0.5, 4.5, 0.125]], rtol=1e-6)
        np.testing.assert_array_equal(stats["clipped"], 0.0)


def test_entropy_from_log_probs():
    for vocab in (2, 7, 50):
        uniform = jnp.full((3, vocab), -np.log(vocab), jnp.float32)
        np.testing.assert_allclose(pg.entropy_from_log_probs(uniform), np.full(3, np.log(vocab)), rtol=1e-6)
    truncated = jnp.array([[np.log(0.5), -jnp.inf, np.log(0.5), -jnp.inf]], jnp.float32)
    entropy = pg.entropy_from_log_probs(truncated)
    np.testing.assert_allclose(entropy, [np.log(2.0)], rtol=1e-6)
    grad = jax.grad(lambda lp: jnp.sum(pg.entropy_from_log_probs(lp)))(truncated)
    assert np.all(np.isfinite(grad))
    one_hot = jnp.array([[0.0, -jnp.inf, -jnp.inf]], jnp.float32)
    np.testing.assert_allclose(pg.entropy_from_log_probs(one_hot), [0.0])
    logits = np.random.default_rng(0).normal(size=(2, 5, 11)).astype(np.float32)
    log_probs = jax.nn.log_softmax(logits)
    p = np.exp(np.asarray(log_probs, np.float64))
    np.testing.assert_allclose(pg.entropy_from_log_probs(log_probs), -(p * np.log(p)).sum(-1), rtol=1e-5)
    assert pg.entropy_from_log_probs(log_probs).shape == (2, 5)


def test_check_pg_args():
    pg.check_pg_args(0.2, 0.28, vf_clip=0.2)
    pg.check_pg_args(0.0, 0.0)
    pg.check_pg_args(0.2, 0.2, vf_clip=0.0)
    with pytest.raises(RlftError, match=r"rl\.clip_eps_low=-0\.1"):
        pg.check_pg_args(-0.1, 0.2)
    with pytest.raises(RlftError, match=r"rl\.clip_eps_low=1\.0"):
        pg.check_pg_args(1.0, 0.2)
    with pytest.raises(RlftError, match=r"rl\.clip_eps_high=-0\.2"):
        pg.check_pg_args(0.2, -0.2)
    with pytest.raises(RlftError, match=r"rl\.clip_eps_high=nan"):
        pg.check_pg_args(0.2, float("nan"))
    with pytest.raises(RlftError, match=r"rl\.vf_clip=-0\.5"):
        pg.check_pg_args(0.2, 0.2, vf_clip=-0.5)


# --- GSPO, CISPO, truncated importance sampling --------------------------------------------------

def _random_tokens(rng, lengths, width):
    """(logp, old_logp, mask) [B, width] with garbage (NaN) beyond each row's length."""
    b = len(lengths)
    mask = (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)
    logp = np.where(mask > 0, -rng.uniform(0.1, 3.0, (b, width)), np.nan).astype(np.float32)
    old = np.where(mask > 0, logp + rng.normal(0, 0.3, (b, width)), np.nan).astype(np.float32)
    return logp, old, mask


def test_sequence_log_ratio_is_the_length_normalised_sum():
    logp, old, mask = _random_tokens(np.random.default_rng(0), [5, 2, 7, 0], 7)
    got = np.asarray(sequence_log_ratio(logp, old, mask))
    for row, n in enumerate([5, 2, 7, 0]):
        expected = np.mean(logp[row, :n] - old[row, :n]) if n else 0.0
        np.testing.assert_allclose(got[row], expected, rtol=1e-6, atol=1e-6)
    # by hand: log-probs (−1, −2) under the policy and (−1.5, −1) before: ((0.5) + (−1)) / 2
    assert float(sequence_log_ratio(jnp.array([[-1.0, -2.0, 9.0]]), jnp.array([[-1.5, -1.0, 0.0]]),
                                    jnp.array([[1, 1, 0]]))[0]) == pytest.approx(-0.25)


def test_gspo_ratio_is_the_sequence_ratio_with_each_tokens_gradient():
    """log_ratios(level="sequence"): every token's ratio is exp(sequence_log_ratio); d ratio_t /
    d logp_t' is ratio·[t == t'] (GSPO-token), so the clipped loss's gradient at ratio s is −s·A on
    each unclipped token."""
    logp, old, mask = _random_tokens(np.random.default_rng(1), [4, 6], 6)
    logp, old = np.nan_to_num(logp), np.nan_to_num(old)
    lr = np.asarray(log_ratios(logp, old, mask, "sequence"))
    seq = np.asarray(sequence_log_ratio(logp, old, mask))
    np.testing.assert_allclose(lr[mask > 0], np.broadcast_to(seq[:, None], lr.shape)[mask > 0], atol=1e-6)
    adv = np.array([[1.0] * 6, [-2.0] * 6], np.float32)
    loss = lambda lp: jnp.sum(clipped_surrogate(lp, old, adv, log_ratios(lp, old, mask, "sequence"),
                                                eps_low=10.0 - 9.5, eps_high=10.0)[0] * mask)
    grad = np.asarray(jax.grad(loss)(jnp.asarray(logp)))
    expected = -np.exp(seq)[:, None] * adv * mask  # no token clipped with this wide band
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_cispo_gradient_is_the_clipped_weight_times_the_advantage():
    """d/dlogp of CISPO = −min(ratio, 1 + ε_high)·A on every token, including those PPO's clip
    would zero (ratio far above 1 + ε_high with A > 0)."""
    logp = jnp.array([[-0.2, -1.0, -2.0, -0.5]])
    old = jnp.array([[-1.2, -1.1, -1.0, -0.5]])  # ratios e^1, e^0.1, e^-1, 1
    adv = jnp.array([[2.0, -1.0, 1.0, 3.0]])
    eps_high = 0.28
    grad = np.asarray(jax.grad(lambda lp: jnp.sum(cispo_loss(lp, old, adv, eps_high=eps_high)[0]))(logp))
    ratio = np.exp(np.asarray(logp - old))
    np.testing.assert_allclose(grad, -np.minimum(ratio, 1 + eps_high) * np.asarray(adv), rtol=1e-6)
    assert grad[0, 0] != 0  # PPO's clipped surrogate gives this token no gradient:
    ppo = jax.grad(lambda lp: jnp.sum(clipped_surrogate(lp, old, adv, eps_low=0.2, eps_high=eps_high)[0]))(logp)
    assert float(ppo[0, 0]) == 0.0
    _, stats = cispo_loss(logp, old, adv, eps_high=eps_high)
    np.testing.assert_array_equal(stats["clipped"], [[1.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("level", ["none", "token", "sequence"])
def test_truncated_importance_weights_are_capped(level):
    trainer = np.array([[-1.0, -0.2, -3.0, 0.0], [-0.5, -0.5, 0.0, 0.0]], np.float32)
    sampler = np.array([[-1.5, -2.0, -2.9, 0.0], [-0.4, -0.6, 0.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    got = np.asarray(truncated_is_weights(trainer, sampler, mask, level, cap=2.0))
    diff = (trainer - sampler) * mask
    if level == "none":
        expected = np.ones_like(diff)
    elif level == "token":
        expected = np.minimum(np.exp(diff), 2.0)  # e^0.5, e^1.8 -> 2, e^-0.1; padding e^0 = 1
    else:
        expected = np.minimum(np.exp(diff.sum(-1, keepdims=True)), 2.0) * np.ones_like(diff)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got.max() <= 2.0
