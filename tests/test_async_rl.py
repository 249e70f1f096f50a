"""Asynchronous RL (rl.max_staleness = K): step t trains on the rollout sampled K policy versions
earlier, the same prompts and keys per step as the synchronous loop, resumes bit for bit, and the
off-policy corrections are wired to the importance weights."""

import json
import math
import os

import jax
import numpy as np
import pytest

from rlft.errors import RlftError
from rlft.rl.config import resolve_pg_config
from rlft.train.checkpoints import Checkpointer
from tests.test_rl_stage import TOK, char_reward, run, stage_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(**overrides):
    base = dict(algorithm="grpo", epochs=1, minibatches=1, kl=dict(controller="fixed"), steps=5)
    return stage_config(**{**base, **overrides})


def metrics(workdir):
    return [json.loads(line) for line in (workdir / "rl" / "metrics.jsonl").read_text().splitlines()]


def test_a_frozen_policy_gives_the_synchronous_run(tmp_path):
    """With a learning rate too small to change a float32 weight, every policy version is the same,
    so K = 2 must train on exactly the rollouts of K = 0: same prompts and keys per step (two
    rollouts in flight: the order they are consumed in matters)."""
    frozen = dict(learning_rate=1e-30)
    sync = run(tmp_path / "sync", cfg=config(**frozen))
    asyn = run(tmp_path / "async", cfg=config(max_staleness=2, **frozen))
    assert [r["async/staleness"] for r in metrics(tmp_path / "async")] == [0, 1, 2, 2, 2]
    for a, b in zip(jax.tree.leaves(sync), jax.tree.leaves(asyn)):
        np.testing.assert_array_equal(a, b)
    for s, a in zip(metrics(tmp_path / "sync"), metrics(tmp_path / "async")):
        for name in ("objective/scores", "loss/total", "completions/mean_length", "objective/entropy"):
            assert s[name] == a[name], name


def test_async_run_resumes_exactly(tmp_path):
    """Staleness 1 and the decoupled weights move off 1 from step 2; interrupted in the reward of
    step 4, step 3 is saved (nothing was donated yet) with the rollouts in flight; resumed, params
    and every metric equal an uninterrupted run's."""
    cfg = lambda: config(max_staleness=1, off_policy="decoupled", steps=6)
    straight = run(tmp_path / "straight", cfg=cfg())
    logged = metrics(tmp_path / "straight")
    assert [r["async/staleness"] for r in logged] == [0, 1, 1, 1, 1, 1]
    assert logged[0]["policy/tis_weight"] == 1.0  # step 1 trains on its own policy's rollout
    assert all(abs(r["policy/tis_weight"] - 1.0) > 1e-4 for r in logged[1:])  # stale: the weights move
    calls = {"n": 0}

    def interrupted(completions, recs):
        calls["n"] += 1
        if calls["n"] == 4:  # one reward call per step: this is step 4
            raise KeyboardInterrupt
        return char_reward(completions, recs)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", interrupted, cfg=cfg())
    checkpoints = Checkpointer(tmp_path / "resumed" / "rl" / "checkpoints")
    assert checkpoints.all_steps() == [2, 3]  # the periodic save and the one the interrupt made
    checkpoints.close()
    resumed = run(tmp_path / "resumed", cfg=cfg())
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "resumed" / "rl" / "metrics.jsonl").read_text() == \
        (tmp_path / "straight" / "rl" / "metrics.jsonl").read_text()


def test_off_policy_settings_and_errors():
    resolve = lambda **kw: resolve_pg_config(config(**kw), TOK.eos_token_id)
    assert resolve(max_staleness=1, off_policy="tis").tis == "token"
    assert resolve(max_staleness=1, off_policy="tis", tis="sequence").tis == "sequence"
    decoupled = resolve(max_staleness=1, off_policy="decoupled")
    assert decoupled.tis == "token" and decoupled.tis_cap == math.inf
    assert resolve().max_staleness == 0 and resolve().tis == "none"
    for kw, message in ((dict(off_policy="tis"), "needs rl.max_staleness >= 1"),
                        (dict(max_staleness=1, off_policy="is"), "rl.off_policy='is'"),
                        (dict(max_staleness=-1), "rl.max_staleness=-1"),
                        (dict(max_staleness=1, off_policy="decoupled", tis="token"), "leave rl.tis"),
                        (dict(algorithm="dapo", max_staleness=1), "use one of them")):
        with pytest.raises(RlftError, match=message):
            resolve(**kw)


def run_placed(workdir, cfg, rollout_devices):
    """The test_rl_stage run on a (data 4) training mesh of devices 0-3, the sampler on devices 4-7
    (`rollout_devices`) or colocated (None)."""
    from flax import nnx

    from rlft.models import Decoder
    from rlft.parallel.sharding import make_mesh, state_shardings
    from rlft.rl.stage import run_rl_stage
    from tests.pairs_util import random_params
    from tests.test_rl_stage import CFG, records

    mesh = make_mesh((4, 1, 1), jax.devices()[:4])
    sampler = None if rollout_devices is None else make_mesh((4, 1, 1), rollout_devices)
    graphdef, host = random_params(lambda: Decoder(CFG, rngs=nnx.Rngs(0)), seed=3)
    params = jax.device_put(host, state_shardings(host, mesh))
    out = run_rl_stage(name="rl", workdir=str(workdir), graphdef=graphdef, params=params, prompts=records(),
                       reward_fn=char_reward, cfg=cfg, mesh=mesh, seed=4, eos_id=TOK.eos_token_id,
                       pad_id=TOK.pad_token_id, tokenizer=TOK, rollout_mesh=sampler)
    return jax.tree.map(np.asarray, out)


def test_sampler_on_its_own_devices_equals_colocated(tmp_path):
    """mesh.rollout: the sampler on devices 4-7 and the trainer on 0-3 give exactly the colocated
    run (the policy is copied to the sampler before each rollout, the completions copied back);
    asynchronous (K = 1), whose rollouts go through the same `sample` as the synchronous step's."""
    assert jax.device_count() >= 8
    k = 1
    cfg = lambda: config(max_staleness=k, steps=4)
    colocated = run_placed(tmp_path / "colocated", cfg(), None)
    placed = run_placed(tmp_path / "placed", cfg(), jax.devices()[4:8])
    for a, b in zip(jax.tree.leaves(colocated), jax.tree.leaves(placed)):
        np.testing.assert_array_equal(a, b)
    assert metrics(tmp_path / "colocated") == metrics(tmp_path / "placed")
    # wall-clock figures go to TensorBoard only (metrics.jsonl stays deterministic)
    placed_scalars = tensorboard_scalars(tmp_path / "placed" / "rl" / "tensorboard")
    assert len(placed_scalars["async/weight_sync_s"]) == 4 and min(placed_scalars["async/weight_sync_s"]) > 0
    assert "async/weight_sync_s" not in tensorboard_scalars(tmp_path / "colocated" / "rl" / "tensorboard")
    assert len(placed_scalars["async/rollout_wait_s"]) == 4
    assert not any(name.endswith("_s") for name in metrics(tmp_path / "placed")[0])


def tensorboard_scalars(directory) -> dict[str, list[float]]:
    """{tag: values in step order} of the scalar summaries in a TensorBoard event directory (read
    with tensorboardX's protobufs: records are length, CRC, event, CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[float]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append(value.simple_value)
    return out


def test_rollout_devices_come_from_the_mesh_section():
    from rlft.parallel.sharding import make_mesh, rollout_mesh

    section = {"data": -1, "fsdp": 1, "tensor": 1, "rollout": 3}
    train, sampler = make_mesh(section), rollout_mesh(section)
    assert train.devices.size == jax.device_count() - 3 and sampler.devices.size == 3
    assert not set(train.devices.flat) & set(sampler.devices.flat)
    assert rollout_mesh({**section, "rollout": 0}) is None
    assert make_mesh({**section, "rollout": 0}).devices.size == jax.device_count()
    with pytest.raises(RlftError, match="mesh.rollout=8"):
        make_mesh({**section, "rollout": jax.device_count()})
    # a fraction of the devices, or a count given as a float (the field's type: --config.mesh.rollout=2)
    assert rollout_mesh({**section, "rollout": 0.25}).devices.size == 2
    assert rollout_mesh({**section, "rollout": 2.0}).devices.size == 2
    for bad in (1.5, 0.99, -1):
        with pytest.raises(RlftError, match=f"mesh.rollout={bad}: must be a device count"):
            make_mesh({**section, "rollout": bad})


def test_mesh_rollout_flag_takes_counts_and_fractions():
    from rlft.cli.main import _resolved_experiment

    spec = os.path.join(ROOT, "experiments/arithmetic_grpo.py:tiny")
    for good in ("2", "0.5", "0"):
        _resolved_experiment(spec, [f"--config.mesh.rollout={good}"])
    with pytest.raises(RlftError, match=r"mesh.rollout.*a device count >= 0 or a fraction in \(0, 1\)"):
        _resolved_experiment(spec, ["--config.mesh.rollout=1.5"])


def test_each_process_gives_the_sampler_its_last_devices():
    """In a multi-process run the sampler takes the same share of every process's devices (so a
    batch's rows stay in their process between the meshes); a count the processes do not divide is refused."""
    from types import SimpleNamespace

    from rlft.parallel.sharding import _rollout_count, _split_rollout

    devices = [SimpleNamespace(process_index=p, id=10 * p + i) for p in (0, 1) for i in range(4)]
    train, sampler = _split_rollout(devices, _rollout_count({"rollout": 4}, devices))
    assert [d.id for d in train] == [0, 1, 10, 11] and [d.id for d in sampler] == [2, 3, 12, 13]
    assert _rollout_count({"rollout": 0.5}, devices) == 4  # fractions: a multiple of the processes,
    assert _rollout_count({"rollout": 0.1}, devices) == 2  # at least one device of each
    with pytest.raises(RlftError, match=r"mesh.rollout=3: must be a multiple of the 2 processes"):
        _rollout_count({"rollout": 3}, devices)
