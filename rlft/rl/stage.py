"""The RL stage: prompts + a reward function -> a policy trained by PPO / GRPO / RLOO / REINFORCE.

One stage on the skeleton every stage shares (`rlft.train.stages.train_stage`), one step per prompt batch:

    rollout (jit: sample prompts_per_step × group_size completions with the current policy)
    -> scores (`rlft.rl.reward_step`: a reward model on the mesh from the token ids, or a text
       reward function on each process's decoded rows)
    -> pg_step (jit: experience, epochs × minibatches updates, KL controller)

Asynchronous RL (`rl.max_staleness` = K > 0, `rlft.rl.pending`): step t scores and trains on the
rollout of step t, sampled K steps earlier, while the rollout of step t + K is sampled.

Everything resumes exactly: the PGState (policy, critic, optimizers, KL coefficient, baseline,
RNG, step, the rollouts in flight) is checkpointed whole, the prompt order is a pure function of (seed, position), and
the sampling key of a step is derived from the state's RNG and step. SIGINT and SIGTERM save; so
does an error inside the stage (a reward function that raises or returns bad scores becomes an
RlftError naming it, the stage and the step, after the last completed step is saved).
Metrics go to WORKDIR/NAME/metrics.jsonl and TensorBoard under the names trl users know
(objective/kl, policy/clipfrac, val/explained_variance, ...); the sampler's wall-clock figures
(rollout/sampling_s, rollout/tokens_per_s, async/weight_sync_s, async/rollout_wait_s) go to
TensorBoard only, which keeps metrics.jsonl deterministic.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rlft.data.batching import pad_left
from rlft.errors import RlftError
from rlft.generate.engine import generate_continuous
from rlft.generate.sampling import Sequences
from rlft.models.heads import ScalarHead
from rlft.models.lora import LoraConfig, combine
from rlft.parallel.distributed import local_rows, local_to_host, put_global, to_host
from rlft.parallel.transfer import reshard
from rlft.parallel.sharding import (MeshJit, batch_shards, batch_sharding, replicated, shard_batch, sharded_init,
                                   state_shardings)
from rlft.data.loader import epoch_batches
from rlft.rl import dynamic_sampling, pending
from rlft.rl.pending import PendingOps
from rlft.rl.config import PGConfig, resolve_pg_config
from rlft.rl.pg_step import PGState, init_pg_state, pg_step
from rlft.rl.reward_model import ModelReward
from rlft.rl.reward_step import make_rollout_scorer
from rlft.rl.rewards import RewardFn
from rlft.rl.rollout import sample_rollout
from rlft.train.stages import StageProgram, train_stage
from rlft.train.steps import jit_step, make_optimizer, step_key, train_state_shardings, with_shardings
from rlft.train.warm_start import scalar_model_from_lm

SAMPLE_SALT = 1  # the sampling key of a step: step_key(state, salt=SAMPLE_SALT)


def _critic(config: PGConfig, graphdef: nnx.GraphDef, params: nnx.State, critic_init,
            mesh: Mesh, seed: int) -> tuple[nnx.GraphDef | None, nnx.State | None]:
    """(graphdef, params) of the critic: none, a ScalarHead on the policy trunk, or a ScalarModel
    whose backbone starts from `critic_init` (a reward model's (graphdef, params)) or the policy."""
    if config.critic == "none":
        return None, None
    model_config = nnx.merge(graphdef, params).config
    if config.critic == "shared":
        return sharded_init(lambda: ScalarHead(model_config.d_model, rngs=nnx.Rngs(seed)), mesh)
    if critic_init is not None:
        return critic_init
    return scalar_model_from_lm(model_config, params, mesh, seed=seed)


def prompt_batch(prompts: Sequence[dict], indices: np.ndarray, group: int, width: int,
                  pad_id: int) -> dict[str, np.ndarray]:
    """Rows prompt-major (each prompt repeated `group` times), left-padded to `width`."""
    rows = np.repeat(indices, group)
    tokens, mask, _ = pad_left([prompts[i]["ids"] for i in rows], width, pad_id)
    return {"prompt_tokens": tokens, "prompt_mask": mask, "index": rows.astype(np.int32)}


def rollout_shardings(mesh: Mesh) -> dict:
    """The shardings of pg_step's batch: Sequences fields [rows, columns] and scores [rows], rows
    over the mesh's batch axes (what `jit_step` needs to compile the step before any rollout)."""
    rows, columns = batch_sharding(mesh, 1), batch_sharding(mesh, 2)
    return {"sequences": Sequences(tokens=columns, positions=columns, segment_ids=columns,
                                   completion_mask=columns, logprobs=columns), "scores": rows}


def make_rl_step(*, config: PGConfig, graphdef: nnx.GraphDef, shardings: PGState,
                 prompts: Sequence[dict], reward_fn: RewardFn | ModelReward, tokenizer, mesh: Mesh,
                 pad_id: int, tx, critic_graphdef=None, critic_tx=None, reference: nnx.State | None = None,
                 frozen: nnx.State | None = None, timings: dict[str, list[float]] | None = None,
                 name: str = "rl", stage_dir: str | None = None,
                 resample: Callable[[int, int], dict] | None = None,
                 prompts_at: Callable[[int], dict] | None = None, pending_ops: PendingOps | None = None,
                 rollout_mesh: Mesh | None = None):
    """step(state, prompt_batch) -> (state, metrics): rollout (jit) -> scores -> pg_step (jit).

    Scores come from `rlft.rl.reward_step.make_rollout_scorer`: a ModelReward on the mesh, or a text
    reward function called on each process's rows through `rlft.rl.rewards.score_completions`: an
    exception it raises or a bad return value is an RlftError "NAME step N: reward function F ..."
    (its traceback appended to STAGE_DIR/errors.log) on every process; the state of step N-1 is
    intact then (nothing was donated yet), so `train` saves it before the error propagates.

    `shardings`: the PGState's. `frozen`: the base of a LoRA policy (the state holds its adapters;
    the reference is then the base with the adapters off). With `timings`, each phase's wall time is
    appended to timings["sampling_s" | "reward_s" | "update_s"] and its process CPU time to
    timings["sampling_cpu_s" | ...] (the device is synchronised
    between phases, which costs a little overlap; for benchmarks only). With
    `config.dynamic_sampling`, `resample(step, round)` gives the host batch of this process's rows
    of the extra round's prompts (`rlft.rl.dynamic_sampling`; required then). With
    `config.max_staleness` K > 0 the step is asynchronous (`rlft.rl.pending`): `prompts_at(position)`
    gives the host batch of any step's prompts (step s is position s − 1) and `pending_ops` the
    jitted moves of the rollouts in flight; the loop's own batch is not used. `rollout_mesh`:
    the sampler's own devices (`rlft.parallel.sharding.rollout_mesh`, disjoint from `mesh`): before
    each step's sampling the policy is copied there (timed as async/weight_sync_s) and the
    completions come back to `mesh`; None: the sampler runs on `mesh`.
    """
    if config.dynamic_sampling and resample is None:
        raise ValueError("make_rl_step: dynamic sampling needs `resample`")
    if config.max_staleness and (prompts_at is None or pending_ops is None):
        raise ValueError("make_rl_step: max_staleness > 0 needs `prompts_at` and `pending_ops`")
    sampler_mesh = mesh if rollout_mesh is None else rollout_mesh
    rollout = MeshJit(jax.jit(functools.partial(_rollout, graphdef, eos_id=config.eos_ids, pad_id=pad_id,
                                                max_new_tokens=config.max_new_tokens,
                                                sampling=config.sampling, mesh=sampler_mesh,
                                                group_size=config.group_size)), sampler_mesh)
    sampler_frozen = frozen if rollout_mesh is None or frozen is None else \
        reshard(frozen, state_shardings(frozen, rollout_mesh))
    weight_sync = []  # seconds of each copy of the policy to the sampler's devices

    def sampler_state(state: PGState) -> PGState:
        """The policy, RNG and step the sampler reads, on its own devices when it has them."""
        if rollout_mesh is None:
            return state
        start = time.perf_counter()
        light = state.replace(opt_state=None, critic_params=None, critic_opt_state=None, pending=None)
        one = replicated(rollout_mesh)
        target = light.replace(params=state_shardings(light.params, rollout_mesh), step=one, rng=one, kl_coef=one,
                               baseline=one)
        view = jax.block_until_ready(reshard(light, target))
        weight_sync.append(time.perf_counter() - start)
        return view

    shards = batch_shards(sampler_mesh)
    if config.rollout_slots % shards:
        raise RlftError(f"{name}.rollout_slots={config.rollout_slots} must be a multiple of the sampler's "
                        f"{shards} batch shards (each runs an engine of rollout_slots / {shards} slots)")
    sample_key = jax.jit(_rollout_key)

    engine_stats: dict = {}

    def continuous(view: PGState, tokens: jax.Array, mask: jax.Array, *args) -> Sequences:
        """The rollout through the continuous-batching engine: the static sampler's completions."""
        out = generate_continuous(graphdef, combine(sampler_frozen, view.params), tokens, mask,
                                  sample_key(view, *args), slots=config.rollout_slots,
                                  max_new_tokens=config.max_new_tokens, eos_id=config.eos_ids, pad_id=pad_id,
                                  sampling=config.sampling, mesh=sampler_mesh, stats=engine_stats)
        return jax.device_put(Sequences.from_sample(tokens, mask, out), rollout_shardings(sampler_mesh)["sequences"])

    def sample(view: PGState, tokens: jax.Array, mask: jax.Array, *args) -> Sequences:
        """The rollout of prompts [rows, width] (on `mesh`) by the sampler; Sequences on `mesh`."""
        if rollout_mesh is not None:
            tokens, mask = (reshard(x, batch_sharding(rollout_mesh, x.ndim)) for x in (tokens, mask))
        if config.rollout_slots:
            seqs = continuous(view, tokens, mask, *args)
        else:
            seqs = rollout(view, sampler_frozen, tokens, mask, *args)
        return seqs if rollout_mesh is None else reshard(seqs, rollout_shardings(mesh)["sequences"])

    def placement_metrics() -> dict:
        """The sampler's metrics: the weight copy to its own devices, the engine's slot occupancy."""
        out = {} if rollout_mesh is None else {"async/weight_sync_s": np.float32(weight_sync[-1])}
        if config.rollout_slots:
            out["rollout/slot_occupancy"] = engine_stats["slot_occupancy"]  # on device: no wait
        return out

    extra_args = (reference, frozen) if frozen is not None else () if reference is None else (reference,)
    pg = jit_step(pg_step, shardings, rollout_shardings(mesh), mesh,
                  tuple(jax.tree.map(lambda x: x.sharding, a) for a in extra_args),
                  graphdef=graphdef, critic_graphdef=critic_graphdef, tx=tx, critic_tx=critic_tx, config=config)
    score = make_rollout_scorer(reward_fn, tokenizer=tokenizer, prompts=prompts, mesh=mesh,
                                chunk_rows=config.experience_chunk, stage_dir=stage_dir)
    rows_of = MeshJit(jax.jit(lambda rounds, rows: jax.tree.map(lambda *xs: jnp.concatenate(xs)[rows], *rounds),
                              out_shardings=rollout_shardings(mesh)), mesh)

    def dynamic_batch(state: PGState, view: PGState, seqs: Sequences, scores: jax.Array, where) -> tuple[dict, dict]:
        """DAPO's batch: the rollout's informative groups, topped up from extra rounds."""
        group, prompts_per_step = config.group_size, scores.shape[0] // config.group_size
        rounds, host_scores = [{"sequences": seqs, "scores": scores}], [to_host(scores)]
        step_number = int(jax.device_get(state.step)) + 1
        while (len(rounds) <= config.max_resample_rounds
               and not dynamic_sampling.enough(host_scores, group, prompts_per_step)):
            host = resample(step_number, len(rounds))  # this process's rows
            extra = shard_batch(host, mesh)
            more = sample(view, extra["prompt_tokens"], extra["prompt_mask"], jnp.int32(len(rounds)))
            more_scores, _ = score(more, host["index"], where)
            rounds.append({"sequences": more, "scores": more_scores})
            host_scores.append(to_host(more_scores))
        chosen = dynamic_sampling.select_groups(host_scores, group, prompts_per_step)
        batch = rows_of(rounds, put_global(chosen.rows, replicated(mesh)))
        return batch, {"rollout/dropped_groups": np.float32(chosen.dropped),
                       "rollout/filled_groups": np.float32(chosen.filled),
                       "rollout/resample_rounds": np.float32(len(rounds) - 1)}

    def timed(name, start, cpu_start):
        """Append a phase's wall time to timings[name] and the process's CPU time over it (every
        thread: XLA's too) to timings[name with _cpu_s]: cpu / wall = cores the phase kept busy."""
        if timings is not None:
            timings.setdefault(name, []).append(time.perf_counter() - start)
            timings.setdefault(name.removesuffix("_s") + "_cpu_s", []).append(time.process_time() - cpu_start)

    def step(state: PGState, batch: dict) -> tuple[PGState, dict]:
        t0, c0 = time.perf_counter(), time.process_time()
        view = sampler_state(state)
        seqs = jax.block_until_ready(sample(view, batch["prompt_tokens"], batch["prompt_mask"]))  # scoring reads it
        sampling_s = time.perf_counter() - t0
        timed("sampling_s", t0, c0)
        t0, c0 = time.perf_counter(), time.process_time()
        where = lambda: f"{name} step {int(jax.device_get(state.step)) + 1}"  # read only on an error
        scores, reward_metrics = score(seqs, local_to_host(batch["index"], mesh), where)
        rollout_batch = {"sequences": seqs, "scores": scores}
        if config.dynamic_sampling:  # reward_metrics stay those of the prompts as drawn
            rollout_batch, dynamic_metrics = dynamic_batch(state, view, seqs, scores, where)
            reward_metrics = {**reward_metrics, **dynamic_metrics}
        if timings is not None:
            jax.block_until_ready(rollout_batch)
        timed("reward_s", t0, c0)
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = pg(state, rollout_batch, *extra_args)
        if timings is not None:
            jax.block_until_ready(metrics)
        timed("update_s", t0, c0)
        new_tokens = jnp.sum(seqs.completion_mask)  # of the rollout that sampling_s timed
        return state, {**metrics, **reward_metrics, **placement_metrics(), "rollout/sampling_s": np.float32(sampling_s),
                       "rollout/tokens_per_s": new_tokens / sampling_s}

    def sampled(state: PGState, step_number: int, version: int) -> dict:
        """The rollout of step `step_number` by the state's policy, whose version (updates applied)
        is `version` (dispatched, not waited for)."""
        batch = shard_batch(prompts_at(step_number - 1), mesh)
        seqs = sample(sampler_state(state), batch["prompt_tokens"], batch["prompt_mask"], None,
                      jnp.int32(step_number - 1))
        return {"sequences": seqs, "version": put_global(np.int32(version), replicated(mesh))}

    def async_step(state: PGState, batch: dict) -> tuple[PGState, dict]:
        """Score and train on the rollout of step t (sampled K steps ago) while step t + K's samples.

        Order: the rollout of step t + K is dispatched, the host scores step t's rollout while the
        device samples, then the update is dispatched. A reward that fails does so before anything
        is donated, so the last completed step stays intact (and is saved), as in the synchronous step.
        """
        del batch  # the prompts come from prompts_at(position)
        k = config.max_staleness
        t = int(jax.device_get(state.step)) + 1
        where = lambda: f"{name} step {t}"
        if t == 1:  # nothing in flight yet: the rollouts of steps 1 .. K + 1, all by the initial policy
            started = [sampled(state, s, 0) for s in range(1, k + 2)]
            current, in_flight = started[0], pending_ops.stack(*started[1:])
        else:
            current, in_flight = pending_ops.oldest(state.pending), None
            new = sampled(state, t + k, t - 1)  # the device samples while the host scores `current`
        index = prompts_at(t - 1)["index"]  # the prompts of this process's rows
        waited = time.perf_counter()
        jax.block_until_ready(current["sequences"])  # sampled a step ago: normally ready
        waited = time.perf_counter() - waited
        scores, reward_metrics = score(current["sequences"], index, where)
        version = int(jax.device_get(current["version"]))
        state, metrics = pg(state, {"sequences": current["sequences"], "scores": scores}, *extra_args)
        state = state.replace(pending=in_flight if in_flight is not None else pending_ops.push(state.pending, new))
        return state, {**metrics, **reward_metrics, **placement_metrics(),
                       "async/staleness": np.float32(t - 1 - version), "async/rollout_wait_s": np.float32(waited)}

    return async_step if config.max_staleness else step


def pg_state_program(config: PGConfig, graphdef: nnx.GraphDef, trainable: nnx.State, frozen: nnx.State | None,
                     critic_params, tx, critic_tx, seed: int, mesh: Mesh, *, rows: int, width: int,
                     pad_id: int) -> tuple[PGState, PGState, Callable[[], PGState], PendingOps | None]:
    """(abstract PGState, its shardings, initial() -> the step-0 state, PendingOps or None) of an RL
    run on `mesh`: with config.max_staleness K > 0 the state holds K rollouts of [rows, width +
    max_new_tokens] in flight (`rlft.rl.pending`), all zeros at step 0."""
    init = lambda p, c: init_pg_state(p, tx, c, critic_tx, config.kl_coef, seed)
    abstract = jax.eval_shape(init, trainable, critic_params)
    shardings = train_state_shardings(abstract, mesh)
    if not config.max_staleness:
        return abstract, shardings, lambda: jax.jit(init, out_shardings=shardings)(trainable, critic_params), None
    prompt = jax.ShapeDtypeStruct((rows, width), jnp.int32)
    sequences = jax.eval_shape(functools.partial(
        _rollout, graphdef, eos_id=config.eos_ids, pad_id=pad_id, max_new_tokens=config.max_new_tokens,
        sampling=config.sampling, mesh=None, group_size=config.group_size), abstract, frozen, prompt, prompt)
    rollout = pending.rollout_abstract(sequences)
    ops = PendingOps(rollout, config.max_staleness, mesh)
    start = jax.jit(init, out_shardings=shardings)
    return (abstract.replace(pending=pending.pending_abstract(rollout, config.max_staleness)),
            shardings.replace(pending=ops.shardings),
            lambda: start(trainable, critic_params).replace(pending=ops.empty()), ops)


def run_rl_stage(*, name: str, workdir: str, graphdef: nnx.GraphDef, params: nnx.State,
                 prompts: Sequence[dict], reward_fn: RewardFn | ModelReward, cfg: ml_collections.ConfigDict,
                 mesh: Mesh, seed: int, eos_id: int | Sequence[int], pad_id: int, tokenizer,
                 reference_params: nnx.State | None = None,
                 critic_init: tuple[nnx.GraphDef, nnx.State] | None = None,
                 base: str | None = None, rollout_mesh: Mesh | None = None) -> nnx.State:
    """Train the policy `params` with RL on `prompts` for cfg.steps steps; returns its final params.

    prompts: records {"ids": prompt token ids, "text": ..., any fields the reward reads};
    reward_fn: a text reward function (completions, records) -> float32 [n] (`rlft.rl.rewards`) or a
    `rlft.rl.reward_model.ModelReward` (scored on the mesh; pass its (graphdef, params) as
    critic_init to start the critic from it without a second copy); cfg: an `rl_stage_config`
    section (validated before any work); reference_params: the frozen KL reference (default: the
    starting policy); critic_init: (graphdef, params) of a ScalarModel to start a separate critic
    from (e.g. the reward model; default: the policy with a zero value head). The stage runs on
    `rlft.train.stages.train_stage` (checkpoints and metrics in WORKDIR/NAME, recorded in
    stages.json as a language model, resume, LoRA). LoRA (`cfg.lora.rank` > 0): only adapters are
    trained and checkpointed, the reference is the starting policy with the adapters off, the
    returned params have them merged, and `base` (where `params` come from) is recorded for
    `rlft.load`.
    """
    config = resolve_pg_config(cfg, eos_id, prefix=name)
    if not prompts:
        raise RlftError(f"{name}: no prompts")
    if cfg.prompts_per_step > len(prompts):
        raise RlftError(f"{name}.prompts_per_step={cfg.prompts_per_step}: more than the "
                        f"{len(prompts)} prompts available")
    width = max(len(p["ids"]) for p in prompts)
    if min(len(p["ids"]) for p in prompts) < 1:
        raise RlftError(f"{name}: every prompt needs at least one token")
    if (LoraConfig.from_section(cfg.get("lora")) is not None and reference_params is not None
            and reference_params is not params):
        raise RlftError(f"{name}: with LoRA the KL reference is the starting policy (adapters off); "
                        f"another reference_params is not supported")
    updates = cfg.steps * config.epochs * config.minibatches  # optimizer updates over the stage
    make_tx = lambda lr: make_optimizer(lr, cfg.warmup_steps, updates, cfg.weight_decay, cfg.clip_norm)
    tx = make_tx(cfg.learning_rate)
    critic_graphdef, critic_params = _critic(config, graphdef, params, critic_init, mesh, seed)
    critic_tx = None if critic_params is None else make_tx(cfg.critic_learning_rate or cfg.learning_rate)
    reference = (params if reference_params is None else reference_params) if config.uses_reference else None

    def build(graphdef: nnx.GraphDef, trainable: nnx.State, frozen: nnx.State | None) -> StageProgram:
        abstract, shardings, initial, ops = pg_state_program(
            config, graphdef, trainable, frozen, critic_params, tx, critic_tx, seed, mesh,
            rows=cfg.prompts_per_step * config.group_size, width=width, pad_id=pad_id)
        make_step = lambda template: make_rl_step(
            config=config, graphdef=graphdef, shardings=shardings, prompts=prompts, reward_fn=reward_fn,
            tokenizer=tokenizer, mesh=mesh, pad_id=pad_id, tx=tx, critic_graphdef=critic_graphdef,
            critic_tx=critic_tx, reference=None if frozen is not None else reference, frozen=frozen, name=name,
            stage_dir=os.path.join(workdir, name), resample=resample, prompts_at=prompts_at, pending_ops=ops,
            rollout_mesh=rollout_mesh)
        return StageProgram(with_shardings(abstract, shardings), initial, make_step)

    rows = local_rows(mesh, cfg.prompts_per_step * config.group_size)  # this process's part of a batch
    host_batch = lambda indices: jax.tree.map(lambda x: x[rows], prompt_batch(prompts, indices, config.group_size,
                                                                               width, pad_id))
    resample = lambda step, round_: host_batch(dynamic_sampling.resample_indices(
        len(prompts), cfg.prompts_per_step, seed, step, round_))
    prompts_at = lambda position: host_batch(next(epoch_batches(len(prompts), cfg.prompts_per_step, seed,
                                                                start_index=position))[1])
    return train_stage(name=name, workdir=workdir, kind="lm", graphdef=graphdef, params=params, cfg=cfg, mesh=mesh,
                       seed=seed, base=base, num_examples=len(prompts), batch_size=cfg.prompts_per_step,
                       host_batch=host_batch, build=build, metric_prefix=None)


def _rollout_key(state: PGState, resample_round=None, sample_step=None) -> jax.Array:
    """The sampling key of a rollout: `step_key(state, salt=SAMPLE_SALT)`, of step `sample_step`
    (int32 []) instead of the state's when given (asynchronous RL samples ahead), folded with
    `resample_round` (int32 []) for the extra rounds of dynamic sampling."""
    key = step_key(state if sample_step is None else state.replace(step=sample_step), salt=SAMPLE_SALT)
    return key if resample_round is None else jax.random.fold_in(key, resample_round)


def _rollout(graphdef, state: PGState, frozen, prompt_tokens, prompt_mask, resample_round=None, sample_step=None,
             *, eos_id, pad_id, max_new_tokens, sampling, mesh, group_size):
    """sample_rollout of the state's policy (joined with a LoRA base `frozen`, if any) with the key
    `_rollout_key(state, resample_round, sample_step)`."""
    key = _rollout_key(state, resample_round, sample_step)
    return sample_rollout(graphdef, combine(frozen, state.params), prompt_tokens, prompt_mask, key, eos_id=eos_id,
                          pad_id=pad_id, max_new_tokens=max_new_tokens, sampling=sampling, mesh=mesh,
                          group_size=group_size)
