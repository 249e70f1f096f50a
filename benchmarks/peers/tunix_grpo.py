"""Seconds per optimizer step of Tunix's GRPOLearner (google-tunix 0.1.7) on the RL-step workload.

Runs in the ``tunix-0.1.7`` environment (see envs.py; jax/jaxlib 0.10.2, flax 0.12.8, no torch);
`benchmarks/rl_step.py` starts it and reads its one ``RESULT {json}`` line. The workload
(workload.py) is the trl peer's: the same tokenizer and 64 prompts of 16 tokens, 4 prompts x 8
completions = 32 completions per step, up to 48 new tokens, temperature 1 (no top-k / top-p),
reward = letters 'a' in the completion text, lr 1e-5, one update per rollout
(``num_iterations=1``, one mini-batch per step). Settings follow the anchor that measured Tunix
(``shared/anchors/bench_tunix.py``): ``optax.adamw(1e-5, weight_decay=0.01)``, the "vanilla"
rollout engine colocated with the trainer on a 1 x 1 ("fsdp", "tp") mesh, KV cache of
16 + 48 + 16 positions, GRPOConfig defaults otherwise (loss ``sequence-mean-token-mean``,
epsilon 0.2, KL as a loss term) with ``beta`` from ``--beta``.

The model: Tunix has no GPT-2 class, so its Qwen2 class at the closest shape to the tiny GPT-2
(4 layers, 4 heads x 64, embed 256, SwiGLU 688, vocab 512, tied embedding: 3,298,560 parameters
against GPT-2's 3,356,160). Every matrix is re-drawn from N(0, 0.02), as GPT-2 / transformers
initialise, norm scales and biases kept (1 and 0): Tunix's own init (an N(0, 1) embedding, which
the tied head turns into very peaked logits; Glorot attention, zero MLP weights) makes the 8
completions of a group come out identical, the rewards of a group have zero std and every GRPO
gradient is exactly 0. With
``beta > 0`` the reference is a second Qwen2 with the same weights.

Step time is the wall time between the ends of consecutive global steps (``_run_global_step``,
one optimizer step each; the first is timed from the start of ``train``), so it includes Tunix's
per-step bookkeeping as trl's step time does; ``global_step_s`` is the time inside
``_run_global_step`` alone (what the anchor reported). The median leaves out the first ``--skip``
steps. Breakdown, per step (the timed methods are wrapped on the instances):

- ``sampling_s``: ``rl_cluster.generate`` (prompt tokenisation, the vanilla sampler, decoding);
- ``logprobs_s``: ``rl_cluster.get_ref_per_token_logps`` (beta > 0 only; no old log-probs at
  ``num_iterations=1``), waited for: JAX returns before the forward has run, which would move its
  time into ``update_s`` (the update needs the result anyway, so waiting costs nothing);
- ``reward_s``: ``learner._compute_rewards`` (the Python reward function and Tunix's reward manager);
- ``scoring_s``: ``learner._generate_and_compute_advantage`` minus ``generate``: log-probs,
  rewards, advantages, padding and metric buffering;
- ``update_s``: ``rl_cluster.update_actor`` (loss forward and backward, AdamW; it waits for the
  step's device work before returning).

``--threads N`` pins the process to N of its allowed CPUs before JAX starts (XLA:CPU sizes its
thread pools from the schedulable CPUs); N at or above the CPU count leaves the process alone.

    python tunix_grpo.py --steps 16 --skip 2 [--beta 0.04] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from typing import TYPE_CHECKING

import workload

if TYPE_CHECKING:  # at run time JAX, flax and Tunix are imported in the functions, after `limit_cpus`
    import jax
    from flax import nnx
    from tunix.models.qwen2 import model as qwen2
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner as grpo_lib

KV_CACHE_SLACK = 16  # the anchor's kv_cache_size = prompt + new tokens + 16
INIT_STD = 0.02  # GPT-2's initializer_range
WEIGHT_DECAY = 0.01  # the anchor's optax.adamw(1e-5, weight_decay=0.01)
# Qwen2 shape closest to workload.TINY_GPT2 (SwiGLU 688 ~ GPT-2's 4d MLP in parameters)
TINY_QWEN2 = dict(num_layers=workload.TINY_GPT2["n_layer"], vocab_size=workload.VOCAB_SIZE,
                  embed_dim=workload.TINY_GPT2["n_embd"], hidden_dim=688, num_heads=workload.TINY_GPT2["n_head"],
                  head_dim=workload.TINY_GPT2["n_embd"] // workload.TINY_GPT2["n_head"],
                  num_kv_heads=workload.TINY_GPT2["n_head"], rope_theta=10000, norm_eps=1e-6,
                  use_tied_embedding=True)


# --------------------------------------------------------------------------------------------
# Process set-up (before JAX starts)
# --------------------------------------------------------------------------------------------

def limit_cpus(threads: int) -> int:
    """Pin this process to ``threads`` of its allowed CPUs (no-op if it has that many or fewer); return the count.

    Must run before JAX is imported: XLA:CPU sizes its intra-op thread pool from the CPUs the
    process may run on. A forced host-device count inherited from a driver is dropped too, so
    Tunix sees one CPU device, as the anchor ran it.
    """
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    allowed = sorted(os.sched_getaffinity(0))
    if 0 < threads < len(allowed):
        os.sched_setaffinity(0, allowed[:threads])
    return len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------------------------
# Model and learner
# --------------------------------------------------------------------------------------------

def nnx_params(model: nnx.Module) -> nnx.State:
    """The nnx.Param state of ``model``."""
    from flax import nnx

    return nnx.state(model, nnx.Param)


def gpt2_style_init(model: nnx.Module, std: float = INIT_STD, seed: int = 0) -> None:
    """Re-draw every parameter matrix (ndim >= 2) of ``model`` from N(0, std), in place.

    Vectors (RMSNorm scales, q/k/v biases) keep Tunix's init (ones, zeros). The same ``seed``
    gives the same weights, so a reference built the same way equals the initial policy.
    """
    import jax
    from flax import nnx

    leaves, treedef = jax.tree_util.tree_flatten(nnx_params(model))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    leaves = [std * jax.random.normal(k, x.shape, x.dtype) if x.ndim >= 2 else x for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, leaves))


def tiny_qwen2(mesh: jax.sharding.Mesh) -> qwen2.Qwen2:
    """The tiny Qwen2 (TINY_QWEN2) built under ``mesh`` and re-initialised GPT-2-style."""
    from flax import nnx
    from tunix.models.qwen2 import model as qwen2

    with mesh:
        model = qwen2.Qwen2(qwen2.ModelConfig(**TINY_QWEN2), rngs=nnx.Rngs(0))
    gpt2_style_init(model)
    return model


def build_learner(tok, beta: float,
                  steps: int) -> tuple[grpo_lib.GRPOLearner, rl_cluster_lib.RLCluster, int]:
    """(GRPOLearner, RLCluster, parameter count) for the workload on one CPU device."""
    import jax
    import optax
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner as grpo_lib
    from tunix.rl.rollout import base_rollout

    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    actor = tiny_qwen2(mesh)
    reference = tiny_qwen2(mesh) if beta > 0 else None
    Role = rl_cluster_lib.Role
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={Role.ACTOR: mesh, Role.REFERENCE: mesh, Role.ROLLOUT: mesh},
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optax.adamw(workload.LEARNING_RATE, weight_decay=WEIGHT_DECAY),
            eval_every_n_steps=10 ** 6,  # no evaluation
            max_steps=steps,
        ),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=workload.MAX_NEW_TOKENS, max_prompt_length=workload.PROMPT_TOKENS,
            kv_cache_size=workload.PROMPT_TOKENS + workload.MAX_NEW_TOKENS + KV_CACHE_SLACK,
            temperature=workload.TEMPERATURE, top_p=1.0, top_k=None,
        ),
    )
    cluster = rl_cluster_lib.RLCluster(actor=actor, reference=reference, tokenizer=tok, cluster_config=cluster_config)
    learner = grpo_lib.GRPOLearner(
        rl_cluster=cluster, reward_fns=workload.reward_count_a,
        algo_config=grpo_lib.GRPOConfig(num_generations=workload.GROUP_SIZE, num_iterations=1, beta=beta))
    nparams = sum(x.size for x in jax.tree_util.tree_leaves(nnx_params(actor)))
    return learner, cluster, nparams


def prompt_batches(prompts: list[str], steps: int) -> list[dict]:
    """``steps`` batches of PROMPTS_PER_STEP prompts each, walking the prompts in order and wrapping around.

    Each batch's prompts are a numpy array of strings, as a grain ``MapDataset.batch`` yields:
    Tunix repeats every leaf of a batch ``num_generations`` times with ``np.repeat``, which would
    split a plain list into its strings.
    """
    import numpy as np

    n = workload.PROMPTS_PER_STEP
    return [{"prompts": np.array([prompts[(s * n + i) % len(prompts)] for i in range(n)])} for s in range(steps)]


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

class StepClock:
    """Ends of the optimizer steps and the time spent in wrapped methods during each step.

    ``wrap(owner, name, label)`` replaces ``owner.name`` with a timed wrapper (an instance
    attribute, so Tunix's own ``self.name(...)`` calls go through it, from any thread); the time
    of a call is added to the step that is running when it starts (steps are sequential here:
    the colocated learner waits for each rollout before its update). ``block=True`` waits for
    the call's JAX results before stopping the clock.
    """

    def __init__(self):
        self.begin: float | None = None
        self.ends: list[float] = []
        self.totals: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))

    def wrap(self, owner, name: str, label: str, block: bool = False) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            step, start = len(self.ends), time.perf_counter()
            try:
                result = inner(*args, **kwargs)
                if block:
                    import jax

                    jax.block_until_ready(result)
                return result
            finally:
                self.totals[label][step] += time.perf_counter() - start

        setattr(owner, name, timed)

    def wrap_step(self, learner: grpo_lib.GRPOLearner) -> None:
        """Time ``learner._run_global_step`` (one optimizer step) and mark each step's end."""
        self.wrap(learner, "_run_global_step", "global_step")
        timed = learner._run_global_step

        def marked(*args, **kwargs):
            result = timed(*args, **kwargs)
            self.ends.append(time.perf_counter())
            return result

        learner._run_global_step = marked

    def step_times(self) -> list[float]:
        """Seconds between consecutive step ends (the first from ``begin``)."""
        marks = [self.begin, *self.ends]
        return [b - a for a, b in zip(marks, marks[1:])]

    def per_step(self, label: str) -> list[float]:
        """Seconds spent in ``label`` in each finished step (0.0 where never called)."""
        return [self.totals[label].get(i, 0.0) for i in range(len(self.ends))]


def environment_info(cpus: int) -> dict:
    """Versions, CPUs, backend and the allocator settings this process started with."""
    import importlib.metadata as md

    import jax

    versions = {name: md.version(dist) for name, dist in
                (("tunix", "google-tunix"), ("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"),
                 ("optax", "optax"), ("qwix", "qwix"), ("transformers", "transformers"))}
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    return {**versions, "backend": jax.default_backend(), "devices": len(jax.devices()), "threads": cpus,
            "malloc": malloc or "default", "load_avg_1m": round(os.getloadavg()[0], 2)}


def loss_history(cluster: rl_cluster_lib.RLCluster) -> list[float] | str:
    """The actor's logged training losses (a note if this Tunix's metrics API differs)."""
    try:
        history = cluster.actor_trainer.metrics_logger.get_metric_history("actor", "loss", "train")
        return [round(float(x), 5) for x in history]
    except Exception as e:  # noqa: BLE001 - diagnostic only
        return f"unavailable: {e!r}"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the medians")
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (Tunix's default is 0.04)")
    parser.add_argument("--threads", type=int, default=2, help="CPUs this process may use (see the docstring)")
    a = parser.parse_args()
    if a.steps <= a.skip:
        parser.error("--steps must exceed --skip")
    cpus = limit_cpus(a.threads)

    import jax
    import numpy as np

    tok, prompts = workload.build_workload()
    learner, cluster, nparams = build_learner(tok, a.beta, a.steps)
    clock = StepClock()
    clock.wrap_step(learner)
    clock.wrap(learner, "_generate_and_compute_advantage", "generate_and_score")
    clock.wrap(learner, "_compute_rewards", "reward")
    clock.wrap(cluster, "generate", "sampling")
    clock.wrap(cluster, "get_ref_per_token_logps", "logprobs", block=True)
    clock.wrap(cluster, "update_actor", "update")

    before = jax.tree.map(np.array, nnx_params(cluster.actor_trainer.model))
    clock.begin = time.perf_counter()
    learner.train(prompt_batches(prompts, a.steps))
    total = time.perf_counter() - clock.begin
    after = jax.tree.map(np.array, nnx_params(cluster.actor_trainer.model))
    change = max(float(np.abs(x - y).max()) for x, y in
                 zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)))

    step_s = clock.step_times()
    sampling, gen_score = clock.per_step("sampling"), clock.per_step("generate_and_score")
    per_step = {
        "sampling_s": sampling,
        "logprobs_s": clock.per_step("logprobs"),
        "reward_s": clock.per_step("reward"),
        "scoring_s": [g - s for g, s in zip(gen_score, sampling)],
        "update_s": clock.per_step("update"),
    }
    global_step = clock.per_step("global_step")
    result = {
        "peer": "Tunix GRPO",
        "trainer": type(learner).__name__,
        "model": "Qwen2 (tiny shape, GPT-2-style init)",
        "params": int(nparams),
        "init_std": INIT_STD,
        "completions_per_step": workload.COMPLETIONS_PER_STEP,
        "num_generations": learner.algo_config.num_generations,
        "num_iterations": learner.algo_config.num_iterations,
        "max_completion_length": workload.MAX_NEW_TOKENS,
        "prompt_tokens": workload.PROMPT_TOKENS,
        "beta": learner.algo_config.beta,
        "loss_agg_mode": learner.algo_config.loss_agg_mode,
        "steps": len(step_s),
        "skip": a.skip,
        "median_step_s": workload.median_after(step_s, a.skip),
        "step_s": workload.rounded(step_s),
        "global_step_s": workload.median_after(global_step, a.skip),
        "breakdown": {k: workload.median_after(v, a.skip) for k, v in per_step.items()},
        "breakdown_per_step": {k: workload.rounded(v) for k, v in per_step.items()},
        "train_total_s": total,
        "max_abs_param_change": change,
        "actor_loss_history": loss_history(cluster),
        "workload_digest": workload.workload_digest(tok, prompts),
        **environment_info(cpus),
    }
    workload.print_result(result)


if __name__ == "__main__":
    main()
