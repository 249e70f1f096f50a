"""Rollouts: prompts -> sampled completions -> (host) scores -> experience the losses consume.

    sample_rollout    prompts [prompts·group, prompt_len] -> Sequences (jittable; tokens, positions,
                      segment ids, completion mask, the sampler's logprobs), on device
    (scores)          a reward function of the decoded texts, `rlft.rl.rewards` (host side)
    make_experience   reference logprobs (frozen copy), old logprobs and values (critic),
                      per-token rewards (KL penalty + score at the last real token, optional
                      no-EOS penalty), advantages and returns -> Experience (pure, jittable)

Rows are prompt-major: row p·G + g is completion g of prompt p, so [prompts·group] reshapes to
[prompts, group] and a group's statistics never cross devices when the batch is sharded by
prompt. Completion columns are static (max_new_tokens); everything after a row's first EOS is
masked. Policy forwards go through `policy_outputs`, the one function the loss uses too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import Mesh

from rlft.generate.logprobs import SamplingParams, logprobs_of, sampling_log_probs, vocab_chunked_logprobs
from rlft.objectives import advantages as adv
from rlft.objectives.kl import kl_estimate
from rlft.objectives.pg import entropy_from_log_probs
from rlft.rl.config import PGConfig
from rlft.generate.sampling import Sequences, is_eos, sample_sequences
from rlft.train.steps import map_row_chunks

Array = jax.Array


def sample_rollout(graphdef: nnx.GraphDef, params: nnx.State, prompt_tokens: Array, prompt_mask: Array,
                   key: Array, *, eos_id: int | Sequence[int], pad_id: int, max_new_tokens: int,
                   sampling: SamplingParams, mesh: Mesh | None = None, group_size: int = 1) -> Sequences:
    """Sampled completions of left-padded prompts [rows, prompt_len] in the training layout.

    group_size G > 1: rows are prompt-major groups of G copies of a prompt, each prefilled once
    (`rlft.generate.sampling.prefill`); the completions are those of G = 1."""
    out = sample_sequences(graphdef, params, prompt_tokens, prompt_mask, key, eos_id, pad_id,
                           max_new_tokens=max_new_tokens, sampling=sampling, mesh=mesh, group_size=group_size)
    return Sequences.from_sample(prompt_tokens, prompt_mask, out)


@struct.dataclass
class Experience:
    """One rollout made ready for updates; [rows, max_new_tokens] unless noted, rows prompt-major.

    tokens/positions/segment_ids [rows, prompt_len + max_new_tokens] and mask are the Sequences';
    sampler_logprobs: the sampler's; old_logprobs: the updating policy's before the update;
    ref_logprobs: the frozen reference's (zeros without one); values: the critic's (zeros without
    one); rewards: per token; advantages and returns: what the losses read; scores [rows]: the
    reward function's (after the no-EOS penalty).
    """

    tokens: Array
    positions: Array
    segment_ids: Array
    mask: Array
    sampler_logprobs: Array
    old_logprobs: Array
    ref_logprobs: Array
    values: Array
    rewards: Array
    advantages: Array
    returns: Array
    scores: Array

    @property
    def prompt_length(self) -> int:
        return self.tokens.shape[1] - self.mask.shape[1]


def policy_outputs(graphdef: nnx.GraphDef, params: nnx.State, rows: Any, sampling: SamplingParams, *,
                   critic_graphdef: nnx.GraphDef | None = None, critic_params: nnx.State | None = None,
                   critic: str = "none", entropy: bool = False, vocab_chunk: int = 0) -> dict[str, Array]:
    """One policy forward over prompt + completion rows: completion logprobs [rows, n], and
    optionally entropy [rows, n] and values [rows, n] (V of the state before each completion token).

    vocab_chunk > 0 (below the vocabulary size): log-probs and entropy read the LM head that many
    vocabulary columns at a time (`vocab_chunked_logprobs`), so no [rows, n, vocab] logits exist.

    `rows`: Sequences or Experience (tokens, positions, segment_ids and the prompt_length).
    critic "shared": a ScalarHead (`critic_graphdef`/`critic_params`) on the policy's own hidden
    states; "separate": a ScalarModel run over the same tokens; "none": no values.
    """
    tokens, positions, segment_ids = rows.tokens, rows.positions, rows.segment_ids
    start = rows.prompt_length
    model = nnx.merge(graphdef, params)
    hidden, _ = model.hidden(tokens, positions, segment_ids)
    hidden = hidden[:, start - 1:-1]  # the states that predict completion tokens
    targets, vocab = tokens[:, start:], model.config.vocab_size
    if 0 < vocab_chunk < vocab:
        block = lambda first, size: model.logits_block(hidden, first, size)
        logprobs, entropies = vocab_chunked_logprobs(block, vocab, vocab_chunk, targets, sampling, entropy)
        out = {"logprobs": logprobs, **({"entropy": entropies} if entropy else {})}
    else:
        logits = model.logits_from_hidden(hidden)
        out = {"logprobs": logprobs_of(logits, targets, sampling)}
        if entropy:
            out["entropy"] = entropy_from_log_probs(sampling_log_probs(logits, sampling))
    if critic == "shared":
        out["values"] = nnx.merge(critic_graphdef, critic_params)(hidden)
    elif critic == "separate":
        out["values"] = nnx.merge(critic_graphdef, critic_params)(tokens, positions, segment_ids)[:, start - 1:-1]
    return out


def reference_logprobs(graphdef: nnx.GraphDef, reference_params: nnx.State, rows: Any,
                       sampling: SamplingParams, vocab_chunk: int = 0) -> Array:
    """The frozen reference's completion logprobs [rows, n] under the same sampling distribution."""
    out = policy_outputs(graphdef, reference_params, rows, sampling, vocab_chunk=vocab_chunk)
    return jax.lax.stop_gradient(out["logprobs"])


def ended_with_eos(tokens: Array, mask: Array, eos_id: int | Sequence[int]) -> Array:
    """bool [rows]: the completion (columns [rows, n] of tokens) contains EOS (any of `eos_id`)."""
    return jnp.any(is_eos(tokens, eos_id) & (mask > 0), axis=-1)


def token_rewards(scores: Array, kl: Array, mask: Array, kl_coef: Array | float) -> Array:
    """Per-token rewards [rows, n]: −kl_coef·kl on every completion token, plus the score at the
    last real token (0 outside the mask)."""
    keep = mask > 0
    last = jnp.sum(keep, axis=-1) - 1  # the completion's last real column (EOS if it ended)
    at_last = jnp.arange(mask.shape[1])[None, :] == last[:, None]
    rewards = -kl_coef * kl + jnp.where(at_last, scores[:, None], 0.0)
    return jnp.where(keep, rewards, 0.0)


def make_experience(config: PGConfig, graphdef: nnx.GraphDef, params: nnx.State, batch: Sequences,
                    scores: Array, reference_params: nnx.State | None, kl_coef: Array, baseline: Array,
                    critic_graphdef: nnx.GraphDef | None = None,
                    critic_params: nnx.State | None = None) -> tuple[Experience, dict[str, Array]]:
    """Experience from sampled rows (Sequences) and their scores [rows]; pure, no gradient.

    The forwards (old logprobs and values, reference logprobs) run over `config.experience_chunk`
    rows at a time (`map_row_chunks`; 0 = all rows at once) and read the vocabulary in
    `config.vocab_chunk` blocks, so memory follows the chunk, not the rollout.

    Returns (experience, stats): stats["kl"] is the per-sequence summed k1 KL [rows] (what the
    adaptive controller and `objective/kl` read), stats["kl_reward"] the summed penalty estimator,
    stats["ended"] whether each row produced EOS, stats["baseline"] the updated moving average.
    """
    mask = batch.completion_mask.astype(jnp.float32)
    keep = mask > 0
    rows = mask.shape[0]
    chunks = rows // config.experience_chunk if config.experience_chunk else 1
    ended = ended_with_eos(batch.tokens[:, -mask.shape[1]:], mask, config.eos_ids)
    scores = scores.astype(jnp.float32) - config.no_eos_penalty * (~ended).astype(jnp.float32)
    if config.recompute_old_logprobs or config.critic != "none":
        forward = lambda chunk: policy_outputs(graphdef, params, chunk, config.sampling, critic=config.critic,
                                               critic_graphdef=critic_graphdef, critic_params=critic_params,
                                               vocab_chunk=config.vocab_chunk)
        current = jax.lax.stop_gradient(map_row_chunks(forward, batch, chunks))
    else:
        current = {}
    old_logprobs = current["logprobs"] if config.recompute_old_logprobs else batch.logprobs
    old_logprobs = jnp.where(keep, old_logprobs, 0.0)
    values = jnp.where(keep, current["values"], 0.0) if config.critic != "none" else jnp.zeros_like(mask)
    if reference_params is not None and config.uses_reference:
        ref_logprobs = map_row_chunks(lambda chunk: reference_logprobs(
            graphdef, reference_params, chunk, config.sampling, config.vocab_chunk), batch, chunks)
    else:
        ref_logprobs = old_logprobs
    ref_logprobs = jnp.where(keep, ref_logprobs, 0.0)
    # KL of the sampled tokens: k1 for the controller and the log, the chosen estimator for the penalty.
    kl_k1 = jnp.where(keep, kl_estimate(old_logprobs, ref_logprobs, "k1"), 0.0)
    kl_pen = jnp.where(keep, kl_estimate(old_logprobs, ref_logprobs, config.kl_estimator), 0.0)
    coef = kl_coef if config.kl_placement == "reward" else 0.0
    rewards = token_rewards(scores, kl_pen, mask, coef)
    if config.advantage == adv.TOKEN_LEVEL:
        advantages, returns = adv.gae(rewards, values, mask, config.gamma, config.lam)
        new_baseline = baseline
    else:
        totals = jnp.sum(rewards, axis=-1).reshape(rows // config.group_size, config.group_size)
        seq = adv.sequence_advantages(config.advantage, totals, baseline=baseline,
                                      scale_by_std=config.grpo_scale_by_std, ddof=config.grpo_ddof,
                                      eps=config.grpo_eps)
        new_baseline = adv.update_baseline(baseline, totals, config.baseline_decay)
        advantages = jnp.where(keep, seq.reshape(rows, 1), 0.0)
        returns = advantages
    if config.whiten_advantages:
        advantages = adv.whiten(advantages, mask)
    experience = Experience(tokens=batch.tokens, positions=batch.positions, segment_ids=batch.segment_ids,
                            mask=mask, sampler_logprobs=batch.logprobs, old_logprobs=old_logprobs,
                            ref_logprobs=ref_logprobs, values=values, rewards=rewards,
                            advantages=advantages, returns=returns, scores=scores)
    stats = {"kl": jnp.sum(kl_k1, axis=-1), "kl_reward": jnp.sum(kl_pen, axis=-1), "ended": ended,
             "baseline": new_baseline}
    return experience, stats
