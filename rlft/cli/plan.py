"""Memory plans: compile a training step for abstract inputs on a mesh and read XLA's per-device sizes.

    rlft plan --model llama2_7b --devices 8 --mesh fsdp=8 --mesh fsdp=4,tensor=2 \\
              --batch 8 --length 2048 [--remat none|full|dots] [--scan] [--step sft|rl|grpo|ppo] [--lora 16]
              [--accum-steps 64 --experience-chunk 16 --vocab-chunk 8192]   (RL at scale)

The step is the one training runs: `rlft.train.steps.sft_step` through `jit_step` with the shardings of
`abstract_train_state` (as `rlft.train.stages.run_stage` compiles it), or `rlft.rl.pg_step.pg_step` with a
PGState, the frozen reference and (PPO) a separate critic (as `rlft.rl.stage.make_rl_step` does).
Every input is a `jax.ShapeDtypeStruct` carrying its sharding, so no parameter is ever
materialised: a 7B model plans on a laptop, on N simulated CPU devices
(`--xla_force_host_platform_device_count`). The sizes are those of XLA:CPU's buffer assignment for
the partitioned per-device program: an estimate of what a GPU or TPU compiler would allocate (its
fusions, layouts and collectives differ), not a measurement on such a device.

Full fine-tuning (float32 parameters with AdamW moments: 12 bytes per parameter before
activations) or, with `--lora RANK`, LoRA: the frozen base as a non-donated argument and AdamW on
the adapters only. docs/big_models.md holds the measured table.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from typing import Any, Sequence

from rlft.errors import RlftError

GIB = 1024 ** 3
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


# ---------------------------------------------------------------------------------------------
# Simulated devices (before JAX starts)


def request_host_devices(count: int) -> None:
    """Ask XLA:CPU for `count` devices; takes effect only if JAX's backends have not started yet.

    Replaces any device-count flag already in XLA_FLAGS, and defaults JAX_PLATFORMS to cpu (the
    plan compiles for CPU devices; an accelerator backend would only take memory). `host_devices`
    then checks that enough devices exist.
    """
    if count < 1:
        raise RlftError(f"--devices={count}: must be >= 1")
    if _jax_started():  # too late to change the device count; host_devices says so if it matters
        return
    flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", "")).split()
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_COUNT_FLAG}={count}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _jax_started() -> bool:
    """Whether JAX's backends exist already (then XLA_FLAGS is read and fixed)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume not, and set the flag
        return False


def host_devices(count: int) -> list:
    """The first `count` CPU devices; a clear error when JAX already started with fewer."""
    import jax

    devices = jax.devices("cpu")
    if len(devices) < count:
        raise RlftError(f"JAX already started with {len(devices)} CPU device(s), the plan needs {count}; "
                        f"run it in a fresh process (`rlft plan` sets XLA_FLAGS={DEVICE_COUNT_FLAG}={count} "
                        f"before JAX starts) or set that flag yourself before importing jax")
    return devices[:count]


def parse_mesh(spec: str, devices: int) -> dict[str, int]:
    """'fsdp=4,tensor=2' -> {'data': 1, 'fsdp': 4, 'tensor': 2}; the sizes must multiply to `devices`."""
    from rlft.parallel.sharding import MESH_AXES

    shape = {axis: 1 for axis in MESH_AXES}
    for part in filter(None, spec.replace(" ", "").split(",")):
        axis, _, size = part.partition("=")
        if axis not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise RlftError(f"--mesh {spec!r}: expected AXIS=SIZE[,AXIS=SIZE] with axes {', '.join(MESH_AXES)} "
                            f"and sizes >= 1")
        shape[axis] = int(size)
    if math.prod(shape.values()) != devices:
        raise RlftError(f"--mesh {spec!r}: {math.prod(shape.values())} devices, but --devices={devices}")
    return shape


# ---------------------------------------------------------------------------------------------
# Abstract inputs


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """XLA's per-device sizes of one compiled step (bytes) and how long it took to compile."""

    step: str
    model: str
    mesh: dict[str, int]
    batch: int
    length: int
    remat: str
    scan_layers: bool
    lora_rank: int  # 0 = full fine-tuning
    accum_steps: int
    experience_chunk: int  # RL: rows per experience forward (0 = all)
    vocab_chunk: int  # RL: vocabulary columns per log-prob block (0 = all)
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    compile_seconds: float

    @property
    def total_bytes(self) -> int:
        """Live at once per device: arguments + outputs not aliased to (donated) arguments + temps."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the total."""
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes}


def memory_plan(compiled, *, step: str, model: str, mesh: dict[str, int], batch: int, length: int,
                remat: str, scan_layers: bool, compile_seconds: float, lora_rank: int = 0, accum_steps: int = 1,
                experience_chunk: int = 0, vocab_chunk: int = 0) -> MemoryPlan:
    """A MemoryPlan from a compiled executable's `memory_analysis()`."""
    stats = compiled.memory_analysis()
    return MemoryPlan(step=step, model=model, mesh=dict(mesh), batch=batch, length=length, remat=remat,
                      scan_layers=scan_layers, lora_rank=lora_rank, accum_steps=accum_steps,
                      experience_chunk=experience_chunk, vocab_chunk=vocab_chunk,
                      argument_bytes=stats.argument_size_in_bytes,
                      output_bytes=stats.output_size_in_bytes, alias_bytes=stats.alias_size_in_bytes,
                      temp_bytes=stats.temp_size_in_bytes,
                      generated_code_bytes=stats.generated_code_size_in_bytes,
                      compile_seconds=compile_seconds)


def abstract_module(make_module, mesh) -> tuple[Any, Any]:
    """(graphdef, state of ShapeDtypeStructs with their shardings on `mesh`); nothing is allocated."""
    from flax import nnx

    from rlft.parallel.sharding import state_shardings
    from rlft.train.steps import with_shardings

    graphdef, abstract = nnx.split(nnx.eval_shape(make_module))
    return graphdef, with_shardings(abstract, state_shardings(abstract, mesh))


def shardings_of(tree: Any) -> Any:
    """The sharding of every ShapeDtypeStruct (or array) of a tree."""
    import jax

    return jax.tree.map(lambda x: x.sharding, tree)


def abstract_batch(shapes: Any, mesh) -> Any:
    """ShapeDtypeStructs of a host batch (`shapes`: a tree of ShapeDtypeStructs) with batch shardings."""
    from rlft.train.steps import batch_shardings, with_shardings

    return with_shardings(shapes, batch_shardings(shapes, mesh))


def plan_optimizer():
    """The stages' optimizer (AdamW, warm-up + cosine, clipping, weight decay); values don't matter."""
    from rlft.train.steps import make_optimizer

    return make_optimizer(1e-5, warmup_steps=10, total_steps=1000, weight_decay=0.01, clip_norm=1.0)


def policy_inputs(cfg, mesh, lora=None) -> tuple[Any, Any, Any]:
    """(graphdef, abstract trainable params, abstract frozen base or None) of a Decoder, as a stage
    holds them: the whole model, or with a LoraConfig its adapters and the frozen rest."""
    from flax import nnx

    from rlft.models.decoder import Decoder
    from rlft.models.lora import split_trainable

    graphdef, params = abstract_module(lambda: Decoder(cfg, rngs=nnx.Rngs(0), lora=lora), mesh)
    if lora is None:
        return graphdef, params, None
    return (graphdef, *split_trainable(params))


def sft_inputs(cfg, mesh, batch: int, length: int, accum_steps: int = 1, lora=None):
    """(jitted sft_step, (abstract TrainState, abstract TokenBatch[, frozen base])): what `run_stage`
    compiles; with a LoraConfig the state holds the adapters and the base is a further argument."""
    import jax
    import jax.numpy as jnp

    from rlft.data.batching import TokenBatch
    from rlft.train.steps import abstract_train_state, jit_step, sft_step

    graphdef, params, frozen = policy_inputs(cfg, mesh, lora)
    tx = plan_optimizer()
    state = abstract_train_state(graphdef, params, tx, mesh)
    ints = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    host = TokenBatch(tokens=ints, positions=ints, segment_ids=ints,
                      loss_mask=jax.ShapeDtypeStruct((batch, length), jnp.float32))
    tokens = abstract_batch(host, mesh)
    extra = () if frozen is None else (frozen,)
    step = jit_step(sft_step, shardings_of(state), shardings_of(tokens), mesh,
                    tuple(shardings_of(e) for e in extra), graphdef=graphdef, tx=tx, accum_steps=accum_steps)
    return step, (state, tokens, *extra)


def rl_inputs(cfg, mesh, batch: int, length: int, *, algorithm: str = "grpo", new_tokens: int | None = None,
              group_size: int | None = None, accum_steps: int = 1, experience_chunk: int = 0,
              vocab_chunk: int = 0, lora=None):
    """(jitted pg_step, (abstract PGState, batch, reference params...)): what `make_rl_step` compiles.

    `batch` rollout rows of `length` columns (prompt + `new_tokens`, default half each), groups of
    `group_size` (default min(8, batch)); GRPO has no critic, PPO a separate ScalarModel critic.
    accum_steps, experience_chunk, vocab_chunk: the `rl` section's fields of the same names (the
    loss's micro-batches, rows per experience forward, vocabulary columns per log-prob block).
    With a LoraConfig the state holds the policy's adapters, and the frozen base is the one further
    argument (the reference is the base with the adapters off: no second copy).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from rlft.models.heads import ScalarModel
    from rlft.rl.pg_step import init_pg_state, pg_step
    from rlft.rl.config import resolve_pg_config, rl_stage_config
    from rlft.generate.sampling import Sequences
    from rlft.train.steps import jit_step, train_state_shardings, with_shardings

    new_tokens = new_tokens or length // 2
    group_size = group_size or min(8, batch)
    if not 0 < new_tokens < length:
        raise RlftError(f"--new-tokens={new_tokens}: must be between 1 and --length - 1 ({length - 1})")
    if batch % group_size:
        raise RlftError(f"--group={group_size} does not divide --batch={batch}")
    section = rl_stage_config(steps=1000, prompts_per_step=batch // group_size, group_size=group_size,
                              learning_rate=1e-6, max_new_tokens=new_tokens, algorithm=algorithm,
                              accum_steps=accum_steps, experience_chunk=experience_chunk,
                              vocab_chunk=vocab_chunk)
    config = resolve_pg_config(section, eos_id=0, prefix=algorithm)
    graphdef, params, frozen = policy_inputs(cfg, mesh, lora)
    critic_graphdef = critic_params = critic_tx = None
    if config.critic == "separate":
        critic_graphdef, critic_params = abstract_module(lambda: ScalarModel(cfg, rngs=nnx.Rngs(1)), mesh)
        critic_tx = plan_optimizer()
    elif config.critic != "none":
        raise RlftError(f"{algorithm}: the planner covers critic 'none' and 'separate', not {config.critic!r}")
    tx = plan_optimizer()
    abstract = jax.eval_shape(lambda p, c: init_pg_state(p, tx, c, critic_tx, config.kl_coef, 0),
                              params, critic_params)
    state = with_shardings(abstract, train_state_shardings(abstract, mesh))
    ints = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    floats = jax.ShapeDtypeStruct((batch, new_tokens), jnp.float32)
    host = {"sequences": Sequences(tokens=ints, positions=ints, segment_ids=ints, completion_mask=floats,
                                   logprobs=floats),
            "scores": jax.ShapeDtypeStruct((batch,), jnp.float32)}
    rollout = abstract_batch(host, mesh)
    if frozen is not None:
        extra = (None, frozen)  # (reference_params, frozen): the reference is the base, adapters off
    else:
        extra = (params,) if config.uses_reference else ()
    step = jit_step(pg_step, shardings_of(state), shardings_of(rollout), mesh,
                    tuple(shardings_of(e) for e in extra), graphdef=graphdef,
                    critic_graphdef=critic_graphdef, tx=tx, critic_tx=critic_tx, config=config)
    return step, (state, rollout, *extra)


def step_inputs(step: str, cfg, mesh, batch: int, length: int, **kw):
    """`sft_inputs` or `rl_inputs` by step name ("sft", "grpo" or "rl", "ppo")."""
    step = "grpo" if step == "rl" else step
    if step == "sft":
        return sft_inputs(cfg, mesh, batch, length, **{k: v for k, v in kw.items() if k in ("accum_steps", "lora")})
    if step in ("grpo", "ppo"):
        return rl_inputs(cfg, mesh, batch, length, algorithm=step, **kw)
    raise RlftError(f"--step={step!r}: expected one of sft, rl (= grpo), grpo, ppo")


def plan(model: str | Any, mesh_shape: dict[str, int], *, step: str = "sft", batch: int = 8,
         length: int = 2048, remat: str = "none", scan_layers: bool = False, dtype: str = "float32",
         lora_rank: int = 0, lora_targets: str = "q,k,v,o", devices: Sequence | None = None,
         **kw) -> MemoryPlan:
    """Compile `step` of a model for abstract inputs on a mesh; XLA's per-device sizes.

    `model`: a name (`rlft.models.model_config`) or a ModelConfig.

    `devices`: the devices to build the mesh from (default: the first CPU devices, as many as the
    mesh needs). `lora_rank` > 0 plans LoRA fine-tuning with adapters on `lora_targets`. `remat` and `scan_layers` set the ModelConfig fields of the same names; `kw` goes
    to `rl_inputs` (new_tokens, group_size) or, with accum_steps, to both steps.
    """
    from rlft.models.config import model_config
    from rlft.models.lora import LoraConfig
    from rlft.parallel.sharding import make_mesh

    if batch < 1 or length < 2:
        raise RlftError(f"--batch={batch} --length={length}: need a batch >= 1 and a length >= 2")
    if step == "sft" and (kw.get("experience_chunk") or kw.get("vocab_chunk")):
        raise RlftError("--experience-chunk and --vocab-chunk are RL settings (--step rl, grpo or ppo)")
    # Only fields that differ from the defaults, so a ModelConfig without remat/scan_layers plans too.
    changes = {k: v for k, v in (("remat", remat), ("scan_layers", scan_layers), ("dtype", dtype))
               if v != {"remat": "none", "scan_layers": False, "dtype": "float32"}[k]}
    if isinstance(model, str):
        cfg = model_config(model, **changes)
    else:
        cfg, model = model.replace(**changes), model.family
    if length > cfg.max_positions:
        raise RlftError(f"--length={length}: more than {model}'s {cfg.max_positions} positions")
    mesh = make_mesh(mesh_shape, devices if devices is not None else host_devices(math.prod(mesh_shape.values())))
    lora = LoraConfig(rank=lora_rank, targets=tuple(lora_targets.split(","))) if lora_rank else None
    jitted, args = step_inputs(step, cfg, mesh, batch, length, lora=lora, **kw)
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    return memory_plan(compiled, step=step, model=model, mesh=mesh_shape, batch=batch, length=length,
                       remat=remat, scan_layers=scan_layers, compile_seconds=seconds, lora_rank=lora_rank,
                       accum_steps=kw.get("accum_steps", 1), experience_chunk=kw.get("experience_chunk", 0),
                       vocab_chunk=kw.get("vocab_chunk", 0))


# ---------------------------------------------------------------------------------------------
# Report

NOTE = ("Per-device sizes from XLA:CPU's buffer assignment of the partitioned program (GiB): an "
        "estimate of what a GPU/TPU compiler would allocate, not a measurement on one. Float32 "
        "params + AdamW on everything (lora 0) or on LoRA adapters only (lora r; the base frozen).")


def mesh_text(shape: dict[str, int]) -> str:
    """'fsdp=4,tensor=2' (axes of size 1 left out; 'data=1' for a single device)."""
    return ",".join(f"{a}={n}" for a, n in shape.items() if n > 1) or "data=1"


def chunks_text(p: MemoryPlan) -> str:
    """'accum 64, rows 16, vocab 8192' for the settings that split the step's work ('-' for none)."""
    parts = [(f"accum {p.accum_steps}", p.accum_steps > 1), (f"rows {p.experience_chunk}", p.experience_chunk),
             (f"vocab {p.vocab_chunk}", p.vocab_chunk)]
    return ", ".join(text for text, on in parts if on) or "-"


def format_plans(plans: Sequence[MemoryPlan]) -> str:
    """A fixed-width table, one row per plan, then the note on what the numbers are."""
    header = ("step", "model", "mesh", "batch×len", "remat", "scan", "lora", "chunks", "args", "out", "alias",
              "temp", "code", "total", "compile s")
    rows = [header]
    for p in plans:
        gib = lambda b: f"{b / GIB:.2f}"
        rows.append((p.step, p.model, mesh_text(p.mesh), f"{p.batch}×{p.length}", p.remat,
                     "yes" if p.scan_layers else "no", str(p.lora_rank), chunks_text(p), gib(p.argument_bytes),
                     gib(p.output_bytes),
                     gib(p.alias_bytes), gib(p.temp_bytes), gib(p.generated_code_bytes), gib(p.total_bytes),
                     f"{p.compile_seconds:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i >= 8 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    return "\n".join([*lines, "", NOTE])


def plan_command(args) -> list[MemoryPlan]:
    """`rlft plan`: one plan per --mesh, printed as a table (or JSON lines with --json)."""
    import json

    meshes = [parse_mesh(spec, args.devices) for spec in (args.mesh or [f"fsdp={args.devices}"])]
    host_devices(args.devices)  # fail before any work if JAX started with fewer devices
    plans = []
    for shape in meshes:
        kw = {"accum_steps": args.accum_steps}
        if args.step != "sft":
            kw.update(new_tokens=args.new_tokens, group_size=args.group)
        if args.experience_chunk or args.vocab_chunk:
            kw.update(experience_chunk=args.experience_chunk, vocab_chunk=args.vocab_chunk)
        p = plan(args.model, shape, step=args.step, batch=args.batch, length=args.length,
                 remat=args.remat, scan_layers=args.scan, dtype=args.dtype, lora_rank=args.lora,
                 lora_targets=args.lora_targets, **kw)
        plans.append(p)
        if args.json:
            print(json.dumps(p.to_dict()), flush=True)
        else:
            print(f"rlft: planned {p.step} on {mesh_text(shape)}: {p.total_bytes / GIB:.2f} GiB per device "
                  f"({p.compile_seconds:.1f} s to compile)", file=sys.stderr, flush=True)
    if not args.json:
        print(format_plans(plans))
    return plans


def add_plan_parser(sub) -> None:
    """The `plan` subcommand's flags (`rlft.cli.main.build_parser`); imports nothing that starts JAX."""
    p = sub.add_parser("plan", help="per-device memory of a compiled training step on a simulated mesh",
                       description="Compile the SFT or RL step of a named model for abstract inputs on N "
                                   "simulated CPU devices and print XLA's per-device memory. " + NOTE)
    p.add_argument("--model", required=True,
                   help="a named model (rlft.models.NAMED_CONFIGS): gpt2, llama2_7b, llama3_8b, qwen2_7b, ...")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (default 8)")
    p.add_argument("--mesh", action="append",
                   help="AXIS=SIZE[,AXIS=SIZE] over data, fsdp, tensor; repeat for several plans "
                        "(default fsdp=DEVICES)")
    p.add_argument("--step", default="sft", choices=("sft", "rl", "grpo", "ppo"),
                   help="sft_step, or pg_step as GRPO (rl; no critic) or PPO (separate critic)")
    p.add_argument("--batch", type=int, default=8, help="global rows per step (default 8)")
    p.add_argument("--length", type=int, default=2048, help="tokens per row (default 2048)")
    p.add_argument("--accum-steps", type=int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--new-tokens", type=int, help="RL: completion columns of --length (default half)")
    p.add_argument("--group", type=int, help="RL: completions per prompt (default min(8, --batch))")
    p.add_argument("--experience-chunk", type=int, default=0, metavar="ROWS",
                   help="RL: rows per forward of the experience (rl.experience_chunk; default 0: all)")
    p.add_argument("--vocab-chunk", type=int, default=0, metavar="COLUMNS",
                   help="RL: vocabulary columns per log-prob block (rl.vocab_chunk; default 0: all)")
    p.add_argument("--remat", default="none", help="ModelConfig.remat: none (default), full or dots")
    p.add_argument("--scan", action="store_true", help="ModelConfig.scan_layers: blocks under lax.scan")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (parameters stay float32)")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="LoRA fine-tuning with adapters of this rank (default 0: full fine-tuning)")
    p.add_argument("--lora-targets", default="q,k,v,o",
                   help="weights the adapters target (default q,k,v,o; also gate, up, down)")
    p.add_argument("--json", action="store_true", help="one JSON object per plan instead of the table")
