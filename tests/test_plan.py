"""`rlft plan`: the abstract compile is the program training runs, and its sizes add up by hand."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlft.cli.main import main
from rlft.data.batching import TokenBatch
from rlft.models import Decoder, ModelConfig
from rlft.models.lora import LoraConfig
from rlft.cli.plan import MemoryPlan, format_plans, memory_plan, parse_mesh, plan_optimizer, rl_inputs, sft_inputs
from rlft.parallel.sharding import make_mesh, shard_batch, sharded_init
from rlft.train.steps import batch_shardings, init_sharded_train_state, jit_step, sft_step, train_state_shardings

CFG = ModelConfig.llama(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                        max_positions=64)
BATCH, LENGTH = 8, 32


def _shard_bytes(tree) -> int:
    """Bytes of one device's shard of every leaf (ShapeDtypeStructs with shardings, or arrays)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def _stats(compiled) -> tuple:
    s = compiled.memory_analysis()
    return (s.argument_size_in_bytes, s.output_size_in_bytes, s.alias_size_in_bytes, s.temp_size_in_bytes)


@pytest.fixture(scope="module")
def sft_plan():
    """(mesh, abstract (state, batch), compiled) of the SFT step on fsdp=4, planned from shapes only."""
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 1}, jax.devices()[:4])
    jitted, args = sft_inputs(CFG, mesh, BATCH, LENGTH)
    return mesh, args, jitted.lower(*args).compile()


def test_abstract_plan_equals_the_compile_from_real_arrays(sft_plan):
    mesh, (state, batch), planned = sft_plan
    # The same step as run_stage builds it: real sharded params, optimizer state and batch.
    graphdef, params = sharded_init(lambda: Decoder(CFG, rngs=nnx.Rngs(0)), mesh)
    tx = plan_optimizer()
    real_state = init_sharded_train_state(graphdef, params, tx, 0, mesh)
    ints = np.random.default_rng(0).integers(0, CFG.vocab_size, (BATCH, LENGTH), dtype=np.int32)
    positions = np.tile(np.arange(LENGTH, dtype=np.int32), (BATCH, 1))
    real_batch = shard_batch(TokenBatch(tokens=ints, positions=positions, segment_ids=np.ones_like(ints),
                                        loss_mask=np.ones(ints.shape, np.float32)), mesh)
    real_step = jit_step(sft_step, train_state_shardings(real_state, mesh), batch_shardings(real_batch, mesh),
                         mesh, graphdef=graphdef, tx=tx, accum_steps=1)
    executed = real_step.lower(real_state, real_batch).compile()
    assert _stats(planned) == _stats(executed)
    # The arguments are exactly the buffers one device holds.
    device = jax.devices()[0]
    held = sum(s.data.nbytes for x in jax.tree.leaves((real_state, real_batch))
               for s in x.addressable_shards if s.device == device)
    assert _stats(planned)[0] == held == _shard_bytes((state, batch))
    new_state, metrics = executed(real_state, real_batch)  # the compiled program runs
    assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 1


def test_argument_bytes_are_the_parameter_and_optimizer_shards(sft_plan):
    mesh, _, compiled = sft_plan
    result = memory_plan(compiled, step="sft", model="llama", mesh=dict(mesh.shape), batch=BATCH,
                         length=LENGTH, remat="none", scan_layers=False, compile_seconds=0.0)
    params = nnx.state(nnx.eval_shape(lambda: Decoder(CFG, rngs=nnx.Rngs(0))))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    # Every Llama parameter has an "embed" dimension, which FSDP splits 4 ways; AdamW keeps mu and
    # nu beside each float32 parameter.
    per_device = 3 * 4 * n_params // 4
    # Replicated scalars: step int32, rng uint32[2], inject_hyperparams' count, learning rate and
    # schedule count, Adam's count.
    scalars = 4 + 8 + 4 + 4 + 4 + 4
    batch = 4 * BATCH * LENGTH * 4 // 4  # four [8, 32] 4-byte fields, rows split 4 ways
    assert result.argument_bytes == per_device + scalars + batch
    # The state is donated: the outputs reuse it (all but the replicated metrics).
    assert per_device + scalars <= result.alias_bytes <= result.output_bytes
    assert result.total_bytes == result.argument_bytes + result.output_bytes - result.alias_bytes + result.temp_bytes


def test_rl_plan_counts_the_frozen_reference():
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    jitted, args = rl_inputs(CFG, mesh, BATCH, LENGTH, algorithm="grpo", new_tokens=16, group_size=4)
    state, rollout, reference = args
    compiled = jitted.lower(*args).compile()
    argument_bytes = compiled.memory_analysis().argument_size_in_bytes
    assert argument_bytes == _shard_bytes(args)
    # The reference is one more copy of the parameter shards, not donated.
    assert _shard_bytes(reference) == _shard_bytes(state.params)
    stats = memory_plan(compiled, step="grpo", model="llama", mesh=dict(mesh.shape), batch=BATCH,
                        length=LENGTH, remat="none", scan_layers=False, compile_seconds=0.0)
    assert stats.alias_bytes <= argument_bytes - _shard_bytes(reference)


def test_lora_rl_step_holds_one_copy_of_the_base():
    """LoRA GRPO: the compiled step's arguments are the frozen base once (it is also the reference,
    adapters off) plus adapters, their AdamW moments and the rollout; full GRPO holds 4 copies."""
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    lora = LoraConfig(rank=4, targets=("q", "k", "v", "o", "gate", "up", "down"))
    jitted, args = rl_inputs(CFG, mesh, BATCH, LENGTH, algorithm="grpo", new_tokens=16, group_size=4, lora=lora)
    state, rollout, reference, frozen = args
    assert reference is None
    argument_bytes = jitted.lower(*args).compile().memory_analysis().argument_size_in_bytes
    base = _shard_bytes(frozen)
    adapters = _shard_bytes(state.params)
    assert argument_bytes == base + _shard_bytes((state, rollout))  # the base exactly once
    assert 0 < _shard_bytes(state) - 3 * adapters < 64  # adapters + AdamW moments + a few scalars
    full_jitted, full_args = rl_inputs(CFG, mesh, BATCH, LENGTH, algorithm="grpo", new_tokens=16, group_size=4)
    full_bytes = full_jitted.lower(*full_args).compile().memory_analysis().argument_size_in_bytes
    assert full_bytes - _shard_bytes(rollout) > 3.9 * base  # params, mu, nu and the reference


def test_plan_command_prints_a_table(capsys):
    assert main(["plan", "--model", "tiny_llama", "--devices", "4", "--mesh", "fsdp=4", "--batch", "4",
                 "--length", "16", "--lora", "2"]) == 0
    out = capsys.readouterr().out
    assert "tiny_llama  fsdp=4" in out and "XLA:CPU" in out and "LoRA adapters only" in out


def test_plan_command_plans_chunked_rl(capsys):
    """GRPO over 128 rows × 64 tokens of tiny_llama on 4 devices: one row per device per forward and
    64-column vocabulary blocks need a fifth of the temporaries of the whole rollout at once
    (measured: 41 vs 232 MB); the table says how the step was split."""
    command = ["plan", "--model", "tiny_llama", "--devices", "4", "--mesh", "fsdp=4", "--step", "grpo",
               "--batch", "128", "--length", "64", "--json"]
    assert main(command) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main([*command, "--accum-steps", "32", "--experience-chunk", "4", "--vocab-chunk", "64"]) == 0
    chunked = json.loads(capsys.readouterr().out)
    assert (chunked["accum_steps"], chunked["experience_chunk"], chunked["vocab_chunk"]) == (32, 4, 64)
    assert chunked["argument_bytes"] == whole["argument_bytes"]
    assert chunked["temp_bytes"] < whole["temp_bytes"] / 3, (chunked["temp_bytes"], whole["temp_bytes"])
    chunked.pop("total_bytes")
    assert "accum 32, rows 4, vocab 64" in format_plans([MemoryPlan(**chunked)])
    assert main(["plan", "--model", "tiny_llama", "--devices", "4", "--experience-chunk", "4"]) == 2
    assert "--experience-chunk and --vocab-chunk are RL settings" in capsys.readouterr().err


def test_plan_command_errors(capsys):
    # conftest started JAX with 8 CPU devices: asking for more is refused, naming the fix.
    assert main(["plan", "--model", "tiny_llama", "--devices", "16"]) == 2
    assert "JAX already started with 8 CPU device(s), the plan needs 16" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-7b"]) == 2
    assert "named models: gpt2, llama2_7b" in capsys.readouterr().err
    assert main(["plan", "--model", "tiny_llama", "--devices", "4", "--mesh", "fsdp=2"]) == 2
    assert "--mesh 'fsdp=2': 2 devices, but --devices=4" in capsys.readouterr().err


def test_parse_mesh():
    assert parse_mesh("fsdp=4,tensor=2", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(Exception, match="expected AXIS=SIZE"):
        parse_mesh("model=8", 8)


def test_fsdp_activations_stay_batch_sharded():
    """At one row per device, the per-device temporaries of the SFT step do not grow with the FSDP
    degree: activations stay batch-sharded and only weights are all-gathered. Compiled without the
    mesh in context (no activation constraints), XLA all-gathers the global batch's activations."""
    cfg = ModelConfig.llama(vocab_size=1024, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=1024,
                            max_positions=512)
    temps, unconstrained = {}, {}
    for fsdp in (1, 8):
        mesh = make_mesh({"data": 1, "fsdp": fsdp, "tensor": 1}, jax.devices()[:fsdp])
        jitted, args = sft_inputs(cfg, mesh, fsdp, 512)
        temps[fsdp] = jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes
        unconstrained[fsdp] = jitted.jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temps[8] <= 1.1 * temps[1], temps
    assert unconstrained[8] > 1.5 * temps[8], (unconstrained, temps)  # what the constraints prevent
