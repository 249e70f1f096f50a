"""Reward functions for RL, chosen by name: host-side functions of the decoded completions.

A reward function maps (completions: list[str], records: list[dict]) -> float32 [n]: one score
per completion; records are the prompt records the completions answer (their "text", "ids" and
any other fields, e.g. "answer"), like trl's reward functions receive the dataset columns.

    exact_match      1.0 when the completion, stripped, equals record["answer"] (verifiable tasks)
    vader            the VADER lexicon's compound score of the completion, in [-1, 1]
    reward_model     a learned reward model (a `ScalarModel` stage of an rlft run), normalised with
                     its reward_stats.json; prompts are the records' "text"
    python           any importable function "module:function" with the signature above

`build_reward(name, **options)` returns the function; unknown names or options are RlftErrors.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import numpy as np

from rlft.errors import RlftError

RewardFn = Callable[[Sequence[str], Sequence[dict]], np.ndarray]


def exact_match(completions: Sequence[str], records: Sequence[dict]) -> np.ndarray:
    """float32 [n]: 1.0 where completion.strip() == record["answer"], else 0.0."""
    return np.array([float(c.strip() == str(r["answer"])) for c, r in zip(completions, records)], np.float32)


def vader(completions: Sequence[str], records: Sequence[dict]) -> np.ndarray:
    """float32 [n]: VADER compound sentiment of each completion (the gold judge of sentiment runs)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    judge = SentimentIntensityAnalyzer()
    return np.array([judge.polarity_scores(c)["compound"] for c in completions], np.float32)


def reward_model(path: str, normalize: bool = True, batch_size: int = 64) -> RewardFn:
    """A reward function scoring prompt + completion with the ScalarModel stage at `path`."""
    import rlft

    model = rlft.load(path)
    if model.kind != "scalar":
        raise RlftError(f"reward_model={path}: not a reward (scalar) model stage")

    def score(completions: Sequence[str], records: Sequence[dict]) -> np.ndarray:
        prompts = [r.get("text", "") for r in records]
        return model.score(list(completions), prompts=prompts, normalize=normalize, batch_size=batch_size)

    return score


def python_function(spec: str) -> RewardFn:
    """The function named by "package.module:function" (imported once)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise RlftError(f"reward python={spec!r}: expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise RlftError(f"reward python={spec!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise RlftError(f"reward python={spec!r}: not callable")
    return fn


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "exact_match": lambda: exact_match,
    "vader": lambda: vader,
    "reward_model": reward_model,
    "python": python_function,
}


def build_reward(name: str, **options) -> RewardFn:
    """The reward function registered as `name`, built with `options` (e.g. path=..., spec=...)."""
    if name not in REWARDS:
        raise RlftError(f"reward={name!r}: expected one of {sorted(REWARDS)}")
    try:
        return REWARDS[name](**options)
    except TypeError as e:
        raise RlftError(f"reward={name!r}: bad options {sorted(options)} ({e})") from None


def check_scores(scores, n: int) -> np.ndarray:
    """The reward function's output as float32 [n], or an RlftError saying what is wrong."""
    scores = np.asarray(scores, np.float32)
    if scores.shape != (n,):
        raise RlftError(f"reward function returned shape {scores.shape}, expected ({n},): one score "
                        f"per completion")
    if not np.isfinite(scores).all():
        raise RlftError(f"reward function returned non-finite scores: {scores[~np.isfinite(scores)][:5]}")
    return scores
