"""DAPO's dynamic sampling (Yu et al. 2025): a batch made only of groups whose rewards differ.

A group whose `group_size` completions all got the same score has a group-relative advantage of 0
(GRPO, RLOO): it costs a forward and a backward and teaches nothing, and as accuracy rises most
groups become such. With `rl.dynamic_sampling=true` the RL step keeps the informative groups of
its rollout and draws more prompts, `rl.prompts_per_step` at a time, until `prompts_per_step`
informative groups are found or `rl.max_resample_rounds` extra rounds were drawn; a batch still
short is completed with uninformative groups (advantage 0: they add nothing to the gradient, so
the step's shapes stay fixed). Logged: rollout/dropped_groups, rollout/filled_groups,
rollout/resample_rounds.

Determinism: the prompts of extra round r of step s are a pure function of (seed, s, r)
(`resample_indices`) and its sampling key is the step's folded with r, so a resumed run draws
exactly what an uninterrupted one would; the epoch order of the regular batches is untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

RESAMPLE_SALT = 0x44415041  # keeps the extra rounds' prompt draws apart from any other seeded stream


def informative_groups(scores: np.ndarray, group: int) -> np.ndarray:
    """bool [prompts]: which groups of scores [prompts·group] (prompt-major rows) are not all equal."""
    grouped = np.asarray(scores).reshape(-1, group)
    return grouped.max(axis=-1) != grouped.min(axis=-1)


def resample_indices(num_prompts: int, prompts_per_step: int, seed: int, step: int, round_: int) -> np.ndarray:
    """int [prompts_per_step]: the distinct prompts of extra round `round_` (>= 1) of step `step`,
    a pure function of (seed, step, round_)."""
    rng = np.random.default_rng([seed, RESAMPLE_SALT, step, round_])
    return rng.choice(num_prompts, prompts_per_step, replace=False)


@dataclasses.dataclass(frozen=True)
class Selection:
    """The batch dynamic sampling assembles from the rounds drawn.

    rows: int [prompts·group], rows of the rounds' rollouts concatenated in round order; dropped:
    uninformative groups drawn and left out; filled: uninformative groups put in because the rounds
    ran out; informative: informative groups drawn in all (some may be left out once the batch is full).
    """

    rows: np.ndarray
    dropped: int
    filled: int
    informative: int


def select_groups(round_scores: Sequence[np.ndarray], group: int, prompts: int) -> Selection:
    """The first `prompts` informative groups of the rounds (scores [prompts·group] each, in order),
    then, if there are fewer, the first uninformative ones to fill the batch."""
    keep = np.concatenate([informative_groups(s, group) for s in round_scores])
    good, flat = np.flatnonzero(keep), np.flatnonzero(~keep)
    filled = max(prompts - len(good), 0)
    groups = np.concatenate([good[:prompts], flat[:filled]])
    rows = (groups[:, None] * group + np.arange(group)[None, :]).reshape(-1)
    return Selection(rows=rows.astype(np.int32), dropped=len(flat) - filled, filled=filled,
                     informative=len(good))


def enough(round_scores: Sequence[np.ndarray], group: int, prompts: int) -> bool:
    """Whether the rounds drawn so far hold `prompts` informative groups."""
    return sum(int(informative_groups(s, group).sum()) for s in round_scores) >= prompts
