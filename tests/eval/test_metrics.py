"""Evaluation metrics against numbers worked out by hand, closed forms, and clear errors."""

import json
import math

import numpy as np
import pytest

from rlft.errors import RlftError
from rlft.eval import metrics


# --- win_rate -----------------------------------------------------------------------------------

def test_win_rate_counts_ties_as_half():
    a = [3.0, 1.0, 2.0, 5.0]
    b = [1.0, 1.0, 3.0, 4.0]
    # item 0: 3 > 1 win; item 1: 1 == 1 tie; item 2: 2 < 3 loss; item 3: 5 > 4 win
    # (2 wins + ½·1 tie) / 4 items = 2.5 / 4 = 0.625
    assert metrics.win_rate(a, b) == 0.625
    # B's view: 1 win + ½·1 tie = 1.5 / 4 = 0.375, and the two add up to 1
    assert metrics.win_rate(b, a) == 0.375
    assert metrics.win_rate([0, 1, 1], [0, 1, 1]) == 0.5  # all ties: 3·½ / 3
    assert metrics.win_rate(np.array([1, 0]), np.array([0, 0])) == 0.75  # (1 + ½) / 2
    assert isinstance(metrics.win_rate(a, b), float)


@pytest.mark.parametrize("a, b, message", [
    ([1.0, 2.0], [1.0], r"a_scores has shape \(2,\) but b_scores has shape \(1,\)"),
    ([], [], r"no scores \(n = 0\)"),
    ([[1.0]], [[2.0]], r"expected 1-D scores \[n\], got shape \(1, 1\)"),
    ([1.0, float("nan")], [1.0, 2.0], r"a_scores: contains NaN"),
])
def test_win_rate_errors(a, b, message):
    with pytest.raises(RlftError, match=message):
        metrics.win_rate(a, b)


# --- distinct_n ---------------------------------------------------------------------------------

TEXTS = ["the cat sat", "the  cat ran\n", ""]


def test_distinct_n_counted_by_hand():
    # tokens: [the, cat, sat], [the, cat, ran], []
    # unigrams: the cat sat the cat ran -> 6 in all; distinct {the, cat, sat, ran} = 4 -> 4/6
    assert metrics.distinct_n(TEXTS, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 4 in all; distinct 3 -> 3/4
    assert metrics.distinct_n(TEXTS, 2) == 0.75
    # trigrams: (the cat sat) (the cat ran) -> 2 in all, 2 distinct -> 1
    assert metrics.distinct_n(TEXTS, 3) == 1.0
    # no text has 4 tokens: no 4-grams at all -> 0.0 by definition
    assert metrics.distinct_n(TEXTS, 4) == 0.0
    assert metrics.distinct_n([], 1) == 0.0


def test_distinct_n_grams_do_not_span_texts_and_keep_case():
    # ["a b", "c"]: the only bigram is (a b); (b c) would span two texts -> 1/1
    assert metrics.distinct_n(["a b", "c"], 2) == 1.0
    # a collapsed policy: "good good" twice -> bigrams (good good) ×2 -> 1 distinct / 2 = 0.5
    assert metrics.distinct_n(["good good", "good good"], 2) == 0.5
    # case is kept: The, the -> 2 distinct / 2
    assert metrics.distinct_n(["The the"], 1) == 1.0


@pytest.mark.parametrize("texts, n, message", [
    ("the cat sat", 1, "not one string"),
    (["a", 3], 1, r"texts\[1\] is int, expected str"),
    (["a"], 0, "n=0: expected an integer >= 1"),
    (["a"], 1.5, "n=1.5: expected an integer >= 1"),
])
def test_distinct_n_errors(texts, n, message):
    with pytest.raises(RlftError, match=message):
        metrics.distinct_n(texts, n)


# --- perplexity ---------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab", [2, 7, 50_257])
def test_perplexity_of_uniform_distribution_is_vocab_size(vocab):
    logp = np.full((3, 5), -np.log(vocab), np.float32)
    mask = np.ones((3, 5), bool)
    mask[1, 3:] = False
    logp[1, 3:] = -np.inf  # padding holds garbage; it is ignored
    assert metrics.perplexity(logp, mask) == pytest.approx(vocab, rel=1e-6)


def test_perplexity_is_corpus_level_by_hand():
    # one row: p = 1/2, 1/4 -> mean NLL = (ln 2 + ln 4) / 2 = 1.5 ln 2 -> ppl = 2^1.5 = 2.8284271
    assert metrics.perplexity([[math.log(0.5), math.log(0.25)]], [[1, 1]]) == pytest.approx(2.8284271)
    # row 0: one token p = 1/2; row 1: three tokens p = 1/8 (last slot padding)
    # Σ NLL = ln 2 + 3·ln 8 = 10 ln 2 over 4 tokens -> 2^(10/4) = 2^2.5 = 5.6568542,
    # not the mean of per-row perplexities (2 + 8) / 2 = 5
    logp = [[math.log(0.5), 0.0, 0.0, 0.0], [math.log(1 / 8)] * 3 + [float("nan")]]
    mask = [[1, 0, 0, 0], [1, 1, 1, 0]]
    assert metrics.perplexity(logp, mask) == pytest.approx(5.6568542)
    assert metrics.perplexity([[-np.inf]], [[1]]) == np.inf  # a token the model rules out


@pytest.mark.parametrize("logp, mask, message", [
    ([[0.0, 0.0]], [[1, 1, 1]], r"shape \(1, 2\) but mask has shape \(1, 3\)"),
    ([[0.0, 0.0]], [[0, 0]], "the mask selects no tokens"),
    ([[np.nan, 0.0]], [[1, 1]], "token_logprobs: contains NaN"),
    ([[0.0, 0.0]], [[1, -1]], "mask: must be 0/1"),
])
def test_perplexity_errors(logp, mask, message):
    with pytest.raises(RlftError, match=message):
        metrics.perplexity(logp, mask)


# --- sequence_kl --------------------------------------------------------------------------------

def test_sequence_kl_estimators_by_hand():
    logp = np.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    ref = np.array([[-1.5, -1.0, -np.inf], [-0.5 + math.log(2), -0.5, np.nan]])  # last column masked
    mask = np.array([[1, 1, 0], [1, 1, 0]])
    # k1 = logp − ref_logp per token
    # row 0: (−1 + 1.5) + (−2 + 1) = 0.5 − 1 = −0.5;  row 1: (−ln 2) + 0 = −0.6931472
    np.testing.assert_allclose(metrics.sequence_kl(logp, ref, mask), [-0.5, -math.log(2)], rtol=1e-6)
    # k2 = ½ (log r)²: row 0: ½·0.25 + ½·1 = 0.625;  row 1: ½·(ln 2)² = 0.2402265
    np.testing.assert_allclose(metrics.sequence_kl(logp, ref, mask, "k2"), [0.625, 0.2402265], rtol=1e-6)
    # k3 = (r − 1) − log r with log r = ref − logp:
    # row 0: (e^−0.5 − 1 + 0.5) + (e^1 − 1 − 1) = 0.1065307 + 0.7182818 = 0.8248125
    # row 1: (2 − 1 − ln 2) + 0 = 0.3068528
    k3 = metrics.sequence_kl(logp, ref, mask, "k3")
    np.testing.assert_allclose(k3, [0.8248125, 0.3068528], rtol=1e-6)
    assert k3.shape == (2,) and k3.dtype == np.float64


def test_sequence_kl_monte_carlo_matches_closed_form():
    # policy p and reference q over 3 tokens:
    # KL(p‖q) = 0.5 ln(0.5/0.2) + 0.3 ln(0.3/0.3) + 0.2 ln(0.2/0.5) = 0.3·ln 2.5 = 0.2748872
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])
    exact = 0.3 * math.log(2.5)
    assert float(np.sum(p * np.log(p / q))) == pytest.approx(exact)
    batch, length = 10_000, 10  # 100k tokens sampled from the policy
    tokens = np.random.default_rng(0).choice(3, size=(batch, length), p=p)
    logp, ref = np.log(p)[tokens], np.log(q)[tokens]
    mask = np.ones((batch, length))
    # per-token sd of k1 ≈ 0.72 -> standard error of the per-token mean ≈ 0.0023; tolerance 0.01
    for estimator in ("k1", "k3"):  # both unbiased
        per_sequence = metrics.sequence_kl(logp, ref, mask, estimator)
        assert per_sequence.shape == (batch,)
        assert per_sequence.mean() / length == pytest.approx(exact, abs=0.01), estimator
    # k2 is biased: its mean is ½ E[(log r)²] = ½·0.7·(ln 2.5)² = 0.2938, not the KL
    k2 = metrics.sequence_kl(logp, ref, mask, "k2").mean() / length
    assert k2 == pytest.approx(0.5 * 0.7 * math.log(2.5) ** 2, abs=0.01)
    assert abs(k2 - exact) > 0.015


@pytest.mark.parametrize("kwargs, message", [
    (dict(estimator="k4"), r"sequence_kl: estimator='k4': expected one of \['k1', 'k2', 'k3'\]"),
    (dict(ref_logp=np.zeros((2, 2))), r"ref_logp has shape \(2, 2\) but mask has shape \(2, 3\)"),
    (dict(logp=np.zeros(6), ref_logp=np.zeros(6), mask=np.ones(6)),
     r"expected a 2-D array \[batch, length\]"),
    (dict(logp=np.full((2, 3), np.nan)), "logp: contains NaN"),
])
def test_sequence_kl_errors(kwargs, message):
    args = dict(logp=np.zeros((2, 3)), ref_logp=np.zeros((2, 3)), mask=np.ones((2, 3)), estimator="k1")
    args.update(kwargs)
    with pytest.raises(RlftError, match=message):
        metrics.sequence_kl(**args)


# --- summary ------------------------------------------------------------------------------------

def test_summary_by_hand():
    s = metrics.summary([1.0, 2.0, 3.0, 4.0])
    # mean = 10 / 4 = 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    # std (ddof 1) = sqrt(5 / 3) = 1.2909944; sem = std / sqrt(4) = 0.6454972
    assert s["mean"] == 2.5 and s["n"] == 4
    assert s["std"] == pytest.approx(1.2909944) and s["sem"] == pytest.approx(0.6454972)
    assert isinstance(s["n"], int) and all(isinstance(s[k], float) for k in ("mean", "std", "sem"))
    json.dumps(s)
    one = metrics.summary(np.array([[7.0]]))  # any shape, flattened
    assert one["mean"] == 7.0 and one["n"] == 1 and math.isnan(one["std"]) and math.isnan(one["sem"])


@pytest.mark.parametrize("values, message", [([], r"no values \(n = 0\)"), ([1.0, np.nan], "contains NaN")])
def test_summary_errors(values, message):
    with pytest.raises(RlftError, match=message):
        metrics.summary(values)


# --- pass_at_k, majority_vote, majority_at_k, sampled_accuracy ------------------------------------

def _pass_at_k_by_enumeration(n, c, k):
    """The share of all k-subsets of n samples (the first c correct) holding a correct one."""
    import itertools

    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration_of_all_k_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = _pass_at_k_by_enumeration(n, c, k)
                assert metrics.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
                assert metrics.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    # by hand: 10 samples, 3 correct, k = 2: 1 − C(7,2)/C(10,2) = 1 − 21/45 = 24/45
    assert metrics.pass_at_k(10, 3, 2) == pytest.approx(24 / 45)
    assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
    assert isinstance(metrics.pass_at_k(4, 1, 2), float)


def test_pass_at_k_is_vectorised_and_stable_for_large_n():
    c = np.array([0, 1, 5, 8])
    out = metrics.pass_at_k(8, c, 4)
    assert out.shape == (4,) and out.dtype == np.float64
    np.testing.assert_allclose(out, [_pass_at_k_by_enumeration(8, int(x), 4) for x in c])
    np.testing.assert_allclose(metrics.pass_at_k(np.array([[4], [6]]), 2, np.array([1, 2])),
                               [[0.5, 1 - 1 / 6], [1 / 3, 1 - 6 / 15]])
    # C(2000, 1000) overflows a float64; the product form does not need it.
    big = metrics.pass_at_k(2000, 3, 1000)
    assert big == pytest.approx(1 - (1000 * 999 * 998) / (2000 * 1999 * 1998)) and math.isfinite(big)
    assert metrics.pass_at_k(2000, 0, 1000) == 0.0 and metrics.pass_at_k(2000, 1001, 1000) == 1.0


@pytest.mark.parametrize("n, c, k, message", [
    (4, 1, 5, "k=5 > n=4"), (4, 5, 2, "c=5 > n=4"), (4, -1, 2, "c=-1"), (4, 1, 0, "k=0"), (-2, 0, 1, "n=-2"),
    (0, 0, 1, "n=0"), (4.5, 1, 1, "n=4.5: expected integers"), (4, True, 1, "c=True: expected integers"),
    (np.array([4, 4]), np.array([1, 2, 3]), 1, "do not broadcast"),
])
def test_pass_at_k_errors(n, c, k, message):
    with pytest.raises(RlftError, match=message):
        metrics.pass_at_k(n, c, k)


def test_majority_vote_by_hand():
    votes = ["3", "4", "4", "3", "5"]
    assert metrics.majority_vote(votes, 5) == 0  # "3" and "4" tie 2:2: "3" is seen first (index 0)
    assert metrics.majority_vote(votes, 3) == 1  # first 3: "4" twice wins; its first sample is index 1
    assert metrics.majority_vote(votes, 1) == 0
    assert metrics.majority_vote([None, "x", None, None], 4) == 1  # None abstains, even as the most frequent
    assert metrics.majority_vote([None, None], 2) is None
    with pytest.raises(RlftError, match=r"k=3: expected an integer in \[1, 2\]"):
        metrics.majority_vote(["a", "b"], 3)


def test_majority_at_k_by_hand():
    answers = [["7", "8", "8", "7", "7"],   # first 4: "7" 2, "8" 2: tie -> "7" (seen first), correct
               ["1", "2", "2", "2", "1"],   # first 4: "2" x3 wins, wrong (answer is "1")
               [None, None, "5", None, "5"],  # first 4: only "5" votes (None abstains), correct
               [None, None, None, None, "9"],  # first 4: all abstain: unsolved
               ["0", "6", "6", "6", "6"]]   # first 4: "6" x3 wins, correct
    truth = ["7", "1", "5", "9", "6"]
    correct = np.array([[a == t for a in row] for row, t in zip(answers, truth)])
    assert metrics.majority_at_k(answers, correct, 4) == pytest.approx(3 / 5)
    # k = 1: the first sample alone; k = 5: problem 1 becomes "2" x3 (still wrong), problem 3 "9" (solved)
    assert metrics.majority_at_k(answers, correct, 1) == pytest.approx(2 / 5)
    assert metrics.majority_at_k(answers, correct, 5) == pytest.approx(4 / 5)
    out = metrics.sampled_accuracy(answers, correct, 4)
    # c = [3, 2, 2, 1, 4] of n = 5; pass@1 = mean c/n = 12/25; pass@4 per problem: 1 where n − c < 4,
    # and for c = 1: 1 − C(4,4)/C(5,4) = 4/5; mean (4 + 4/5) / 5 = 0.96
    assert out == pytest.approx({"pass@1": 12 / 25, "pass@4": 0.96, "maj@4": 3 / 5, "mean_reward": 12 / 25})
    assert list(out) == ["pass@1", "pass@4", "maj@4", "mean_reward"]
    json.dumps(out)
    rewards = correct * 0.5
    assert metrics.sampled_accuracy(answers, correct, 2, rewards)["mean_reward"] == pytest.approx(6 / 25)


@pytest.mark.parametrize("answers, correct, k, message", [
    ([["a", "b"]], [[True, False]], 3, r"k=3: expected an integer in \[1, n=2\]"),
    ([["a", "b"]], [[True, False]], 0, r"k=0"),
    ([["a", "b"]], [[True, False, True]], 1, r"correct has shape \(1, 3\)"),
    ([], np.zeros((0, 2), bool), 1, "no problems"),
    ([["a", "b"]], [[2, 0]], 1, "booleans"),
])
def test_majority_at_k_errors(answers, correct, k, message):
    with pytest.raises(RlftError, match=message):
        metrics.majority_at_k(answers, correct, k)
