"""Metrics for comparing policies (base / SFT / DPO / RL): plain numpy in, Python floats out.

Each function checks its inputs and raises `RlftError` naming the bad argument, so a report
never shows a silently wrong number. What each one measures (DESIGN.md §7):

    win_rate      how often a judge prefers policy A's completion to policy B's on the same prompt
    distinct_n    lexical diversity of a set of completions (Li et al. 2016)
    perplexity    corpus-level perplexity of held-out text under a model
    sequence_kl   KL(policy‖reference) per sampled sequence, with training's estimators
    summary       mean, std, standard error and count of any per-item metric, for report tables
    pass_at_k     unbiased pass@k from n samples per problem with c correct (Chen et al. 2021)
    majority_at_k maj@k: share of problems whose most frequent answer among k samples is correct
    sampled_accuracy  pass@1, pass@k, maj@k and mean reward of n samples per problem, for reports
    check_sample_counts  the eval.samples_per_problem / eval.k flags of an experiment (k <= n)
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from rlft.errors import RlftError


def _no_nan(name: str, values: np.ndarray) -> None:
    if np.isnan(values).any():
        raise RlftError(f"{name}: contains NaN ({int(np.isnan(values).sum())} of {values.size} values)")


def _masked(name: str, values: ArrayLike, mask: ArrayLike, *,
            ndim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(values, weights) as float64 arrays of one shape; masked-out values replaced by 0."""
    values, mask = np.asarray(values, np.float64), np.asarray(mask)
    if values.shape != mask.shape:
        raise RlftError(f"{name} has shape {values.shape} but mask has shape {mask.shape}")
    if ndim is not None and values.ndim != ndim:
        raise RlftError(f"{name}: expected a {ndim}-D array [batch, length], got shape {values.shape}")
    weights = mask.astype(np.float64)
    if (weights < 0).any() or np.isnan(weights).any():
        raise RlftError("mask: must be 0/1 (or non-negative weights)")
    kept = weights > 0
    _no_nan(name, values[kept])
    return np.where(kept, values, 0.0), weights


def win_rate(a_scores: ArrayLike, b_scores: ArrayLike) -> float:
    """Fraction of items on which A scores higher than B, ties counting one half.

    `a_scores[i]` and `b_scores[i]` are a judge's scores (e.g. the gold reward) of policy A's and
    policy B's completion of the same prompt i, one sample each; shapes [n]. Returns

        (#{i: a_i > b_i} + ½·#{i: a_i == b_i}) / n   in [0, 1],

    so win_rate(a, b) + win_rate(b, a) == 1 and two identical policies score 0.5 in expectation.
    Counting ties as half keeps a coarse judge (exact match: scores 0/1, many ties) from reading as
    a loss for both sides.

    Raises RlftError when the shapes differ, are not 1-D, are empty, or a score is NaN.
    """
    a, b = np.asarray(a_scores, np.float64), np.asarray(b_scores, np.float64)
    if a.shape != b.shape:
        raise RlftError(f"win_rate: a_scores has shape {a.shape} but b_scores has shape {b.shape}; "
                        "expected one score each for the same prompts")
    if a.ndim != 1:
        raise RlftError(f"win_rate: expected 1-D scores [n], got shape {a.shape}")
    if a.size == 0:
        raise RlftError("win_rate: no scores (n = 0)")
    _no_nan("win_rate: a_scores", a)
    _no_nan("win_rate: b_scores", b)
    return float((np.sum(a > b) + 0.5 * np.sum(a == b)) / a.size)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): distinct n-grams / total n-grams, over all texts together.

    Each text is split on whitespace (`str.split()`, case kept, punctuation attached to its word);
    a text of k tokens contributes its k − n + 1 contiguous n-grams (none when k < n; n-grams never
    span two texts). With N the multiset of all n-grams of all texts,

        distinct_n = |set(N)| / |N|   in (0, 1],   and 0.0 when |N| = 0.

    It is a corpus-level measure of lexical diversity: a policy that collapses onto one phrasing
    (a common RL failure) drives it down. It depends on the number and length of texts, so compare
    policies on the same prompts with the same generation length.

    `texts` is a sequence of strings (e.g. completions); `n` >= 1. Raises RlftError otherwise.
    """
    if isinstance(texts, str):
        raise RlftError("distinct_n: texts must be a sequence of strings, not one string")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise RlftError(f"distinct_n: n={n!r}: expected an integer >= 1")
    total, seen = 0, set()
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RlftError(f"distinct_n: texts[{i}] is {type(text).__name__}, expected str")
        tokens = text.split()
        grams = [tuple(tokens[j:j + n]) for j in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def perplexity(token_logprobs: ArrayLike, mask: ArrayLike) -> float:
    """Corpus-level perplexity: exp(−Σ logp·mask / Σ mask).

    `token_logprobs` [batch, length] are the model's natural-log probabilities of each target token
    (e.g. `rlft.generate.logprobs.sequence_logprobs` at temperature 1 on held-out human text); `mask`
    [batch, length] is 1 (True) where a token counts and 0 elsewhere (prompt, padding). Values at
    masked-out positions are ignored, even inf or NaN.

    Corpus-level means every token weighs the same: the exponentiated mean negative log-likelihood
    per token over the whole set, not the mean of per-sequence perplexities (which would let short
    sequences weigh as much as long ones and is dominated by the worst sequence). A uniform model
    over V tokens has perplexity exactly V. A token with probability 0 (logp = −inf) gives inf.

    Raises RlftError when the shapes differ, no token is counted, the mask is negative, or a counted
    log-prob is NaN.
    """
    logp, weights = _masked("perplexity: token_logprobs", token_logprobs, mask)
    count = weights.sum()
    if not count > 0:
        raise RlftError("perplexity: the mask selects no tokens")
    with np.errstate(over="ignore"):
        return float(np.exp(-(logp * weights).sum() / count))


def sequence_kl(logp: ArrayLike, ref_logp: ArrayLike, mask: ArrayLike, estimator: str = "k1") -> np.ndarray:
    """Per-sequence estimate of KL(policy‖reference) [batch] (float64), summed over masked tokens.

    `logp` and `ref_logp` [batch, length] are the policy's and the reference's log-probs of tokens
    that were SAMPLED FROM THE POLICY (the same sampling distribution: temperature, top-k/top-p),
    e.g. a rollout's logprobs and `sequence_logprobs` of the reference on those tokens. `mask`
    [batch, length] is 1 on completion tokens and 0 on prompt and padding (values there are ignored,
    even inf or NaN). With log r = ref_logp − logp per token, the estimator is the one training uses,
    `rlft.objectives.kl.kl_estimate` (`KL_ESTIMATORS`):

        k1 = −log r             (default) unbiased, can be negative per sequence; training's `objective/kl`
        k2 = ½ (log r)²         biased, >= 0
        k3 = (r − 1) − log r    unbiased, >= 0, lower variance

    Summing the per-token estimates gives an estimate of the sequence-level KL, since for an
    autoregressive policy KL(π‖π_ref) over sequences is the expected sum of per-token log-ratios.
    The estimate is unbiased only for samples from the policy: on human text or the reference's
    samples it is not KL(policy‖reference). Average over many sequences (e.g. `summary`) before
    reading it; √KL is the x-axis of Gao et al.'s over-optimisation curves.

    Raises RlftError on an unknown estimator, shapes that differ or are not 2-D, a negative mask, or
    a NaN log-prob at a counted position.
    """
    from rlft.objectives import kl as kl_lib  # jax is imported only when this metric is used

    kl_lib.check_kl_estimator(estimator, field="sequence_kl: estimator")
    logp_arr, weights = _masked("sequence_kl: logp", logp, mask, ndim=2)
    ref_arr, _ = _masked("sequence_kl: ref_logp", ref_logp, mask, ndim=2)
    per_token = np.asarray(kl_lib.kl_estimate(logp_arr, ref_arr, estimator), np.float64)
    return np.where(weights > 0, per_token * weights, 0.0).sum(axis=1)


def summary(values: ArrayLike) -> dict[str, Any]:
    """{"mean", "std", "sem", "n"} of a per-item metric (any shape, flattened), for report tables.

    std is the sample standard deviation (ddof = 1) and sem = std / √n the standard error of the
    mean, so `mean ± 2·sem` is a rough 95% interval; both are NaN when n = 1. Floats are Python
    floats and n an int, so the dict serialises with `json.dumps`.

    Raises RlftError when `values` is empty or holds a NaN.
    """
    x = np.asarray(values, np.float64).ravel()
    if x.size == 0:
        raise RlftError("summary: no values (n = 0)")
    _no_nan("summary: values", x)
    n = int(x.size)
    std = float(np.std(x, ddof=1)) if n > 1 else float("nan")
    return {"mean": float(np.mean(x)), "std": std, "sem": std / float(np.sqrt(n)), "n": n}


def _counts(name: str, value: ArrayLike) -> np.ndarray:
    """`value` as an int64 array, or RlftError naming `name` when it is not whole numbers."""
    array = np.asarray(value)
    if array.dtype == bool or array.dtype.kind not in "iuf":
        raise RlftError(f"pass_at_k: {name}={value!r}: expected integers")
    if array.dtype.kind == "f" and not (np.isfinite(array).all() and (array == np.round(array)).all()):
        raise RlftError(f"pass_at_k: {name}={value!r}: expected integers")
    return array.astype(np.int64)


def pass_at_k(n: ArrayLike, c: ArrayLike, k: ArrayLike) -> float | np.ndarray:
    """Unbiased estimate of pass@k from n samples of a problem of which c are correct (Chen et al. 2021).

    pass@k is the probability that at least one of k samples is correct. Drawing k of the n samples
    without replacement, the estimate is

        1 − C(n − c, k) / C(n, k)  =  1 − ∏_{i = n−c+1}^{n} (1 − k / i)      (1.0 when n − c < k),

    computed in the product form (as in the Codex paper's code): no binomial coefficient is formed,
    so it neither overflows nor loses precision for large n. Average it over problems for a
    benchmark's pass@k; pass_at_k(n, c, 1) == c / n.

    n, c and k are integers or integer arrays that broadcast together (e.g. c [problems] with scalar
    n and k); returns a Python float when all three are scalars, else a float64 array of the
    broadcast shape. Raises RlftError, naming the argument, unless 1 <= k <= n and 0 <= c <= n.
    """
    n_arr, c_arr, k_arr = _counts("n", n), _counts("c", c), _counts("k", k)
    try:
        n_arr, c_arr, k_arr = np.broadcast_arrays(n_arr, c_arr, k_arr)
    except ValueError:
        raise RlftError(f"pass_at_k: n, c and k have shapes {np.shape(n)}, {np.shape(c)}, {np.shape(k)}, "
                        "which do not broadcast together") from None
    for bad, message in ((n_arr < 1, "n={}: expected at least one sample (n >= 1)"),
                         (c_arr < 0, "c={}: the number of correct samples cannot be negative"),
                         (c_arr > n_arr, "c={} > n={}: more correct samples than samples"),
                         (k_arr < 1, "k={}: expected k >= 1"),
                         (k_arr > n_arr, "k={} > n={}: pass@k needs at least k samples per problem")):
        if bad.any():
            first = np.argwhere(bad)[0] if bad.ndim else ()
            values = [int(x[tuple(first)]) for x in ((c_arr if message.startswith("c") else
                                                      k_arr if message.startswith("k") else n_arr), n_arr)]
            raise RlftError("pass_at_k: " + message.format(*values))
    out = np.ones(n_arr.shape, np.float64)
    for index in np.ndindex(out.shape):
        n_i, c_i, k_i = int(n_arr[index]), int(c_arr[index]), int(k_arr[index])
        if n_i - c_i >= k_i:
            out[index] = 1.0 - float(np.prod(1.0 - k_i / np.arange(n_i - c_i + 1, n_i + 1, dtype=np.float64)))
    return float(out) if out.ndim == 0 else out


def majority_vote(answers: Sequence[Hashable | None], k: int) -> int | None:
    """Index of the majority answer among the first k of `answers` (one problem's samples), or None.

    None entries abstain (e.g. a completion with no well-formed answer): they never win. The answer
    given most often wins; a tie goes to the tied answer that occurs FIRST among the k samples, and
    the index returned is that first occurrence. None when all k abstain. Raises RlftError unless
    1 <= k <= len(answers).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= len(answers):
        raise RlftError(f"majority_vote: k={k!r}: expected an integer in [1, {len(answers)}] "
                        f"(the number of samples)")
    votes: dict[Hashable, list[int]] = {}  # answer -> [count, first index]; dicts keep first-seen order
    for i, answer in enumerate(answers[:k]):
        if answer is not None:
            votes.setdefault(answer, [0, i])[0] += 1
    if not votes:
        return None
    return max(votes.values(), key=lambda v: (v[0], -v[1]))[1]


def majority_at_k(answers: Sequence[Sequence[Hashable | None]], correct: ArrayLike, k: int) -> float:
    """maj@k: the share of problems whose majority answer among their FIRST k samples is correct.

    `answers[i]` holds problem i's n >= k sampled answers (hashable, e.g. the stripped completion
    text; None: no answer, abstains) and `correct` [problems, n] (bool or 0/1) whether each sample is
    correct. For each problem the majority answer of answers[i][:k] is chosen by `majority_vote`
    (most frequent; a tie goes to the answer seen first; abstentions never win) and the problem
    counts as solved when that answer's first sample is correct; a problem whose k samples all
    abstain counts as unsolved. Using the first k of n i.i.d. samples makes this an unbiased estimate
    of maj@k (one vote of k samples per problem), noisier than averaging over all k-subsets.

    Raises RlftError when the shapes disagree, there are no problems, or k is not in [1, n].
    """
    hit = np.asarray(correct)
    if hit.ndim != 2 or hit.shape[0] != len(answers) or any(len(a) != hit.shape[1] for a in answers):
        raise RlftError(f"majority_at_k: correct has shape {hit.shape}; expected [problems, n] = "
                        f"[{len(answers)}, n] matching answers (n answers per problem)")
    if hit.shape[0] == 0:
        raise RlftError("majority_at_k: no problems")
    if hit.dtype != bool and not np.isin(hit, (0, 1)).all():
        raise RlftError("majority_at_k: correct must be booleans (or 0/1)")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= hit.shape[1]:
        raise RlftError(f"majority_at_k: k={k!r}: expected an integer in [1, n={hit.shape[1]}] (samples per problem)")
    solved = 0
    for problem, row in zip(answers, hit):
        winner = majority_vote(list(problem), k)
        solved += winner is not None and bool(row[winner])
    return solved / hit.shape[0]


def sampled_accuracy(answers: Sequence[Sequence[Hashable | None]], correct: ArrayLike, k: int,
                     rewards: ArrayLike | None = None) -> dict[str, float]:
    """{"pass@1", f"pass@{k}", f"maj@{k}", "mean_reward"} of n samples per problem, as Python floats.

    `answers` [problems][n] and `correct` [problems, n] as for `majority_at_k`; pass@1 and pass@k
    are `pass_at_k` averaged over problems (c = correct samples of each); mean_reward is the mean of
    `rewards` [problems, n] over all samples (default: of `correct`, i.e. the exact-match mean).
    """
    hit = np.asarray(correct)
    maj = majority_at_k(answers, hit, k)  # checks shapes and k
    problems, n = hit.shape
    c = hit.astype(np.int64).sum(axis=1)
    scores = hit.astype(np.float64) if rewards is None else np.asarray(rewards, np.float64)
    if scores.shape != hit.shape:
        raise RlftError(f"sampled_accuracy: rewards has shape {scores.shape}, correct {hit.shape}")
    _no_nan("sampled_accuracy: rewards", scores)
    return {"pass@1": float(np.mean(pass_at_k(n, c, 1))), f"pass@{k}": float(np.mean(pass_at_k(n, c, k))),
            f"maj@{k}": maj, "mean_reward": float(scores.mean())}


def check_sample_counts(samples_per_problem: Any, k: Any, *, section: str = "eval") -> tuple[int, int]:
    """(n, k) of the flags `{section}.samples_per_problem` (n >= 0; 0 turns sampled evaluation
    off) and `{section}.k` (1 <= k <= n when n > 0), or an RlftError naming the flags."""
    for name, value in (("samples_per_problem", samples_per_problem), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise RlftError(f"{section}.{name}={value!r}: expected a non-negative integer")
    if samples_per_problem and not 1 <= k <= samples_per_problem:
        raise RlftError(f"{section}.k={k} must be in [1, {section}.samples_per_problem={samples_per_problem}]: "
                        f"pass@k and maj@k need at least k samples per problem")
    return int(samples_per_problem), int(k)
