"""The reward of an RL step: a rollout's Sequences -> scores, float32 [rows] sharded like the batch.

`make_rollout_scorer` picks how, once per run:

    a ModelReward sharing the policy's vocabulary   `rollout_scores` in one jitted program over the
        rollout's token ids, on the training mesh (no host round trip, one compile)
    a ModelReward with another vocabulary           each process decodes its rows, encodes them with
        the reward model's tokenizer at a fixed width, and they are scored on the mesh
    a text reward function                          each process decodes its rows and calls the
        function on them (every row is scored once over all processes); the processes then agree
        that every call succeeded before the scores are joined into the batch, so a function that
        fails on one process is an error on all of them, not a hang in the next collective
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
from rlft.rl.reward_model import ModelReward, row_scores, rollout_scores
from rlft.rl.rewards import RewardFn, reward_name, score_completions

# score(seqs, index, where) -> float32 [rows]: index int [local rows] the prompt of each of this
# process's rows; where() the step's name for messages ("rl step 3").
Scorer = Callable[[Sequences, np.ndarray, Callable[[], str]], jax.Array]


def decode_completions(tokenizer, tokens: np.ndarray, completion_mask: np.ndarray) -> list[str]:
    """The completions of rows tokens [rows, prompt_len + n] as text (special tokens dropped);
    completion_mask [rows, n] marks each row's completion tokens."""
    n = completion_mask.shape[1]
    lengths = completion_mask.sum(-1).astype(int)
    return tokenizer.batch_decode([row[:k] for row, k in zip(tokens[:, -n:].tolist(), lengths)],
                                  skip_special_tokens=True)


def make_rollout_scorer(reward: RewardFn | ModelReward, *, tokenizer, prompts: Sequence[dict], mesh: Mesh,
                        chunk_rows: int = 0, stage_dir: str | Path | None = None) -> Scorer:
    """The scorer of `reward` for rollouts on `mesh` (see the module doc).

    tokenizer: the policy's; prompts: the stage's prompt records (what a text reward receives);
    chunk_rows: rows per reward-model forward (the stage's rl.experience_chunk; 0 = all at once);
    stage_dir: where a failing reward function's traceback goes (errors.log).
    """
    scores_sharding = batch_sharding(mesh, 1)
    if isinstance(reward, ModelReward):
        reward = reward.on_mesh(mesh)
        if reward.shares_vocabulary(tokenizer):
            from_tokens = MeshJit(jax.jit(functools.partial(rollout_scores, reward.graphdef, **reward.framing(),
                                                            chunk_rows=chunk_rows), out_shardings=scores_sharding), mesh)
            return lambda seqs, index, where: from_tokens(reward.params, seqs)
        framing = reward.framing()
        score_rows = MeshJit(jax.jit(functools.partial(row_scores, reward.graphdef, mean=framing["mean"],
                                                       scale=framing["scale"], chunk_rows=chunk_rows),
                                     out_shardings=scores_sharding), mesh)

    def score(seqs: Sequences, index: np.ndarray, where: Callable[[], str]) -> jax.Array:
        tokens, completion_mask = local_to_host((seqs.tokens, seqs.completion_mask), mesh)
        texts = decode_completions(tokenizer, tokens, completion_mask)
        records = [prompts[i] for i in index]
        if isinstance(reward, ModelReward):
            examples = reward_examples(reward.tokenizer, texts, [r.get("text", "") for r in records],
                                       reward.stats, reward.config.max_positions)
            batch, _ = pad_right(examples, reward.max_length, reward.tokenizer.pad_token_id)
            return score_rows(reward.params, *shard_batch((batch.tokens, batch.positions, batch.segment_ids), mesh))
        return shard_batch(_agreed_scores(reward, texts, records, where, stage_dir), mesh)

    return score


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
