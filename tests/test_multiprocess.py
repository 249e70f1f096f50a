"""Multi-process runs: 2 processes × 2 CPU devices (launch/multiprocess_cpu.sh, gloo collectives)
reproduce 1 process × 4 devices, and the start-up rules (`rlft.parallel.distributed.resolve`).
The RL stage is asynchronous (rl.max_staleness=1) with its sampler on devices of its own
(mesh.rollout=2: the last device of each process; weights and rollouts move between the meshes
with `rlft.parallel.transfer.reshard`). The two processes sample with the continuous-batching
engine (rl.rollout_slots=2: one slot on each process's sampler device, each its own rows), the
single process with the static sampler: the same completions, so the same run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rlft.train.checkpoints import load_params
from rlft.parallel.distributed import resolve
from rlft.errors import RlftError
from tests.conftest import TEST_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny arithmetic experiment has both an SFT and an RL (GRPO) stage and needs no dataset.
RUN = [os.path.join(ROOT, "experiments/arithmetic_grpo.py:tiny"), "--config.sft.steps=6",
       "--config.sft.save_every=3", "--config.rl.steps=2", "--config.rl.save_every=2", "--config.task.num_test=16",
       "--config.eval.samples_per_problem=0", "--config.mesh.rollout=2", "--config.rl.max_staleness=1"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "RLFT_"))}
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "XLA_FLAGS": TEST_XLA_FLAGS, **extra}


def _numbers(path: str) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if isinstance(v, (int, float))} for line in open(path)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[str, str, str]:
    """(1 process × 4 devices workdir, 2 processes × 2 devices workdir, process 1's log), run side by side."""
    one, two = (str(tmp_path_factory.mktemp(name)) for name in ("one_process", "two_processes"))
    logs = str(tmp_path_factory.mktemp("logs"))
    single = subprocess.Popen([sys.executable, "-m", "rlft", "run", *RUN, "--workdir", one],
                              env=_env(XLA_FLAGS=f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=4"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    multi = subprocess.Popen(["bash", os.path.join(ROOT, "launch/multiprocess_cpu.sh"), "2", *RUN,
                              "--config.rl.rollout_slots=2", "--workdir", two],
                             env=_env(DEVICES_PER_PROCESS="2", LOG_DIR=logs, PYTHON=sys.executable),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out_multi, out_single = multi.communicate(timeout=900)[0], single.communicate(timeout=900)[0]
    assert single.returncode == 0, out_single[-3000:]
    if multi.returncode != 0 and "could not join" in out_multi:
        pytest.skip(f"this environment cannot start a JAX coordinator on localhost: {out_multi[-500:]}")
    assert multi.returncode == 0, out_multi[-3000:]
    return one, two, os.path.join(logs, "process-1.log")


@pytest.mark.slow
def test_two_processes_reproduce_one_process(runs):
    """Every metric of both stages to 1e-5 (not bitwise: gloo's cross-process all-reduce sums in
    another order than one process's reduction; measured differences are ~1e-6), the same greedy
    test answers, and the same final parameters."""
    one, two, _ = runs
    for stage in ("sft", "rl"):
        a, b = _numbers(os.path.join(one, stage, "metrics.jsonl")), _numbers(os.path.join(two, stage, "metrics.jsonl"))
        assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, len(a) + 1)), stage
        for x, y in zip(a, b):
            if stage == "rl":  # the engine's own metric
                assert 0 < y.pop("rollout/slot_occupancy") <= 1
            assert x.keys() == y.keys()
            for key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-5), (stage, x["step"], key)
    report_one, report_two = (json.load(open(os.path.join(d, "eval", "report.json"))) for d in (one, two))
    for key in ("accuracy_init", "accuracy_sft", "accuracy_rl", "format_sft", "format_rl"):
        assert report_two[key] == report_one[key], key
    params_one, params_two = load_params(os.path.join(one, "rl")), load_params(os.path.join(two, "rl"))
    for x, y in zip(*(sorted(_leaves(p[0])) for p in (params_one, params_two))):
        assert x[0] == y[0]
        np.testing.assert_allclose(y[1], x[1], rtol=1e-4, atol=1e-5, err_msg=x[0])


@pytest.mark.slow
def test_process_zero_alone_writes_logs(runs):
    """Process 1 shows no progress bar and prints no result; the run directory has one metrics file
    per stage (written by process 0) and checkpoints every process took part in."""
    _, two, log = runs
    text = open(log).read()
    assert "sft:" not in text and "rl:" not in text and '"accuracy_rl"' not in text
    assert sorted(os.listdir(os.path.join(two, "rl", "checkpoints"))) == ["2"]


@pytest.mark.slow
def test_a_text_reward_scores_each_row_once_and_a_failure_on_one_process_stops_both(tmp_path):
    """2 processes × 1 device, 8 rows a step: each process calls the reward function on its own 4
    rows (not all 8). At step 3 it raises on process 1 only: both processes stop (no hang in the
    update's collectives) with errors naming the function and the step, after saving step 2."""
    import socket

    rewards = tmp_path / "rewards"
    rewards.mkdir()
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    spec = "tests.fixtures.bad_rewards:fails_on_process_one"
    command = [sys.executable, "-m", "rlft", "run", os.path.join(ROOT, "tests/fixtures/fault_experiment.py"),
               "--workdir", str(tmp_path / "run"), "--config.data_parallel=true", f"--config.reward={spec}"]
    processes = [subprocess.Popen(command, env=_env(RLFT_COORDINATOR=f"localhost:{port}", RLFT_NUM_PROCESSES="2",
                                                   RLFT_PROCESS_ID=str(i), RLFT_TEST_REWARD_LOG=str(rewards)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    if any("could not join" in out for out in outputs):
        pytest.skip(f"this environment cannot start a JAX coordinator on localhost: {outputs[0][-500:]}")
    assert [p.returncode for p in processes] == [2, 2], outputs
    assert (f"rlft: error: rl step 3: reward function {spec} failed on process 1; its error is in that "
            f"process's output") in outputs[0], outputs[0][-2000:]
    assert f"rlft: error: rl step 3: reward function {spec} raised ValueError: boom" in outputs[1], outputs[1][-2000:]
    assert [(rewards / f"process-{i}").read_text().split() for i in range(2)] == [["4", "4", "4"]] * 2
    assert sorted(os.listdir(tmp_path / "run" / "rl" / "checkpoints")) == ["2"]


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}/{k}")
    else:
        yield prefix, np.asarray(tree)


@pytest.mark.parametrize("flags, env, expected", [
    ({}, {}, None),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 1}, {},
     {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}),
    ({}, {"RLFT_COORDINATOR": "h:2", "RLFT_NUM_PROCESSES": "4", "RLFT_PROCESS_ID": "3"},
     {"coordinator_address": "h:2", "num_processes": 4, "process_id": 3}),
    ({"process_id": 0}, {"RLFT_COORDINATOR": "h:2", "RLFT_NUM_PROCESSES": "4", "RLFT_PROCESS_ID": "3"},
     {"coordinator_address": "h:2", "num_processes": 4, "process_id": 0}),  # flags win
    ({"detect": True}, {}, {}),
    ({}, {"RLFT_DISTRIBUTED": "detect"}, {}),
    ({}, {"SLURM_NTASKS": "8", "SLURM_PROCID": "5"}, {}),
    ({}, {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None),
    ({}, {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "RLFT_DISTRIBUTED": "off"}, None),
])
def test_how_a_process_starts(flags, env, expected):
    assert resolve(**flags, env=env) == expected


@pytest.mark.parametrize("flags, env, culprit", [
    ({"coordinator": "h:1"}, {}, "--num-processes, --process-id missing"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, {}, "--process-id=2"),
    ({"coordinator": "nohost", "num_processes": 2, "process_id": 0}, {}, "--coordinator='nohost'"),
    ({}, {"RLFT_NUM_PROCESSES": "two"}, "RLFT_NUM_PROCESSES='two'"),
    ({}, {"RLFT_DISTRIBUTED": "yes"}, "RLFT_DISTRIBUTED='yes'"),
])
def test_bad_start_up_settings_are_named(flags, env, culprit):
    with pytest.raises(RlftError, match=culprit.replace("(", r"\(").replace(")", r"\)")):
        resolve(**flags, env=env)
