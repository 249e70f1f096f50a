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
    format           1.0 when the stripped completion matches rl.format_pattern whole (a regex)
    length           DAPO's soft over-length penalty (`LengthPenalty`, scored on the mesh from the
                     completion lengths): 0 up to max_new_tokens - rl.length_buffer, -1 at the limit
    module:function  any importable function with the signature above (`REWARDS` is a
                     `rlft.registry.Registry`: built-in names and user entries dispatch the same way)

`build_reward(name, **options)` returns one; `build_rewards("a,b,mod:fn", "1,0.5,2", ...)` the
weighted list rl.rewards / rl.reward_weights name (the RL step sums them and logs each one's mean
as rewards/NAME/mean); unknown names or options are RlftErrors.

`score_completions` is how a stage calls one: an exception it raises, or a return value that is not
one finite number per completion (wrong length, strings, None, NaN / inf), becomes an RlftError
naming the function (`reward_name`: its registered name or module:function), the stage and the step,
e.g. `rl step 3: reward function my.rewards:score raised ValueError: boom`; the traceback goes to
STAGE_DIR/errors.log (and stderr with RLFT_DEBUG set; `rlft.errors.log_traceback`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rlft.errors import RlftError, log_traceback, one_line
from rlft.registry import Registry, is_user_entry
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


def format_match(pattern: str) -> RewardFn:
    """A reward function: 1.0 where the stripped completion matches the regular expression `pattern`
    whole (`re.fullmatch`, `.` matching newlines too), else 0.0 (e.g. r"<think>.*</think>\\s*<answer>.*</answer>")."""
    if not isinstance(pattern, str) or not pattern:
        raise RlftError("reward format: set rl.format_pattern to a regular expression")
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise RlftError(f"rl.format_pattern={pattern!r}: not a regular expression ({e})") from None

    def score(completions: Sequence[str], records: Sequence[dict]) -> np.ndarray:
        return np.array([float(compiled.fullmatch(c.strip()) is not None) for c in completions], np.float32)

    score.rlft_name = "format"
    return score


@dataclasses.dataclass(frozen=True)
class LengthPenalty:
    """DAPO's soft over-length penalty, scored on the mesh from the completion lengths: 0 up to
    max_new_tokens - buffer tokens, then linear to -1 at max_new_tokens (a completion cut there)."""

    max_new_tokens: int
    buffer: int
    rlft_name: str = "length"

    def __post_init__(self):
        if not isinstance(self.buffer, int) or not 0 < self.buffer <= self.max_new_tokens:
            raise RlftError(f"rl.length_buffer={self.buffer!r}: expected an integer in [1, rl.max_new_tokens="
                            f"{self.max_new_tokens}]")

    def __call__(self, completion_mask: jax.Array) -> jax.Array:
        """float32 [rows] of completion_mask [rows, max_new_tokens]."""
        length = jnp.sum(completion_mask > 0, axis=-1).astype(jnp.float32)
        free = self.max_new_tokens - self.buffer
        return -jnp.clip((length - free) / self.buffer, 0.0, 1.0)


def _format(format_pattern: str = "", **_options) -> RewardFn:
    return format_match(format_pattern)


def _length(max_new_tokens: int | None = None, length_buffer: int | None = None, **_options) -> LengthPenalty:
    if max_new_tokens is None:
        raise RlftError("reward length: needs the stage's max_new_tokens")
    return LengthPenalty(int(max_new_tokens), length_buffer)


def _reward_model(reward_model: str | None = None, **_options):
    if not reward_model:
        raise RlftError("reward reward_model: set rl.reward_model to a reward stage or a Hugging Face "
                        "sequence-classification checkpoint directory")
    return load_reward_model(reward_model)


REWARDS = Registry(
    "reward",
    "fn(completions, records) -> scores: completions list[str] (decoded, special tokens dropped), records "
    "list[dict] (the prompt records they answer: 'text', 'ids' and the data's other fields, e.g. "
    "'answer'), scores one finite number per completion (float32 [n])",
    {"exact_match": lambda **_options: exact_match, "vader": lambda **_options: vader, "format": _format,
     "length": _length, "reward_model": _reward_model})
"""rl.rewards: built-in names map to factories factory(**options) -> reward (options: format_pattern,
max_new_tokens, length_buffer, reward_model); a user's "module:function" is the reward function itself."""


def build_reward(name: str, field: str = "rl.rewards", **options) -> RewardFn:
    """The reward `name`: a built-in of REWARDS built with the `options` it reads, or a user's
    "module:function" (REWARDS.contract; imported, the current directory on the import path)."""
    entry = REWARDS.resolve(name, field)
    return entry if is_user_entry(name) else entry(**options)


def build_rewards(names: str, weights: str = "", **options) -> list[tuple[str, float, RewardFn]]:
    """[(name, weight, reward)] of the comma-separated `names` (rl.rewards) and `weights`
    (rl.reward_weights; empty: 1 each): a built-in name of REWARDS, or "module:function". options:
    format_pattern (format), max_new_tokens and length_buffer (length), reward_model (its path)."""
    parts = [n.strip() for n in str(names).split(",") if n.strip()]
    if not parts:
        raise RlftError("rl.rewards is empty: name at least one reward (e.g. exact_match, or module:function)")
    if len(set(parts)) != len(parts):
        raise RlftError(f"rl.rewards={names!r}: a reward is named twice")
    if str(weights).strip():
        try:
            values = [float(w) for w in str(weights).split(",")]
        except ValueError:
            raise RlftError(f"rl.reward_weights={weights!r}: expected comma-separated numbers") from None
        if len(values) != len(parts) or not all(np.isfinite(values)):
            raise RlftError(f"rl.reward_weights={weights!r}: expected {len(parts)} finite numbers, one per "
                            f"reward of rl.rewards={names!r}")
    else:
        values = [1.0] * len(parts)
    return [(name, weight, build_reward(name, **options)) for name, weight in zip(parts, values)]


def reward_name(fn: Callable) -> str:
    """How messages name a reward function: its registered name (exact_match, vader,
    reward_model(PATH)), else module:function as rl.rewards would name it."""
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
