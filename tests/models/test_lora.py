"""LoRA: zero-initialised adapters change nothing, only adapters train, the reference is the base,
merged weights equal adapters applied, a LoRA stage resumes exactly, loads merged and exports to
Hugging Face format that transformers reads."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rlft
from rlft.train.checkpoints import load_params, save_model_config
from rlft.cli.main import main
from rlft.errors import RlftError
from rlft.models import Decoder, ModelConfig, model_config
from rlft.models.lora import (LoraConfig, adapters_off, attach_adapters, combine, lora_section,
                              merged_state, split_trainable)
from rlft.objectives.dpo import pair_logprobs
from rlft.parallel.sharding import make_mesh, shard_batch
from rlft.train.stages import run_sft_stage, sft_stage_config
from rlft.train.steps import init_train_state, jit_step, make_optimizer, sft_step, train_state_shardings, batch_shardings

CFG = ModelConfig.llama(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                        max_positions=64)
GPT2 = ModelConfig.gpt2(vocab_size=96, d_model=32, n_layers=2, n_heads=4, max_positions=64)
ALL = LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"))


def _inputs(rows=2, length=12, seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (rows, length), 0, 96)
    positions = jnp.tile(jnp.arange(length), (rows, 1))
    return tokens, positions, jnp.ones_like(tokens)


def _perturbed(trainable, scale=0.05, seed=3):
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _lora_model(cfg, lora=ALL):
    """(plain graphdef, plain params, LoRA graphdef, trainable, frozen) on one device."""
    graphdef, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    return (graphdef, params, *attach_adapters(graphdef, params, lora, mesh, seed=1))


@pytest.mark.parametrize("cfg", [CFG, CFG.replace(scan_layers=True), GPT2], ids=["llama", "llama-scan", "gpt2"])
def test_zero_b_changes_nothing_and_merging_equals_applying(cfg):
    graphdef, params, lora_graphdef, trainable, frozen = _lora_model(cfg, ALL if cfg.gated_mlp else
                                                                     LoraConfig(4, 8.0, ("q", "v", "o", "up", "down")))
    x = _inputs()
    base = nnx.merge(graphdef, params)(*x)
    # A fresh adapter (B = 0) leaves the logits exactly as they were.
    assert bool(jnp.all(nnx.merge(lora_graphdef, combine(frozen, trainable))(*x) == base))
    # Trained adapters change them; merging them into the weights gives the same function.
    lora = LoraConfig.from_section(lora_section(4, 8.0, "q,v,o,up,down") if not cfg.gated_mlp else
                                   lora_section(4, 8.0, "q,k,v,o,gate,up,down"))
    trained = _perturbed(trainable)
    applied = nnx.merge(lora_graphdef, combine(frozen, trained))(*x)
    assert float(jnp.max(jnp.abs(applied - base))) > 0.1
    merged = merged_state(frozen, trained, lora)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    np.testing.assert_allclose(nnx.merge(graphdef, merged)(*x), applied, atol=1e-5)
    # Adapters off (the DPO/RL reference) is the base model, bit for bit.
    assert bool(jnp.all(nnx.merge(lora_graphdef, adapters_off(frozen, trained))(*x) == base))


def test_adapters_are_named_beside_their_weights_and_shard_like_them():
    _, _, _, trainable, frozen = _lora_model(CFG)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    assert "layers.0.attn.q_lora.lora_a" in names and "layers.1.mlp.down_lora.lora_b" in names
    assert all("_lora." in n for n in names) and len(names) == 2 * 2 * 7
    assert not any("_lora" in ".".join(map(str, p)) for p, _ in nnx.to_flat_state(frozen))
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    graphdef, params = nnx.split(Decoder(CFG, rngs=nnx.Rngs(0)))
    _, trainable, _ = attach_adapters(graphdef, params, ALL, mesh, seed=1)
    specs = {".".join(map(str, p)): v[...].sharding.spec for p, v in nnx.to_flat_state(trainable)}
    assert specs["layers.0.attn.q_lora.lora_a"] == jax.sharding.PartitionSpec("fsdp", None)  # embed, rank
    assert specs["layers.0.attn.q_lora.lora_b"] == jax.sharding.PartitionSpec(None, "tensor")  # rank, heads
    assert specs["layers.0.mlp.down_lora.lora_a"] == jax.sharding.PartitionSpec("tensor", None)  # mlp, rank


def test_bad_lora_settings_are_clear_errors():
    with pytest.raises(RlftError, match="rank=0"):
        LoraConfig(rank=0)
    with pytest.raises(RlftError, match=r"sft.lora.targets='q,x'.*expected distinct names"):
        LoraConfig.from_section(lora_section(4, 16.0, "q,x"), what="sft.lora")
    with pytest.raises(RlftError, match="alpha"):
        LoraConfig(rank=2, alpha=-1.0)
    assert LoraConfig.from_section(lora_section(0)) is None


def test_a_step_changes_only_adapters_and_the_base_is_not_donated():
    graphdef, params, lora_graphdef, trainable, frozen = _lora_model(CFG)
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
    tx = make_optimizer(1e-2, 0, 10)
    state = init_train_state(_perturbed(trainable, 0.01), tx, seed=0)
    tokens, positions, segments = (np.asarray(a) for a in _inputs(rows=4))
    batch = shard_batch({"tokens": tokens, "positions": positions, "segment_ids": segments,
                         "loss_mask": np.ones(tokens.shape, np.float32)}, mesh)
    state = jax.device_put(state, train_state_shardings(state, mesh))
    frozen_before = jax.tree.map(np.asarray, frozen)
    shard = lambda t: jax.tree.map(lambda x: x.sharding, t)
    frozen = jax.device_put(frozen, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    step = jit_step(sft_step, shard(state), batch_shardings(batch, mesh), mesh, (shard(frozen),),
                    graphdef=lora_graphdef, tx=tx)
    before = jax.tree.map(np.asarray, state.params)
    new_state, metrics = step(state, batch, frozen)
    assert np.isfinite(float(metrics["loss"]))
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), new_state.params, before)
    assert all(jax.tree.leaves(changed))  # every adapter moved
    # The frozen base is an argument, not donated, and unchanged.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), frozen_before)
    # The optimizer holds the adapters only.
    opt_leaves = jax.tree.leaves(new_state.opt_state)
    assert sum(x.size for x in opt_leaves) < 3 * sum(x.size for x in jax.tree.leaves(trainable)) + 16


def test_dpo_reference_with_adapters_off_is_the_base():
    graphdef, params, lora_graphdef, trainable, frozen = _lora_model(CFG)
    tokens, positions, segments = _inputs(rows=4, length=10)
    pairs = {"tokens": tokens.reshape(2, 2, 10), "positions": positions.reshape(2, 2, 10),
             "segment_ids": segments.reshape(2, 2, 10),
             "loss_mask": jnp.ones((2, 2, 10), jnp.float32).at[..., :4].set(0.0)}
    base = pair_logprobs(graphdef, params, pairs)
    trained = _perturbed(trainable)
    reference = pair_logprobs(lora_graphdef, adapters_off(frozen, trained), pairs)
    np.testing.assert_array_equal(reference, base)
    assert float(jnp.max(jnp.abs(pair_logprobs(lora_graphdef, combine(frozen, trained), pairs) - base))) > 1e-3


def test_optimizer_state_is_under_five_percent_of_full_fine_tuning_on_gpt2_small():
    cfg = model_config("gpt2")
    tx = make_optimizer(1e-4, 0, 10)
    full = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    lora_state = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), lora=LoraConfig(rank=16))))
    trainable, _ = split_trainable(lora_state)
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    full_opt = nbytes(jax.eval_shape(tx.init, full))
    lora_opt = nbytes(jax.eval_shape(tx.init, trainable))
    assert lora_opt <= 0.05 * full_opt, (lora_opt, full_opt)
    # rank 16 on q, k, v, o of 12 layers: 12 · 4 · 16 · (768 + 768) parameters, two AdamW moments.
    assert lora_opt - 2 * 4 * 12 * 4 * 16 * (768 + 768) < 64
    print(f"optimizer bytes: LoRA r16 qkvo {lora_opt / 2**20:.2f} MiB vs full {full_opt / 2**20:.1f} MiB "
          f"({100 * lora_opt / full_opt:.2f}%)")


# --- a LoRA stage ------------------------------------------------------------------------------

def _examples(completion, n=48, seed=0):
    """Random 5-token prompts, all completed by `completion` (a rule a few steps learn)."""
    rng = np.random.default_rng(seed)
    return [(list(rng.integers(2, 96, 5)), completion) for _ in range(n)]


# The base learns TASK_A by full fine-tuning; LoRA then learns TASK_B (the same tokens in another
# order: a change of the layers, which adapters can make, not of the embeddings, which they cannot).
TASK_A, TASK_B = [7, 8, 9, 10, 1], [10, 9, 8, 7, 1]


def _run(workdir, steps, lora_rank, base_params, graphdef, mesh, base=None, name="lora"):
    cfg = sft_stage_config(steps=steps, batch_size=8, learning_rate=1e-2, warmup_steps=0, save_every=4,
                           keep=5, max_length=16)
    cfg.lora.rank = lora_rank
    cfg.lora.targets = "q,k,v,o,gate,up,down"
    examples = _examples(TASK_B if lora_rank else TASK_A)
    return run_sft_stage(name=name, workdir=str(workdir), graphdef=graphdef, params=base_params,
                         examples=examples, cfg=cfg, mesh=mesh, seed=0, pad_id=0, base=base)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A run dir with a 16-step full SFT stage "base" (TASK_A) and an 8-step LoRA stage "lora" (TASK_B)."""
    workdir = tmp_path_factory.mktemp("lora_run")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
    save_model_config(workdir, CFG)
    graphdef, params = nnx.split(Decoder(CFG, rngs=nnx.Rngs(0)))
    base_params = _run(workdir, 16, 0, params, graphdef, mesh, name="base")
    merged = _run(workdir, 8, 4, base_params, graphdef, mesh, base=os.path.join(workdir, "base"))
    return workdir, mesh, graphdef, base_params, merged


def _losses(stage_dir):
    with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["train/loss"] for line in f]


def test_lora_stage_trains_saves_only_adapters_and_loads_merged(lora_run):
    workdir, _, graphdef, base_params, merged = lora_run
    losses = _losses(os.path.join(workdir, "lora"))
    assert len(losses) == 8 and losses[-1] < 0.75 * losses[0], losses
    values, _ = load_params(os.path.join(workdir, "lora"))
    flat = jax.tree_util.tree_flatten_with_path(values)[0]
    assert flat and all(any(str(getattr(k, "key", "")).endswith("_lora") for k in path) for path, _ in flat)
    record = json.load(open(os.path.join(workdir, "lora", "lora.json")))
    assert record == {"rank": 4, "alpha": 16.0, "targets": ["q", "k", "v", "o", "gate", "up", "down"],
                      "base": "base"}
    model = rlft.load(os.path.join(workdir, "lora"))
    x = _inputs()
    np.testing.assert_allclose(model.logits(np.asarray(x[0])), nnx.merge(graphdef, merged)(*x), atol=1e-5)
    assert float(jnp.max(jnp.abs(nnx.merge(graphdef, merged)(*x) - nnx.merge(graphdef, base_params)(*x)))) > 1e-3


def test_lora_stage_resumes_exactly(lora_run, tmp_path):
    workdir, mesh, graphdef, base_params, merged = lora_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "lora" / "checkpoints" / "8")  # as if killed after step 4's checkpoint
    metrics = (copy / "lora" / "metrics.jsonl")
    resumed = _run(copy, 8, 4, base_params, graphdef, mesh, base=str(copy / "base"))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, resumed),
                 jax.tree.map(np.asarray, merged))
    assert metrics.read_text() == (workdir / "lora" / "metrics.jsonl").read_text()


def test_lora_stage_exports_merged_weights_that_transformers_reads(lora_run, tmp_path):
    import torch
    import transformers

    workdir, _, graphdef, _, merged = lora_run
    out = tmp_path / "hf"
    assert main(["export", str(workdir / "lora"), "--out", str(out)]) == 0
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = _inputs()[0]
    with torch.no_grad():
        theirs = torch_model(torch.tensor(np.asarray(tokens))).logits.numpy()
    np.testing.assert_allclose(theirs, nnx.merge(graphdef, merged)(*_inputs()), atol=1e-4)


def test_a_lora_stage_without_its_base_is_a_clear_error(lora_run, tmp_path):
    workdir = lora_run[0]
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "base")
    with pytest.raises(RlftError, match="LoRA stage on the base .*base, which no longer exists"):
        rlft.load(str(copy / "lora"))


def test_adapters_only_export_loads_with_peft_onto_the_exported_base(lora_run, tmp_path):
    """`rlft export --adapters-only`: a PEFT adapter directory; peft on the exported base model
    gives the merged model's logits (an independent implementation of the same LoRA function)."""
    import peft
    import torch
    import transformers

    workdir, _, graphdef, _, merged = lora_run
    assert main(["export", str(workdir / "base"), "--out", str(tmp_path / "base")]) == 0
    assert main(["export", str(workdir / "lora"), "--out", str(tmp_path / "adapters"), "--adapters-only"]) == 0
    config = json.load(open(tmp_path / "adapters" / "adapter_config.json"))
    assert config["r"] == 4 and config["lora_alpha"] == 16.0
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                "up_proj", "v_proj"]
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapters")).eval()
    tokens = _inputs()[0]
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(np.asarray(tokens))).logits.numpy()
    np.testing.assert_allclose(theirs, nnx.merge(graphdef, merged)(*_inputs()), atol=1e-4)


def test_adapters_only_export_needs_a_lora_stage(lora_run, tmp_path, capsys):
    workdir = lora_run[0]
    assert main(["export", str(workdir / "base"), "--out", str(tmp_path / "a"), "--adapters-only"]) == 2
    assert "--adapters-only needs a LoRA stage" in capsys.readouterr().err


# --- LoRA reward and DPO stages ------------------------------------------------------------------

def _pairs(n=24, seed=5):
    """Preference pairs (prompt, chosen), (prompt, rejected): chosen completions end in token 7."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = [0] + rng.integers(2, 64, 2).tolist()
        tail = rng.integers(8, 64, int(rng.integers(1, 6))).tolist()
        out.append(((prompt, tail + [7]), (prompt, tail + [9])))
    return out


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    """A run dir with a 2-step SFT stage "base" (tiny GPT-2) for LoRA reward / DPO stages to start from."""
    from tests.pairs_util import CFG as PAIR_CFG

    workdir = tmp_path_factory.mktemp("lora_pairs")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, jax.devices()[:4])
    save_model_config(workdir, PAIR_CFG)
    graphdef, params = nnx.split(Decoder(PAIR_CFG, rngs=nnx.Rngs(0)))
    cfg = sft_stage_config(steps=2, batch_size=8, learning_rate=1e-2, max_length=16)
    examples = [(p, c) for (p, c), _ in _pairs()]
    base = run_sft_stage(name="base", workdir=str(workdir), graphdef=graphdef, params=params, examples=examples,
                         cfg=cfg, mesh=mesh, seed=0, pad_id=1)
    return workdir, mesh, PAIR_CFG, graphdef, base


def _lora_cfg(section):
    section.lora.update(rank=4, alpha=16.0, targets="q,k,v,o,up,down")
    return section


def test_lora_reward_stage_trains_adapters_and_head_and_loads_merged(pair_run):
    from rlft.train.stages import reward_stage_config, run_reward_stage
    from rlft.train.warm_start import scalar_model_from_lm

    workdir, mesh, cfg, _, base = pair_run
    graphdef, params = scalar_model_from_lm(cfg, base, mesh)
    section = _lora_cfg(reward_stage_config(steps=12, batch_size=8, learning_rate=3e-2, max_length=16))
    merged = run_reward_stage(name="reward", workdir=str(workdir), graphdef=graphdef, params=params,
                              pairs=_pairs(), cfg=section, mesh=mesh, seed=1, pad_id=1,
                              base=str(workdir / "base"))
    lines = [json.loads(line) for line in open(workdir / "reward" / "metrics.jsonl")]
    assert np.mean([x["train/accuracy"] for x in lines[-3:]]) > 0.9, [x["train/accuracy"] for x in lines]
    values, _ = load_params(str(workdir / "reward"))
    assert set(values) == {"backbone", "head"} and set(values["head"]) == {"kernel", "bias"}
    model = rlft.load(str(workdir / "reward"))
    assert model.kind == "scalar"
    tokens, positions, segments = _inputs(rows=3, length=8)
    tokens = tokens % 64
    expected = nnx.merge(graphdef, merged)(tokens, positions, segments)
    np.testing.assert_allclose(nnx.merge(graphdef, model.params)(tokens, positions, segments), expected,
                               atol=1e-4, rtol=1e-5)


def test_lora_dpo_starts_at_log2_and_moves_the_margin(pair_run):
    """Step 1 of LoRA DPO has policy == reference (B = 0, reference = adapters off): loss log 2."""
    from rlft.train.stages import dpo_stage_config, run_dpo_stage

    workdir, mesh, _, graphdef, base = pair_run
    section = _lora_cfg(dpo_stage_config(steps=12, batch_size=8, learning_rate=1e-2, max_length=16))
    run_dpo_stage(name="dpo", workdir=str(workdir), graphdef=graphdef, params=base, pairs=[p for p in _pairs()],
                  cfg=section, mesh=mesh, seed=2, pad_id=1, reference_params=base, base=str(workdir / "base"))
    lines = [json.loads(line) for line in open(workdir / "dpo" / "metrics.jsonl")]
    assert lines[0]["train/loss"] == pytest.approx(np.log(2.0), abs=1e-6)
    assert lines[0]["train/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    margins = [x["train/rewards/margins"] for x in lines[1:]]
    assert min(margins) > 0.0 and margins[-1] > 0.01, margins  # the adapters moved chosen above rejected
    assert lines[-1]["train/loss"] < np.log(2.0) - 0.005
    with pytest.raises(RlftError, match="with LoRA .* the DPO reference is the starting policy"):
        run_dpo_stage(name="dpo2", workdir=str(workdir), graphdef=graphdef, params=base, pairs=_pairs(),
                      cfg=section, mesh=mesh, seed=2, pad_id=1,
                      reference_params=jax.tree.map(lambda x: x + 0, base))
