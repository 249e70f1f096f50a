"""Metrics for comparing policies (base / SFT / DPO / RL): plain numpy in, Python floats out.

Each function checks its inputs and raises `RlftError` naming the bad argument, so a report
never shows a silently wrong number. What each one measures (DESIGN.md §7):

    win_rate      how often a judge prefers policy A's completion to policy B's on the same prompt
    distinct_n    lexical diversity of a set of completions (Li et al. 2016)
    perplexity    corpus-level perplexity of held-out text under a model
    sequence_kl   KL(policy‖reference) per sampled sequence, with training's estimators
    summary       mean, std, standard error and count of any per-item metric, for report tables
"""

from __future__ import annotations

from collections.abc import Sequence
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
