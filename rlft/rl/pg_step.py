"""The policy-gradient step (PPO, GRPO, RLOO, REINFORCE): one pure function of pytrees.

    pg_step(state, batch, reference_params) -> (state, metrics)

batch = {"sequences": Sequences (sampled rows, prompt-major [prompts·group, ...]), "scores": [rows]}.
The step builds the experience (`rlft.rl.rollout.make_experience`: reference and old logprobs,
values, per-token rewards, advantages), then runs `epochs` × `minibatches` updates in one
`lax.scan` (each epoch's minibatches drawn by `minibatch_picks`, each through the shared epilogue pieces
`mean_gradients` / `apply_update`, so micro-batching and the device count never change a
gradient), then moves the KL controller. Everything the step changes lives in `PGState`: policy
and critic params and optimizer states, the KL coefficient, the REINFORCE baseline, the step
and the RNG. The reference params are a frozen, non-donated argument.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from rlft.models.lora import adapters_off, combine
from rlft.ops import masked_mean
from rlft.objectives.kl import KL_CONTROLLERS, kl_estimate
from rlft.objectives.pg import aggregate, policy_loss, log_ratios, truncated_is_weights, value_loss
from rlft.rl.config import PGConfig
from rlft.rl.rollout import Experience, ended_with_eos, make_experience, policy_outputs
from rlft.train.steps import apply_update, mean_gradients, step_key

Array = jax.Array


@struct.dataclass
class PGState:
    """Everything an RL step updates (saved and restored whole by `rlft.train.checkpoints`).

    params/opt_state: the policy; critic_params/critic_opt_state: a ScalarModel ("separate") or a
    ScalarHead on the policy's trunk ("shared"), None without a critic; kl_coef: float32 [], the
    current KL coefficient; baseline: float32 [], REINFORCE's moving average; step: int32 [];
    rng: uint32 [2] key data; pending: with rl.max_staleness = K > 0, the K rollouts sampled ahead
    (`rlft.rl.pending`: {"sequences": Sequences [K, rows, ...], "version": int32 [K], the policy
    version that sampled each}), checkpointed with the rest so a resumed run
    trains on exactly the rollouts an uninterrupted one would; None in a synchronous run.
    """

    step: Array
    params: nnx.State
    opt_state: Any
    rng: Array
    critic_params: Any
    critic_opt_state: Any
    kl_coef: Array
    baseline: Array
    pending: Any = None


def init_pg_state(params: nnx.State, tx: optax.GradientTransformation, critic_params: Any,
                  critic_tx: optax.GradientTransformation | None, kl_coef: float, seed: int) -> PGState:
    """Step 0: optimizers initialised, kl_coef at its initial value, baseline 0."""
    return PGState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   rng=jax.random.key_data(jax.random.key(seed)), critic_params=critic_params,
                   critic_opt_state=None if critic_params is None else critic_tx.init(critic_params),
                   kl_coef=jnp.asarray(kl_coef, jnp.float32), baseline=jnp.zeros((), jnp.float32))


# Token-weighted sums each minibatch reports; divided by the token count at the end.
_TOKEN_SUMS = ("ratio", "clipped", "approx_kl", "value_clipped", "entropy", "sampler_diff",
               "sampler_mismatch_kl", "tis_weight")


def pg_loss(trainable: tuple[nnx.State, Any], mb: Experience, *, graphdef: nnx.GraphDef,
            critic_graphdef: nnx.GraphDef | None, config: PGConfig,
            kl_coef: Array) -> tuple[Array, Array, dict[str, Array]]:
    """(loss sum, count, aux sums) of one minibatch for (policy params, critic params).

    Per token: the policy loss `config.policy_loss` (clipped surrogate or CISPO) on log-ratios at
    `config.ratio_level` (token, or GSPO's sequence), times truncated importance weights with
    `config.tis` (+ kl_coef·KL estimate when the KL is a loss term, − entropy_coef · entropy,
    + vf_coef · clipped value loss), over the completion tokens (without the rows cut at
    max_new_tokens with `config.mask_truncated`), aggregated by `config.loss_aggregation` into
    (sum, count). With a single update per rollout the old logprobs are the current ones,
    detached, so the ratio is exactly 1 and no separate forward is spent on them.
    """
    params, critic_params = trainable
    out = policy_outputs(graphdef, params, mb, config.sampling, critic_graphdef=critic_graphdef,
                         critic_params=critic_params, critic=config.critic,
                         entropy=config.entropy_coef > 0, vocab_chunk=config.vocab_chunk)
    logp = out["logprobs"]
    mask = mb.mask
    if config.mask_truncated:  # completions cut at max_new_tokens leave the loss
        mask = mask * ended_with_eos(mb.tokens[:, -mask.shape[1]:], mb.mask, config.eos_ids)[:, None]
    keep = mask > 0
    old = jax.lax.stop_gradient(logp) if config.single_update else mb.old_logprobs
    log_ratio = log_ratios(logp, old, mask, config.ratio_level)
    per_token, stats = policy_loss(config.policy_loss, logp, old, mb.advantages, log_ratio,
                                   eps_low=config.clip_eps_low, eps_high=config.clip_eps_high, clip=config.clip)
    # The trainer's log-probs before the update against the sampler's: the mismatch (k3 estimate of
    # KL(sampler‖trainer) on the sampled tokens) and, with rl.tis, the capped weights on the loss.
    trainer_ratio = jnp.exp(jax.lax.stop_gradient(old) - mb.sampler_logprobs)
    stats = {**stats, "sampler_mismatch_kl": (trainer_ratio - 1.0) - jnp.log(trainer_ratio)}
    if config.tis != "none":
        weights = truncated_is_weights(old, mb.sampler_logprobs, mask, config.tis, config.tis_cap)
        per_token = per_token * weights
        stats = {**stats, "tis_weight": weights}
    policy_part = per_token
    if config.kl_placement == "loss" and config.uses_reference:
        per_token = per_token + kl_coef * kl_estimate(logp, mb.ref_logprobs, config.kl_estimator)
    if config.entropy_coef > 0:
        per_token = per_token - config.entropy_coef * out["entropy"]
    value_part = jnp.zeros_like(per_token)
    if config.critic != "none":
        value_part, vstats = value_loss(out["values"], mb.values, mb.returns, clip_eps=config.vf_clip)
        per_token = per_token + config.vf_coef * value_part
        stats = {**stats, "value_clipped": vstats["clipped"]}
    n = config.max_new_tokens
    loss_sum, count = aggregate(jnp.where(keep, per_token, 0.0), mask, config.loss_aggregation, n)
    stats = {**stats, "entropy": out.get("entropy", jnp.zeros_like(logp)),
             "sampler_diff": jnp.abs(jax.lax.stop_gradient(logp) - mb.sampler_logprobs)}
    masked_sum = lambda x: jnp.sum(jnp.where(keep, x, 0.0))
    aux = {name: masked_sum(stats.get(name, jnp.zeros_like(logp))) for name in _TOKEN_SUMS}
    aux["tokens"] = jnp.sum(keep.astype(jnp.float32))
    aux["policy_loss"] = aggregate(jnp.where(keep, jax.lax.stop_gradient(policy_part), 0.0), mask,
                                   config.loss_aggregation, n)[0]
    aux["value_loss"] = aggregate(jnp.where(keep, jax.lax.stop_gradient(value_part), 0.0), mask,
                                  config.loss_aggregation, n)[0]
    return loss_sum, count, aux


def minibatch_picks(key: Array, rows: int, epochs: int, minibatches: int) -> Array:
    """int32 [epochs · minibatches, rows / minibatches]: which row of each block of `minibatches`
    consecutive rows every update's minibatch takes (block b of minibatch u is row b·minibatches + picks[u, b]).

    Each epoch draws a fresh permutation inside every block, so an epoch visits every row once and a
    minibatch holds one row of each block. Blocks never straddle devices (a batch is sharded in
    contiguous rows, and a minibatch that shards evenly gives each device whole blocks), so a
    minibatch is read where its rows live: no gather across devices, no copy of the experience per
    epoch, and the same picks on any number of devices.
    """
    blocks = rows // minibatches
    epoch = lambda e: jnp.argsort(jax.random.uniform(jax.random.fold_in(key, e), (blocks, minibatches)), axis=1).T
    return jnp.concatenate([epoch(e) for e in range(epochs)]).astype(jnp.int32)


def take_minibatch(experience: Experience, picks: Array, minibatches: int) -> Experience:
    """The rows `picks` [rows / minibatches] (one per block, `minibatch_picks`) of every field."""

    def take(x):
        blocks = x.reshape(x.shape[0] // minibatches, minibatches, *x.shape[1:])
        index = picks.reshape(-1, 1, *([1] * (x.ndim - 1)))
        return jnp.take_along_axis(blocks, index, axis=1)[:, 0]

    return jax.tree.map(take, experience)


def pg_updates(state: PGState, experience: Experience, key: Array, *, graphdef: nnx.GraphDef,
               critic_graphdef: nnx.GraphDef | None, tx: optax.GradientTransformation,
               critic_tx: optax.GradientTransformation | None,
               config: PGConfig, frozen: nnx.State | None = None) -> tuple[PGState, dict[str, Array]]:
    """`epochs` × `minibatches` updates (one lax.scan); per-minibatch metrics stacked [updates].

    frozen: the base of a LoRA policy (state.params are its adapters), else None.
    """
    loss = functools.partial(pg_loss, graphdef=graphdef, critic_graphdef=critic_graphdef,
                             config=config, kl_coef=state.kl_coef)
    loss_fn = lambda trainable, mb: loss((combine(frozen, trainable[0]), trainable[1]), mb)

    def update(carry, picks):
        params, opt_state, critic_params, critic_opt_state = carry
        mb = take_minibatch(experience, picks, config.minibatches)
        grads, loss, count, aux = mean_gradients(loss_fn, (params, critic_params), mb, config.accum_steps)
        params, opt_state, metrics = apply_update(params, opt_state, grads[0], tx, loss)
        if critic_params is not None:
            critic_params, critic_opt_state, critic_metrics = apply_update(
                critic_params, critic_opt_state, grads[1], critic_tx, loss)
            metrics["critic_grad_norm"] = critic_metrics["grad_norm"]
            metrics["nonfinite"] = jnp.maximum(metrics["nonfinite"], critic_metrics["nonfinite"])
        return (params, opt_state, critic_params, critic_opt_state), {"loss": loss, "count": count,
                                                                     **aux, **metrics}

    carry = (state.params, state.opt_state, state.critic_params, state.critic_opt_state)
    picks = minibatch_picks(key, experience.mask.shape[0], config.epochs, config.minibatches)
    (params, opt_state, critic_params, critic_opt_state), stacked = jax.lax.scan(update, carry, picks)
    return state.replace(params=params, opt_state=opt_state, critic_params=critic_params,
                         critic_opt_state=critic_opt_state), stacked


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
    """1 − Var(returns − values) / Var(returns) over masked tokens (1 = perfect, ≤ 0 = useless)."""
    var = lambda x: masked_mean(jnp.square(x - masked_mean(x, mask)), mask)
    return 1.0 - var(returns - values) / jnp.maximum(var(returns), 1e-8)


def pg_step(state: PGState, batch: dict, reference_params: nnx.State | None = None,
            frozen: nnx.State | None = None, *, graphdef: nnx.GraphDef,
            critic_graphdef: nnx.GraphDef | None = None, tx: optax.GradientTransformation,
            critic_tx: optax.GradientTransformation | None = None,
            config: PGConfig) -> tuple[PGState, dict[str, Array]]:
    """One RL step on sampled rows: experience, updates, KL controller; metrics named as trl's.

    With `frozen` (a LoRA policy: state.params are its adapters) and no `reference_params`, the
    reference is the base with the adapters off, so the base weights are held once.
    """
    sequences, scores = batch["sequences"], batch["scores"]
    if frozen is not None and reference_params is None and config.uses_reference:
        reference_params = adapters_off(frozen, state.params)
    experience, stats = make_experience(config, graphdef, combine(frozen, state.params), sequences,
                                        scores, reference_params, state.kl_coef, state.baseline,
                                        critic_graphdef, state.critic_params)
    key = step_key(state)  # the minibatch shuffle; the sampler uses salt SAMPLE_SALT
    new_state, stacked = pg_updates(state, experience, key, graphdef=graphdef,
                                    critic_graphdef=critic_graphdef, tx=tx, critic_tx=critic_tx,
                                    config=config, frozen=frozen)
    rows = scores.shape[0]
    mean_kl = jnp.mean(stats["kl"])
    controller = KL_CONTROLLERS[config.kl_controller]
    kl_coef = controller(state.kl_coef, mean_kl, rows, target=config.kl_target, horizon=config.kl_horizon)
    new_state = new_state.replace(step=state.step + 1, kl_coef=kl_coef, baseline=stats["baseline"])

    mask = experience.mask
    tokens = jnp.maximum(jnp.sum(stacked["tokens"]), 1.0)
    token_mean = lambda name: jnp.sum(stacked[name]) / tokens
    totals = jnp.sum(experience.rewards, axis=-1)
    lengths = jnp.sum(mask, axis=-1)
    if config.recompute_old_logprobs:
        sampler_diff = masked_mean(jnp.abs(experience.old_logprobs - experience.sampler_logprobs), mask)
    else:  # the first minibatch's forward runs the pre-update policy
        sampler_diff = stacked["sampler_diff"][0] / jnp.maximum(stacked["tokens"][0], 1.0)
    updates = stacked["loss"].shape[0]
    metrics = {
        "objective/kl": mean_kl,
        "objective/kl_penalty": jnp.mean(stats["kl_reward"]),
        "objective/kl_coef": state.kl_coef,
        "objective/entropy": jnp.mean(jnp.sum(jnp.where(mask > 0, -experience.sampler_logprobs, 0.0), -1)),
        "objective/scores": jnp.mean(experience.scores),
        "objective/rlhf_reward": jnp.mean(experience.scores - state.kl_coef * stats["kl_reward"]),
        "reward/mean": jnp.mean(totals),
        "reward/std": jnp.std(totals),
        "policy/approxkl": token_mean("approx_kl"),
        "policy/clipfrac": token_mean("clipped"),
        "policy/ratio": token_mean("ratio"),
        "policy/sampler_logprob_diff": sampler_diff,
        "policy/sampler_mismatch_kl": token_mean("sampler_mismatch_kl"),
        "loss/total": jnp.sum(stacked["loss"]) / updates,
        "loss/policy": jnp.sum(stacked["policy_loss"] / stacked["count"]) / updates,
        "completions/mean_length": jnp.mean(lengths),
        "completions/clipped_ratio": 1.0 - jnp.mean(stats["ended"].astype(jnp.float32)),
        "grad_norm": jnp.mean(stacked["grad_norm"]),
        "learning_rate": stacked["learning_rate"][-1],
        "param_norm": stacked["param_norm"][-1],
        "nonfinite": jnp.sum(stacked["nonfinite"]),  # minibatch updates skipped for NaN / inf
    }
    if config.entropy_coef > 0:
        metrics["policy/entropy"] = token_mean("entropy")
    if config.tis != "none":
        metrics["policy/tis_weight"] = token_mean("tis_weight")
    if config.critic != "none":
        metrics.update({
            "loss/value": jnp.sum(stacked["value_loss"] / stacked["count"]) / updates,
            "val/clipfrac": token_mean("value_clipped"),
            "val/mean": masked_mean(experience.values, mask),
            "val/explained_variance": explained_variance(experience.values, experience.returns, mask),
            "critic_grad_norm": jnp.mean(stacked["critic_grad_norm"]),
        })
    if config.advantage == "reinforce":
        metrics["reward/baseline"] = state.baseline
    return new_state, metrics
