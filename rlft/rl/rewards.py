"""Reward functions for RL, chosen by name: host-side functions of the decoded completions.

A reward function maps (completions: list[str], records: list[dict]) -> float32 [n]: one score
per completion; records are the prompt records the completions answer (their "text", "ids" and
any other fields, e.g. "answer"), like trl's reward functions receive the dataset columns.

    exact_match      1.0 when the completion, stripped, equals record["answer"] (verifiable tasks)
    vader            the VADER lexicon's compound score of the completion, in [-1, 1]
    reward_model     a learned reward model (a `ScalarModel` stage of an rlft run), normalised with
                     its reward_stats.json: a `rlft.rl.reward_model.ModelReward`, which the RL step
                     scores on the training mesh from the rollout's token ids (as a text function,
                     prompts are the records' "text")
    python           any importable function "module:function" with the signature above

`build_reward(name, **options)` returns the function; unknown names or options are RlftErrors.

`score_completions` is how a stage calls one: an exception it raises, or a return value that is not
one finite number per completion (wrong length, strings, None, NaN / inf), becomes an RlftError
naming the function (`reward_name`: its registered name or module:function), the stage and the step,
e.g. `rl step 3: reward function my.rewards:score raised ValueError: boom`; the traceback goes to
STAGE_DIR/errors.log (and stderr with RLFT_DEBUG set; `rlft.errors.log_traceback`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from rlft.errors import RlftError, log_traceback, one_line
from rlft.rl.reward_model import load_reward_model

RewardFn = Callable[[Sequence[str], Sequence[dict]], np.ndarray]


def exact_match(completions: Sequence[str], records: Sequence[dict]) -> np.ndarray:
    """float32 [n]: 1.0 where completion.strip() == record["answer"], else 0.0."""
    return np.array([float(c.strip() == str(r["answer"])) for c, r in zip(completions, records)], np.float32)


def vader(completions: Sequence[str], records: Sequence[dict]) -> np.ndarray:
    """float32 [n]: VADER compound sentiment of each completion (the gold judge of sentiment runs)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    judge = SentimentIntensityAnalyzer()
    return np.array([judge.polarity_scores(c)["compound"] for c in completions], np.float32)


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
    "reward_model": load_reward_model,
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


def reward_name(fn: Callable) -> str:
    """How messages name a reward function: its registered name (exact_match, vader,
    reward_model(PATH)), else module:function as a "python" spec would name it."""
    name = getattr(fn, "rlft_name", None)
    if isinstance(name, str):
        return name
    for registered, builtin in (("exact_match", exact_match), ("vader", vader)):
        if fn is builtin:
            return registered
    if isinstance(fn, functools.partial):
        return reward_name(fn.func)
    module = getattr(fn, "__module__", None) or type(fn).__module__
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{qualname}"


def check_scores(scores, n: int, what: str = "reward function") -> np.ndarray:
    """The reward function's output as float32 [n], or an RlftError saying what is wrong.

    `what` starts the message (e.g. "rl step 3: reward function my.rewards:score"). Accepted: any
    array-like of n real numbers (bools, ints, floats; numpy, JAX, lists), all finite after the
    cast to float32. Strings (even "1.0"), None, other objects and ragged lists are refused, not coerced.
    """
    if scores is None or isinstance(scores, (str, bytes, dict)):
        raise RlftError(f"{what} returned {_kind(scores)}, expected {n} numbers: one score per completion")
    try:
        array = np.asarray(scores)
    except Exception as e:  # ragged nesting, a failing __array__
        raise RlftError(f"{what} returned {_kind(scores)} that is not an array of numbers ({one_line(e)}); "
                        f"expected {n} numbers: one score per completion") from None
    if array.dtype.kind == "V" and "float" in array.dtype.name:  # bfloat16 etc. (ml_dtypes, from JAX)
        array = array.astype(np.float32)
    if array.dtype.kind not in "biuf":
        flat = array.reshape(-1)
        numbers = (bool, int, float, np.bool_, np.integer, np.floating)
        bad = next((x for x in flat if not isinstance(x, numbers)), numbers)
        if array.ndim == 0:
            raise RlftError(f"{what} returned {_kind(scores)}, expected {n} numbers: one score per completion")
        if bad is not numbers:
            bad = bad.item() if isinstance(bad, np.generic) else bad
            raise RlftError(f"{what} returned {_kind(scores)} with {type(bad).__name__} values (e.g. "
                            f"{bad!r:.60}), expected {n} numbers: one score per completion")
        array = array.astype(np.float64)  # an object array of Python numbers
    if array.shape != (n,):
        raise RlftError(f"{what} returned shape {array.shape}, expected ({n},): one score per completion")
    with np.errstate(over="ignore"):
        result = array.astype(np.float32)
    if not np.isfinite(result).all():
        where = np.flatnonzero(~np.isfinite(result))
        raise RlftError(f"{what} returned non-finite scores {array[where[:5]].tolist()} at completions "
                        f"{where[:5].tolist()}{'...' if len(where) > 5 else ''} (scores must be finite "
                        f"float32 numbers)")
    return result


def _kind(value) -> str:
    """A short description of a value's type for messages: "None", "a str", "a list", ..."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def score_completions(reward_fn: RewardFn, completions: Sequence[str], records: Sequence[dict], *,
                      where: str | Callable[[], str], log_dir: str | Path | None = None) -> np.ndarray:
    """reward_fn(completions, records) checked as float32 [len(completions)] (`check_scores`).

    An exception from the function, or a bad return value, is an RlftError "WHERE: reward function
    NAME ..." (`where`, e.g. "rl step 3", may be a callable, evaluated only then), raised from the
    original exception; a raised exception's traceback is appended to LOG_DIR/errors.log
    (`rlft.errors.log_traceback`). KeyboardInterrupt and MemoryError pass unchanged.
    """
    describe = lambda: f"{where() if callable(where) else where}: reward function {reward_name(reward_fn)}"
    try:
        scores = reward_fn(completions, records)
    except MemoryError:
        raise
    except Exception as e:
        what = describe()
        log = log_traceback(e, log_dir, what)
        detail = f"failed: {e}" if isinstance(e, RlftError) else f"raised {one_line(e)}"
        raise RlftError(f"{what} {detail}" + (f" (traceback in {log})" if log else "")) from e
    try:
        return check_scores(scores, len(completions))
    except RlftError:
        return check_scores(scores, len(completions), describe())  # raises again, naming it all
