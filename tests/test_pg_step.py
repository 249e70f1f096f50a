"""The policy-gradient step: first-update identities, device/accumulation invariance, learning, bad config."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlft.errors import RlftError
from rlft.models import Decoder, ModelConfig, ScalarModel
from rlft.rl.pg_step import init_pg_state, pg_step, pg_updates
from rlft.rl.config import resolve_pg_config, rl_stage_config
from rlft.rl.rollout import make_experience, sample_rollout
from rlft.parallel.sharding import make_mesh, shard_batch, state_shardings
from rlft.train.steps import batch_shardings, jit_step, make_optimizer, train_state_shardings
from tests.pairs_util import random_params

CFG = ModelConfig.gpt2(vocab_size=16, d_model=32, n_layers=1, n_heads=2, max_positions=32)
EOS, PAD, TARGET = 1, 0, 5
PROMPTS, GROUP, NEW = 4, 4, 6


def config(algorithm: str, **overrides):
    section = rl_stage_config(steps=30, prompts_per_step=PROMPTS, group_size=GROUP, learning_rate=3e-3,
                              max_new_tokens=NEW, algorithm=algorithm, **overrides)
    return resolve_pg_config(section, eos_id=EOS)


def models(pc, seed=0):
    graphdef, params = random_params(lambda: Decoder(CFG, rngs=nnx.Rngs(0)), seed)
    params = jax.tree.map(jnp.asarray, params)
    critic_graphdef = critic_params = None
    if pc.critic == "separate":
        critic_graphdef, critic_params = random_params(lambda: ScalarModel(CFG, rngs=nnx.Rngs(0)), seed + 1)
        critic_params = jax.tree.map(jnp.asarray, critic_params)
    return graphdef, params, critic_graphdef, critic_params


def prompts(seed=0):
    tokens = np.random.default_rng(seed).integers(2, CFG.vocab_size, (PROMPTS * GROUP, 3)).astype(np.int32)
    return jnp.asarray(tokens), jnp.ones_like(jnp.asarray(tokens))


def scores_of(seqs):
    """The toy task's reward: the fraction of completion slots holding TARGET."""
    return jnp.sum((seqs.tokens[:, -NEW:] == TARGET) * seqs.completion_mask, -1) / NEW


_sample_rollout = jax.jit(functools.partial(sample_rollout, eos_id=EOS, pad_id=PAD, max_new_tokens=NEW),
                          static_argnames=("graphdef", "sampling"))


def rollout(pc, graphdef, params, key, seed=0):
    """The toy task's rollout (jitted: eager sampling costs seconds per test)."""
    tokens, mask = prompts(seed)
    return _sample_rollout(graphdef=graphdef, params=params, prompt_tokens=tokens, prompt_mask=mask, key=key,
                           sampling=pc.sampling)


def test_first_minibatch_of_first_epoch_has_ratio_one():
    """With recomputed old logprobs (2 epochs × 2 minibatches) the first update sees the old policy."""
    pc = config("ppo", minibatches=2, epochs=2)
    assert pc.recompute_old_logprobs
    graphdef, params, cg, cp = models(pc)
    tx = make_optimizer(1e-2, 0, 100)
    state = init_pg_state(params, tx, cp, tx, pc.kl_coef, 0)
    seqs = rollout(pc, graphdef, params, jax.random.key(1))
    experience, _ = jax.jit(functools.partial(make_experience, pc, graphdef, critic_graphdef=cg))(
        params, seqs, scores_of(seqs), params, state.kl_coef, state.baseline, critic_params=cp)
    updates = functools.partial(pg_updates, graphdef=graphdef, critic_graphdef=cg, tx=tx, critic_tx=tx, config=pc)
    _, stacked = jax.jit(updates)(state, experience, jax.random.key(2))
    tokens = np.asarray(stacked["tokens"])
    assert tokens[0] > 0
    np.testing.assert_allclose(np.asarray(stacked["ratio"])[0] / tokens[0], 1.0, atol=1e-5)
    assert np.asarray(stacked["approx_kl"])[0] / tokens[0] < 1e-9
    assert np.asarray(stacked["clipped"])[0] == 0
    # the policy moved afterwards: later minibatches are off-policy (the identity above is not vacuous)
    assert abs(np.asarray(stacked["ratio"])[-1] / tokens[-1] - 1.0) > 1e-4
    # the sampler's logprobs equal the trainer's (same distribution, same tokens)
    np.testing.assert_allclose(np.asarray(experience.old_logprobs), np.asarray(experience.sampler_logprobs),
                               atol=2e-5)


def test_sampler_old_logprobs_skip_the_recompute_and_agree_with_it():
    """old_logprobs="sampler" uses the sampler's logprobs: the same numbers a recompute gives."""
    recompute, sampler = config("ppo"), config("ppo", old_logprobs="sampler")
    assert recompute.recompute_old_logprobs and not sampler.recompute_old_logprobs
    graphdef, params, cg, cp = models(recompute)
    seqs = rollout(recompute, graphdef, params, jax.random.key(1))
    exps = [make_experience(pc, graphdef, params, seqs, scores_of(seqs), params, jnp.float32(0.05),
                            jnp.float32(0.0), cg, cp)[0] for pc in (recompute, sampler)]
    np.testing.assert_array_equal(np.asarray(exps[1].old_logprobs), np.asarray(seqs.logprobs))
    np.testing.assert_allclose(np.asarray(exps[0].old_logprobs), np.asarray(exps[1].old_logprobs), atol=2e-5)


@pytest.mark.parametrize("algorithm,aggregation", [("ppo", "token-mean"), ("grpo", "seq-mean-token-mean"),
                                                   ("rloo", "fixed-length")])
def test_step_is_independent_of_devices_and_accumulation(algorithm, aggregation):
    """8 devices with 2 accumulation micro-batches == 1 device, one batch (params after a step).

    Plain SGD, so the params compare the summed gradients themselves (Adam's normalisation would
    turn float noise in near-zero gradients into full-size steps).
    """
    results = []
    for devices, accum in ((1, 1), (8, 2)):
        pc = config(algorithm, loss_aggregation=aggregation, accum_steps=accum, minibatches=2)
        graphdef, params, cg, cp = models(pc)
        mesh = make_mesh((devices, 1, 1), jax.devices()[:devices])
        params = jax.device_put(params, state_shardings(params, mesh))
        if cp is not None:
            cp = jax.device_put(cp, state_shardings(cp, mesh))
        tx = optax.sgd(0.5)
        state = init_pg_state(params, tx, cp, tx, pc.kl_coef, 0)
        shardings = train_state_shardings(jax.eval_shape(lambda s: s, state), mesh)
        state = jax.jit(lambda s: s, out_shardings=shardings)(state)  # fresh buffers: the step donates them
        seqs = rollout(pc, graphdef, params, jax.random.key(1))
        batch = shard_batch(jax.device_get({"sequences": seqs, "scores": scores_of(seqs)}), mesh)
        ref_shardings = state_shardings(params, mesh)
        step = jit_step(pg_step, shardings, batch_shardings(batch, mesh), mesh, (ref_shardings,),
                        graphdef=graphdef, critic_graphdef=cg, tx=tx, critic_tx=tx, config=pc)
        state, metrics = step(state, batch, params)
        results.append((jax.device_get(state), jax.device_get(metrics)))
    (a, ma), (b, mb) = results
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, atol=2e-6)
    if a.critic_params is not None:
        for x, y in zip(jax.tree.leaves(a.critic_params), jax.tree.leaves(b.critic_params)):
            np.testing.assert_allclose(x, y, atol=2e-6)
    for name in ("loss/total", "objective/kl", "policy/clipfrac", "grad_norm"):
        np.testing.assert_allclose(ma[name], mb[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("algorithm,overrides", [
    ("ppo", {}), ("grpo", {}), ("rloo", {}), ("reinforce", {}), ("gspo", {}),
    ("cispo", dict(minibatches=2, tis="token")),
], ids=lambda x: x if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items()) or "defaults")
def test_mean_reward_rises_on_a_toy_task(algorithm, overrides):
    """Reward = emitting TARGET: the mean score of the last steps beats the first steps' clearly,
    for each family of estimator and loss (DAPO and Dr. GRPO are GRPO's with other aggregation and
    scaling flags: docs/ablations.md trains them on arithmetic), and CISPO off-policy
    (minibatches=2) with truncated importance sampling."""
    pc = config(algorithm, **overrides)
    graphdef, params, cg, cp = models(pc)
    steps = 30
    tx = make_optimizer(3e-3, 0, steps * pc.epochs)
    state = init_pg_state(params, tx, cp, tx, pc.kl_coef, 0)
    sample = jax.jit(functools.partial(rollout, pc, graphdef))
    step = jax.jit(functools.partial(pg_step, graphdef=graphdef, critic_graphdef=cg, tx=tx, critic_tx=tx,
                                     config=pc))
    scores = []
    for i in range(steps):
        seqs = sample(state.params, jax.random.key(i))
        state, metrics = step(state, {"sequences": seqs, "scores": scores_of(seqs)}, params)
        scores.append(float(metrics["objective/scores"]))
        assert np.isfinite(float(metrics["loss/total"]))
    first, last = np.mean(scores[:5]), np.mean(scores[-5:])
    assert last > first + 0.1 and last > 2 * first, (algorithm, scores)


@pytest.mark.parametrize("override,field", [
    (dict(advantage="gea"), "rl.advantage"),
    (dict(algorithm="ppg"), "rl.algorithm"),
    (dict(group_size=1), "rl.group_size"),
    (dict(clip_eps_low=-0.1), "rl.clip_eps_low"),
    (dict(minibatches=3), "rl.minibatches"),
    (dict(kl=dict(estimator="k4")), "rl.kl.estimator"),
    (dict(kl=dict(controller="adaptive", target=0.0)), "rl.kl.target"),
    (dict(loss_aggregation="mean"), "rl.loss_aggregation"),
    (dict(temperature=0.0), "rl.temperature"),
    (dict(steps=0), "rl.steps"),
    (dict(gamma=1.5), "rl.gamma"),
    (dict(advantage="gae", critic="none"), "rl.critic"),
    (dict(advantage="grpo", critic="separate"), "rl.critic"),
    (dict(old_logprobs="cached"), "rl.old_logprobs"),
    (dict(experience_chunk=3), "rl.experience_chunk"),
    (dict(experience_chunk=-1), "rl.experience_chunk"),
    (dict(vocab_chunk=-8), "rl.vocab_chunk"),
    (dict(vocab_chunk=64, top_k=5), "rl.vocab_chunk"),
    (dict(vocab_chunk=64, top_p=0.9), "rl.vocab_chunk"),
    (dict(policy_loss="ppo2"), "rl.policy_loss"),
    (dict(ratio_level="group"), "rl.ratio_level"),
    (dict(tis="yes"), "rl.tis"),
    (dict(tis_cap=0.5), "rl.tis_cap"),
])
def test_bad_configuration_names_the_field(override, field):
    kl = override.pop("kl", {})
    section = rl_stage_config(steps=10, prompts_per_step=4, group_size=4, learning_rate=1e-3,
                              max_new_tokens=8, algorithm="grpo")
    section.update(override)
    section.kl.update(kl)
    with pytest.raises(RlftError, match=field.replace(".", r"\.")):
        resolve_pg_config(section, eos_id=EOS)


def test_algorithm_defaults_and_overrides():
    assert config("ppo").advantage == "gae" and config("ppo").critic == "separate"
    assert config("grpo").kl_placement == "loss" and config("grpo").kl_estimator == "k3"
    assert config("rloo").advantage == "rloo" and config("reinforce").clip is False
    overridden = config("grpo", advantage="rloo", kl=dict(coef=0.0))  # a component flag wins
    assert overridden.advantage == "rloo" and overridden.kl_coef == 0.0 and not overridden.uses_reference
    gspo, cispo, dr = config("gspo"), config("cispo"), config("dr_grpo")
    assert gspo.ratio_level == "sequence" and (gspo.clip_eps_low, gspo.clip_eps_high) == (3e-4, 4e-4)
    assert cispo.policy_loss == "cispo" and config("dapo").clip_eps_high == 0.28
    assert dr.loss_aggregation == "fixed-length" and not dr.grpo_scale_by_std
    assert config("grpo").grpo_scale_by_std and config("grpo").policy_loss == "clipped"
    assert config("gspo", clip_eps_high=0.1).clip_eps_high == 0.1


def test_shared_critic_is_a_value_head_on_the_policy_trunk():
    """critic="shared": values come from a ScalarHead on the policy's hidden states; one step
    trains the head and, through vf_coef · value loss, the trunk too."""
    from rlft.models.heads import ScalarHead

    pc = config("ppo", critic="shared", epochs=1)
    graphdef, params, _, _ = models(pc)
    # a non-zero head: through a zero one the value loss has no gradient into the trunk
    head_graphdef, head = nnx.split(ScalarHead(CFG.d_model, rngs=nnx.Rngs(0), init_std=0.1))
    tx = optax.sgd(0.5)
    state = init_pg_state(params, tx, head, tx, pc.kl_coef, 0)
    seqs = rollout(pc, graphdef, params, jax.random.key(1))
    scores = scores_of(seqs) + 1.0  # a value target far from the zero-initialised head
    step = functools.partial(pg_step, graphdef=graphdef, critic_graphdef=head_graphdef, tx=tx, critic_tx=tx,
                             config=pc)
    new, metrics = jax.jit(step)(state, {"sequences": seqs, "scores": scores}, params)
    assert float(metrics["loss/value"]) > 0 and np.isfinite(float(metrics["val/explained_variance"]))
    assert not np.allclose(np.asarray(new.critic_params["kernel"][...]), np.asarray(head["kernel"][...]))
    # the trunk's gradient includes the value loss: with vf_coef = 0 the policy update differs
    no_value, _ = jax.jit(functools.partial(step, config=dataclasses.replace(pc, vf_coef=0.0)))(
        state, {"sequences": seqs, "scores": scores}, params)
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(no_value.params))]
    assert any(moved)


def test_several_eos_ids_end_a_completion():
    """resolve_pg_config keeps every EOS id (sorted, unique); a completion that ends with any of them
    is not penalised as unfinished."""
    section = rl_stage_config(steps=1, prompts_per_step=1, group_size=2, learning_rate=1e-3, max_new_tokens=3,
                              algorithm="grpo")
    assert resolve_pg_config(section, eos_id=[7, 3, 7]).eos_ids == (3, 7)
    assert resolve_pg_config(section, eos_id=3).eos_ids == (3,)
    from rlft.rl.rollout import ended_with_eos

    tokens = jnp.array([[4, 7, 0], [4, 3, 0], [4, 4, 4], [7, 4, 4]])
    mask = jnp.array([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(ended_with_eos(tokens, mask, (3, 7)), [True, True, False, True])
    np.testing.assert_array_equal(ended_with_eos(tokens, mask, 3), [False, True, False, False])


def test_mask_truncated_leaves_cut_completions_out_of_the_loss():
    """rl.mask_truncated: the loss and its gradient do not depend on the advantages of rows that
    reached max_new_tokens without EOS (and do without the flag)."""
    from rlft.rl.pg_step import pg_loss
    from rlft.rl.rollout import ended_with_eos

    graphdef, params, _, _ = models(config("grpo"))
    seqs = rollout(config("grpo"), graphdef, params, jax.random.key(3))
    experience, _ = make_experience(config("grpo"), graphdef, params, seqs, scores_of(seqs), None,
                                    jnp.float32(0.0), jnp.float32(0.0))
    ended = np.asarray(ended_with_eos(seqs.tokens[:, -NEW:], seqs.completion_mask, EOS))
    assert ended.any() and not ended.all()
    cut = jnp.asarray(~ended)[:, None]

    def loss_and_grad(pc, advantage):
        mb = experience.replace(advantages=jnp.where(cut, advantage, experience.advantages))
        fn = lambda p: pg_loss((p, None), mb, graphdef=graphdef, critic_graphdef=None, config=pc,
                               kl_coef=jnp.float32(0.0))[0]
        return jax.value_and_grad(fn)(params)

    for masked, same in ((True, True), (False, False)):
        pc = config("grpo", mask_truncated=masked, kl=dict(coef=0.0))
        (a, ga), (b, gb) = loss_and_grad(pc, 5.0), loss_and_grad(pc, -5.0)
        gap = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)))
        assert (abs(float(a - b)) < 1e-6 and gap < 1e-6) == same, (masked, float(a - b), gap)


USER = "tests.fixtures.user_algorithms"


def first_step(pc):
    graphdef, params, cg, cp = models(pc)
    tx = make_optimizer(3e-3, 0, 2)
    state = init_pg_state(params, tx, cp, tx, pc.kl_coef, 0)
    seqs = rollout(pc, graphdef, params, jax.random.key(0))
    step = jax.jit(functools.partial(pg_step, graphdef=graphdef, critic_graphdef=cg, tx=tx, critic_tx=tx, config=pc))
    return step(state, {"sequences": seqs, "scores": scores_of(seqs)}, params)[1], seqs


def test_user_entries_from_flags_dispatch_like_builtins():
    """A user's advantage estimator, policy loss, KL estimator and aggregation named as module:function
    are the ones the step calls: each effect shows in the metrics."""
    from tests.fixtures import user_algorithms

    user_algorithms.CALLS.clear()
    pc = config("grpo", advantage=f"{USER}:optimistic_advantage", policy_loss=f"{USER}:plain_pg_loss",
                kl=dict(coef=0.1, estimator=f"{USER}:half_k1"))
    metrics, _ = first_step(pc)
    assert set(user_algorithms.CALLS) == {"advantage", "policy_loss", "kl"}
    # ratio 1 on the first update: the loss is −mean over sequences of A, and every group's mean is 1
    np.testing.assert_allclose(metrics["loss/policy"], -1.0, rtol=1e-5)
    assert float(metrics["policy/clipfrac"]) == 1.0
    # the KL term is the user's: at the first update logp == ref, so half_k1 adds exactly 0 (k3 too);
    # with the user's aggregation, the loss is a sum over all tokens instead of a mean
    summed = config("grpo", advantage=f"{USER}:optimistic_advantage", policy_loss=f"{USER}:plain_pg_loss",
                    loss_aggregation=f"{USER}:sum_over_tokens")
    metrics_sum, seqs = first_step(summed)
    assert user_algorithms.CALLS["aggregation"] > 0
    scores = np.asarray(scores_of(seqs)).reshape(PROMPTS, GROUP)
    advantages = (scores - scores.mean(-1, keepdims=True) + 1.0).reshape(-1)
    lengths = np.asarray(seqs.completion_mask).sum(-1)
    np.testing.assert_allclose(metrics_sum["loss/policy"], -np.sum(advantages * lengths), rtol=1e-4)


@pytest.mark.parametrize("overrides,field,message", [
    (dict(advantage=f"{USER}:flat_advantage"), "rl.advantage", "returned shape (4,), expected shape (4, 4)"),
    (dict(policy_loss=f"{USER}:loss_without_options"), "rl.policy_loss", "calling it as a policy loss failed"),
    (dict(advantage=f"{USER}:no_such_function"), "rl.advantage", "cannot import it"),
    (dict(loss_aggregation="no_such_module:f"), "rl.loss_aggregation", "cannot import it"),
])
def test_a_user_entry_that_breaks_the_contract_is_a_clear_error(overrides, field, message):
    with pytest.raises(RlftError, match=re.escape(message)) as e:
        first_step(config("grpo", **overrides))
    assert str(e.value).startswith(f"{field}=")
    assert "cannot import" in message or "the contract is fn(" in str(e.value)
