"""The reward of an RL step: a rollout's Sequences -> scores, float32 [rows] sharded like the batch.

`make_rollout_scorer` picks how, once per run, for a reward or each of a weighted sum of them:

    a ModelReward sharing the policy's vocabulary   `rollout_scores` in one jitted program over the
        rollout's token ids, on the training mesh (no host round trip, one compile)
    a ModelReward with another vocabulary           each process decodes its rows, encodes them with
        the reward model's tokenizer at a fixed width, and they are scored on the mesh
    a text reward function                          each process decodes its rows and calls the
        function on them (every row is scored once over all processes); the processes then agree
        that every call succeeded before the scores are joined into the batch, so a function that
        fails on one process is an error on all of them, not a hang in the next collective
    a LengthPenalty                                 on the mesh from the completion lengths
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from rlft.data.batching import pad_right
from rlft.errors import RlftError
from rlft.generate.sampling import Sequences
from rlft.generate.scoring import reward_examples
from rlft.parallel.distributed import failed_processes, local_to_host
from rlft.parallel.sharding import MeshJit, batch_sharding, shard_batch
from rlft.rl.reward_model import ModelReward, prompt_text, row_scores, rollout_scores
from rlft.rl.rewards import LengthPenalty, RewardFn, reward_name, score_completions

# score(seqs, index, where) -> (scores float32 [rows], metrics): index int [local rows] the prompt of
# each of this process's rows; where() the step's name for messages ("rl step 3").
Scorer = Callable[[Sequences, np.ndarray, Callable[[], str]], tuple[jax.Array, dict[str, jax.Array]]]
Reward = RewardFn | ModelReward | LengthPenalty


def decode_completions(tokenizer, tokens: np.ndarray, completion_mask: np.ndarray) -> list[str]:
    """The completions of rows tokens [rows, prompt_len + n] as text (special tokens dropped);
    completion_mask [rows, n] marks each row's completion tokens."""
    n = completion_mask.shape[1]
    lengths = completion_mask.sum(-1).astype(int)
    return tokenizer.batch_decode([row[:k] for row, k in zip(tokens[:, -n:].tolist(), lengths)],
                                  skip_special_tokens=True)


def make_rollout_scorer(rewards: Reward | Sequence[tuple[str, float, Reward]], *, tokenizer,
                        prompts: Sequence[dict], mesh: Mesh, chunk_rows: int = 0,
                        stage_dir: str | Path | None = None) -> Scorer:
    """The scorer of a reward, or of the weighted sum of several [(name, weight, reward)]
    (`rlft.rl.rewards.build_rewards`), for rollouts on `mesh` (see the module doc).

    With several, each one's mean over the rollout is a metric, rewards/NAME/mean. tokenizer: the
    policy's; prompts: the stage's prompt records (what a text reward receives); chunk_rows: rows
    per reward-model forward (the stage's rl.experience_chunk; 0 = all at once); stage_dir: where
    a failing reward function's traceback goes (errors.log).
    """
    parts = list(rewards) if isinstance(rewards, (list, tuple)) else [("reward", 1.0, rewards)]
    scorers = [(name, weight, _scorer(reward, tokenizer, prompts, mesh, chunk_rows, stage_dir))
               for name, weight, reward in parts]

    def score(seqs: Sequences, index: np.ndarray, where: Callable[[], str]):
        host = _HostRows(seqs, index, tokenizer, prompts, mesh)
        scores = {name: fn(seqs, host, where) for name, _, fn in scorers}
        if len(scorers) == 1:
            name, weight, _ = scorers[0]
            return (scores[name] if weight == 1.0 else weight * scores[name]), {}
        total = sum(weight * scores[name] for name, weight, _ in scorers)
        return total, {f"rewards/{name}/mean": scores[name].mean() for name, _, _ in scorers}

    return score


class _HostRows:
    """This process's rows of a rollout on the host, decoded once, for the rewards that need text."""

    def __init__(self, seqs: Sequences, index: np.ndarray, tokenizer, prompts: Sequence[dict], mesh: Mesh):
        self._seqs, self._index, self._tokenizer, self._prompts, self._mesh = seqs, index, tokenizer, prompts, mesh

    @functools.cached_property
    def texts(self) -> list[str]:
        tokens, completion_mask = local_to_host((self._seqs.tokens, self._seqs.completion_mask), self._mesh)
        return decode_completions(self._tokenizer, tokens, completion_mask)

    @functools.cached_property
    def records(self) -> list[dict]:
        return [self._prompts[i] for i in self._index]


def _scorer(reward: Reward, tokenizer, prompts: Sequence[dict], mesh: Mesh, chunk_rows: int,
            stage_dir: str | Path | None) -> Callable[[Sequences, _HostRows, Callable[[], str]], jax.Array]:
    """fn(seqs, host rows, where) -> float32 [rows] sharded like the batch, for one reward."""
    scores_sharding = batch_sharding(mesh, 1)
    if isinstance(reward, LengthPenalty):
        lengths = MeshJit(jax.jit(reward, out_shardings=scores_sharding), mesh)
        return lambda seqs, host, where: lengths(seqs.completion_mask)
    if isinstance(reward, ModelReward):
        reward = reward.on_mesh(mesh)
        if reward.shares_vocabulary(tokenizer):
            from_tokens = MeshJit(jax.jit(functools.partial(rollout_scores, reward.graphdef, **reward.framing(),
                                                            chunk_rows=chunk_rows),
                                          out_shardings=scores_sharding), mesh)
            return lambda seqs, host, where: from_tokens(reward.params, seqs)
        framing = reward.framing()
        score_rows = MeshJit(jax.jit(functools.partial(row_scores, reward.graphdef, mean=framing["mean"],
                                                       scale=framing["scale"], chunk_rows=chunk_rows),
                                     out_shardings=scores_sharding), mesh)

        def re_encoded(seqs: Sequences, host: _HostRows, where) -> jax.Array:
            examples = reward_examples(reward.tokenizer, host.texts, [prompt_text(r) for r in host.records],
                                       reward.stats, reward.config.max_positions)
            batch, _ = pad_right(examples, reward.max_length, reward.tokenizer.pad_token_id)
            return score_rows(reward.params, *shard_batch((batch.tokens, batch.positions, batch.segment_ids), mesh))

        return re_encoded
    return lambda seqs, host, where: shard_batch(_agreed_scores(reward, host.texts, host.records, where,
                                                                stage_dir), mesh)


def _agreed_scores(reward_fn: RewardFn, texts: list[str], records: list[dict], where: Callable[[], str],
                   stage_dir: str | Path | None) -> np.ndarray:
    """score_completions on this process's rows, once every process knows that all of them succeeded."""
    try:
        scores, error = score_completions(reward_fn, texts, records, where=where, log_dir=stage_dir), None
    except RlftError as e:
        scores, error = None, e
    failed = failed_processes(error is None, "reward scores")
    if error is not None:
        raise error
    if failed:
        raise RlftError(f"{where()}: reward function {reward_name(reward_fn)} failed on process"
                        f"{'es' if len(failed) > 1 else ''} {', '.join(map(str, failed))}; its error is in "
                        f"that process's output")
    return scores
