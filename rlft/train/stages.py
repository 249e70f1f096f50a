"""Experiment stages: the one skeleton every stage runs on (`train_stage`), a resumable stage for any
TrainState step (`run_stage`), and its SFT / reward / DPO wrappers (the RL stage: `rlft.rl.stage`).

A stage owns a sub-directory of the run (checkpoints/, metrics.jsonl, tensorboard/); running it
again resumes from its latest checkpoint, and a finished stage just returns its final params.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rlft.train.checkpoints import Checkpointer
from rlft.data.batching import Example, TokenBatch, pad_right
from rlft.data.loader import epoch_batches
from rlft.parallel.distributed import barrier, is_primary, local_rows
from rlft.errors import RlftError
from rlft.files import read_json, write_json
from rlft.data.preferences import EncodedPair, pad_pairs
from rlft.train.logging import MetricsLogger
from rlft.models.lora import LoraConfig, attach_adapters, lora_section, merged_state, write_lora_record
from rlft.objectives.dpo import check_dpo_args
from rlft.train.steps import (TrainState, abstract_train_state, batch_shardings, jit_step, dpo_step,
                        init_sharded_train_state, make_optimizer, reward_step, sft_step)
from rlft.train.loop import DATA_POSITION, restore_or_init, train


def sft_stage_config(steps: int, batch_size: int, learning_rate: float, **overrides) -> ml_collections.ConfigDict:
    """The config section every SFT-like stage reads (see `run_sft_stage`)."""
    section = dict(steps=steps, batch_size=batch_size, accum_steps=1, learning_rate=learning_rate,
                   warmup_steps=max(steps // 20, 1), weight_decay=0.01, clip_norm=1.0,
                   max_length=64, full_sequence_loss=False, save_every=max(steps // 4, 1), keep=2,
                   max_nonfinite_steps=3, lora=lora_section())
    section.update(overrides)
    return ml_collections.ConfigDict(section)


STAGES_FILE = "stages.json"


def read_stages(workdir: str) -> list[dict]:
    """WORKDIR/stages.json: [{"name": stage, "kind": "lm" | "scalar"}, ...] in run order ([] if absent).

    A damaged file is an RlftError naming it.
    """
    path = os.path.join(workdir, STAGES_FILE)
    if not os.path.isfile(path):
        return []
    stages = read_json(path, list)
    for entry in stages:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and entry.get("kind") in ("lm", "scalar")):
            raise RlftError(f"{path}: malformed entry {entry!r} (expected {{\"name\": STAGE, "
                            f"\"kind\": \"lm\" or \"scalar\"}}); the file is damaged")
    return stages


def record_stage(workdir: str, name: str, kind: str = "lm") -> None:
    """Append a stage to WORKDIR/stages.json; `rlft.load(WORKDIR)` loads the last stage's model.

    Process 0 writes it (atomically: a kill never leaves half a file), the others wait.
    """
    path = os.path.join(workdir, STAGES_FILE)
    if not is_primary():
        return barrier(f"record_stage {name}")
    stages = read_stages(workdir)
    stages = [s for s in stages if s["name"] != name] + [{"name": name, "kind": kind}]
    write_json(path, stages)
    barrier(f"record_stage {name}")


def reward_stage_config(steps: int, batch_size: int, learning_rate: float,
                        **overrides) -> ml_collections.ConfigDict:
    """The config section of `run_reward_stage`: an SFT-like section plus margin and center_weight.

    batch_size counts pairs; margin is subtracted from r_c - r_r in the Bradley–Terry loss;
    center_weight scales mean((r_c + r_r)^2).
    """
    cfg = sft_stage_config(steps, batch_size, learning_rate, margin=0.0, center_weight=0.0)
    del cfg.full_sequence_loss
    cfg.update(overrides)
    return cfg


def dpo_stage_config(steps: int, batch_size: int, learning_rate: float,
                     **overrides) -> ml_collections.ConfigDict:
    """The config section of `run_dpo_stage`: an SFT-like section plus beta, label_smoothing, loss_type."""
    cfg = sft_stage_config(steps, batch_size, learning_rate, beta=0.1, label_smoothing=0.0,
                           loss_type="sigmoid")
    del cfg.full_sequence_loss
    cfg.update(overrides)
    return cfg


def step_hyperparameters(step_fn: Callable, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The keyword-only hyper-parameters of `step_fn` that `cfg` sets (e.g. dpo_step's beta).

    So a stage section reaches its step without copying fields by hand; graphdef, tx and
    accum_steps are the stage's to pass.
    """
    names = [p.name for p in inspect.signature(step_fn).parameters.values()
             if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("graphdef", "tx", "accum_steps")]
    return {name: cfg[name] for name in names if name in cfg}


@dataclasses.dataclass(frozen=True)
class StageProgram:
    """What a stage trains, for `train_stage`: its state's abstract value (shapes and shardings, to
    restore onto), a function making the initial state, and one making the step function for
    batches like a template batch (jitted once, with the batch's shardings)."""

    abstract: Any
    init: Callable[[], Any]
    make_step: Callable[[Any], Callable[[Any, Any], tuple[Any, dict]]]


def train_stage(*, name: str, workdir: str, kind: str, graphdef: nnx.GraphDef, params: nnx.State,
                cfg: ml_collections.ConfigDict, mesh: Mesh, seed: int, base: str | None,
                num_examples: int, batch_size: int, host_batch: Callable[[np.ndarray], Any],
                build: Callable[[nnx.GraphDef, nnx.State, nnx.State | None], StageProgram],
                metric_prefix: str | None = "train") -> nnx.State:
    """The one skeleton of every stage (SFT, reward, DPO, RL); returns the trained params.

    Records the stage in stages.json (`kind`), attaches LoRA adapters when cfg.lora asks
    (`lora_setup`), builds the program with `build(graphdef, trainable params, frozen base or
    None)`, restores the newest checkpoint of WORKDIR/NAME or initialises, and trains cfg.steps
    steps (`rlft.train.loop.train`: checkpoints every cfg.save_every, metrics, nothing lost on
    interruption) on `host_batch(indices)`: this process's rows of the global batch of the
    `batch_size` examples `indices` (a pure function of (seed, position) via `epoch_batches`, so a
    resumed stage sees the batches it would have). A finished stage returns its params at once.
    LoRA: the returned params have the adapters merged into the frozen base.
    """
    stage_dir = os.path.join(workdir, name)
    record_stage(workdir, name, kind)
    graphdef, params, frozen, lora = lora_setup(name, stage_dir, graphdef, params, cfg, mesh, seed, base)
    finish = lambda state: state.params if lora is None else merged_state(frozen, state.params, lora)
    program = build(graphdef, params, frozen)
    with Checkpointer(os.path.join(stage_dir, "checkpoints"), cfg.save_every, cfg.keep) as checkpointer:
        state, extra = restore_or_init(checkpointer, program.abstract, program.init)
        start = int(jax.device_get(state.step))
        if start >= cfg.steps:
            return finish(state)
        batches = ((i, host_batch(idx)) for i, idx in
                   epoch_batches(num_examples, batch_size, seed, start_index=extra[DATA_POSITION]))
        step = program.make_step(host_batch(np.arange(batch_size)))
        with MetricsLogger(stage_dir, cfg.steps, desc=name, start_step=start) as logger:
            state = train(step, state, batches, mesh, checkpointer, logger, cfg.steps, prefix=metric_prefix,
                          stage=name, max_nonfinite=cfg.get("max_nonfinite_steps", 3))
    return finish(state)


def run_stage(*, name: str, workdir: str, graphdef: nnx.GraphDef, params: nnx.State, num_examples: int,
              make_batch: Callable[[np.ndarray], Any], step_fn: Callable[..., tuple[TrainState, dict]],
              cfg: ml_collections.ConfigDict, mesh: Mesh, seed: int, kind: str = "lm",
              extra_args: tuple = (), base: str | None = None) -> nnx.State:
    """Train `params` with `step_fn` for cfg.steps on batches `make_batch(indices)`; final params.

    make_batch maps example indices [cfg.batch_size] to a host batch (a pytree of numpy arrays
    with a leading batch dimension); step_fn(state, batch, *extra_args, graphdef=, tx=,
    accum_steps=, **hyper-parameters) is compiled once with `jit_step`, its keyword-only
    hyper-parameters taken from cfg by name (`step_hyperparameters`); extra_args, e.g. frozen
    reference params, keep their shardings and are not donated. The optimizer comes from cfg
    (learning_rate, warmup_steps, weight_decay, clip_norm). The rest is `train_stage`'s: the
    stage directory WORKDIR/NAME recorded with `kind` ("lm" or "scalar"), resume, interruptions.

    LoRA (`cfg.lora.rank` > 0): adapters are attached to `params`, which stay frozen and are passed
    to the step as its last extra argument; only the adapters (and a scalar head) are optimised
    and checkpointed, and the returned params have the adapters merged in. `base` (the stage or
    checkpoint directory `params` come from) is recorded in WORKDIR/NAME/lora.json so that
    `rlft.load` can rebuild the merged model.
    """
    if not 1 <= cfg.batch_size <= num_examples:
        raise RlftError(f"{name}.batch_size={cfg.batch_size}: must be between 1 and the number of "
                        f"training examples ({num_examples})")
    tx = make_optimizer(cfg.learning_rate, cfg.warmup_steps, cfg.steps, cfg.weight_decay, cfg.clip_norm)
    rows = local_rows(mesh, cfg.batch_size)  # each process builds only its part of a global batch

    def build(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State | None) -> StageProgram:
        args = extra_args if frozen is None else (*extra_args, frozen)
        abstract = abstract_train_state(graphdef, params, tx, mesh)
        shardings = jax.tree.map(lambda a: a.sharding, abstract)

        def make_step(template: Any):
            jitted = jit_step(step_fn, shardings, batch_shardings(template, mesh), mesh,
                              tuple(jax.tree.map(lambda x: x.sharding, a) for a in args),
                              graphdef=graphdef, tx=tx, accum_steps=cfg.accum_steps,
                              **step_hyperparameters(step_fn, cfg))
            return (lambda s, b: jitted(s, b, *args)) if args else jitted

        return StageProgram(abstract, lambda: init_sharded_train_state(graphdef, params, tx, seed, mesh), make_step)

    return train_stage(name=name, workdir=workdir, kind=kind, graphdef=graphdef, params=params, cfg=cfg,
                       mesh=mesh, seed=seed, base=base, num_examples=num_examples, batch_size=cfg.batch_size,
                       host_batch=lambda indices: make_batch(indices[rows]), build=build)


def lora_setup(name: str, stage_dir: str, graphdef: nnx.GraphDef, params: nnx.State,
               cfg: ml_collections.ConfigDict, mesh: Mesh, seed: int, base: str | None
               ) -> tuple[nnx.GraphDef, nnx.State, nnx.State | None, LoraConfig | None]:
    """(graphdef, trainable params, frozen base or None, LoraConfig or None) of a stage.

    Without LoRA (`cfg.lora` absent or rank 0) the model is returned as it is. With it, the
    adapters are attached (`attach_adapters`, seeded by the stage's seed) and STAGE/lora.json is
    written by process 0.
    """
    lora = LoraConfig.from_section(cfg.get("lora"), what=f"{name}.lora")
    if lora is None:
        return graphdef, params, None, None
    graphdef, trainable, frozen = attach_adapters(graphdef, params, lora, mesh, seed)
    if is_primary():
        os.makedirs(stage_dir, exist_ok=True)
        write_lora_record(stage_dir, lora, base)
    return graphdef, trainable, frozen, lora


def run_sft_stage(*, name: str, workdir: str, graphdef: nnx.GraphDef, params: nnx.State,
                  examples: Sequence[Example], cfg: ml_collections.ConfigDict, mesh: Mesh,
                  seed: int, pad_id: int, base: str | None = None) -> nnx.State:
    """Train `params` on (prompt, completion) token examples for cfg.steps; returns final params.

    Resumes from WORKDIR/NAME/checkpoints when present (params, optimizer, step, RNG, data order).
    base: where `params` come from, recorded for a LoRA stage (`run_stage`).
    """

    def host_batch(indices: np.ndarray) -> TokenBatch:
        batch, _ = pad_right([examples[i] for i in indices], cfg.max_length, pad_id,
                             full_sequence_loss=cfg.full_sequence_loss)
        return batch

    return run_stage(name=name, workdir=workdir, graphdef=graphdef, params=params,
                     num_examples=len(examples), make_batch=host_batch, step_fn=sft_step, cfg=cfg,
                     mesh=mesh, seed=seed, kind="lm", base=base)


def _pair_batches(pairs: Sequence[EncodedPair], length: int, pad_id: int) -> Callable[[np.ndarray], TokenBatch]:
    """make_batch(indices) -> pair batch [batch, 2, length] of the selected pairs."""
    return lambda indices: pad_pairs([pairs[i] for i in indices], length, pad_id)[0]


def run_reward_stage(*, name: str, workdir: str, graphdef: nnx.GraphDef, params: nnx.State,
                     pairs: Sequence[EncodedPair], cfg: ml_collections.ConfigDict, mesh: Mesh,
                     seed: int, pad_id: int, base: str | None = None) -> nnx.State:
    """Bradley–Terry training of a ScalarModel on encoded pairs (`reward_stage_config`); final params.

    The stage is recorded as kind "scalar", so `rlft.load` of it gives a model with `score()`.
    base: the language-model stage the backbone comes from, recorded for a LoRA stage.
    """
    return run_stage(name=name, workdir=workdir, graphdef=graphdef, params=params,
                     num_examples=len(pairs), make_batch=_pair_batches(pairs, cfg.max_length, pad_id),
                     step_fn=reward_step, cfg=cfg, mesh=mesh, seed=seed, kind="scalar", base=base)


def run_dpo_stage(*, name: str, workdir: str, graphdef: nnx.GraphDef, params: nnx.State,
                  pairs: Sequence[EncodedPair], cfg: ml_collections.ConfigDict, mesh: Mesh,
                  seed: int, pad_id: int, reference_params: nnx.State | None = None,
                  base: str | None = None) -> nnx.State:
    """DPO/IPO training of a Decoder on encoded pairs (`dpo_stage_config`); final params.

    The reference is `reference_params` (default: `params`, the starting policy), kept frozen.
    With LoRA the reference is the starting policy itself, as the base with the adapters off (one
    copy of the weights); `base` is where `params` come from (`run_stage`).
    """
    check_dpo_args(cfg.beta, cfg.label_smoothing, cfg.loss_type)
    lora = LoraConfig.from_section(cfg.get("lora"), what=f"{name}.lora")
    if lora is not None and reference_params is not None and reference_params is not params:
        raise RlftError(f"{name}: with LoRA ({name}.lora.rank={lora.rank}) the DPO reference is the "
                        f"starting policy (adapters off); another reference_params is not supported")
    reference = None if lora is not None else params if reference_params is None else reference_params
    return run_stage(name=name, workdir=workdir, graphdef=graphdef, params=params,
                     num_examples=len(pairs), make_batch=_pair_batches(pairs, cfg.max_length, pad_id),
                     step_fn=dpo_step, cfg=cfg, mesh=mesh, seed=seed, kind="lm", extra_args=(reference,),
                     base=base)
