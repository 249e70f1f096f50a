"""The generic loop: deterministic data order, bitwise resume, interruption, metrics files."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import json

import jax
import numpy as np
import pytest
from flax import nnx

from rlft.train import steps
from rlft.train.checkpoints import Checkpointer
from rlft.data.loader import epoch_batches, epoch_permutation
from rlft.train.logging import MetricsLogger
from rlft.models import Decoder, ModelConfig
from rlft.parallel.sharding import make_mesh, state_shardings
from rlft.train.loop import restore_or_init, train

CFG = ModelConfig.gpt2(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_positions=64)
NUM_EXAMPLES, BATCH, LENGTH, TOTAL, SAVE_EVERY = 20, 8, 16, 6, 3  # 2 batches per epoch: 3 epochs


def make_model() -> Decoder:
    return Decoder(CFG, rngs=nnx.Rngs(0))


def dataset(seed: int = 0) -> dict:
    """NUM_EXAMPLES right-padded rows with loss on a random-length completion."""
    rng = np.random.default_rng(seed)
    data = {"tokens": rng.integers(1, CFG.vocab_size, (NUM_EXAMPLES, LENGTH)).astype(np.int32),
                "positions": np.tile(np.arange(LENGTH, dtype=np.int32), (NUM_EXAMPLES, 1)),
                "segment_ids": np.ones((NUM_EXAMPLES, LENGTH), np.int32),
                "loss_mask": np.zeros((NUM_EXAMPLES, LENGTH), np.float32)}
    for r in range(NUM_EXAMPLES):
        data["loss_mask"][r, rng.integers(1, LENGTH):] = 1.0
    return data


DATA = dataset()


def batches(start: int, stop_at: int | None = None):
    """(index, host batch) from `start`; raises KeyboardInterrupt when asked for batch `stop_at`."""
    for index, rows in epoch_batches(NUM_EXAMPLES, BATCH, seed=1, start_index=start):
        if index == stop_at:
            raise KeyboardInterrupt
        yield index, {k: v[rows] for k, v in DATA.items()}


class Job:
    """Everything one "process" builds: model split, optimizer, mesh, compiled step."""

    def __init__(self):
        self.mesh = make_mesh((2, 2, 2))
        self.graphdef, abstract_params = nnx.split(nnx.eval_shape(make_model))
        rng = np.random.default_rng(0)
        host = jax.tree.map(lambda a: rng.normal(0, 0.05, a.shape).astype(np.float32), abstract_params)
        self.params = jax.device_put(host, state_shardings(abstract_params, self.mesh))
        self.tx = steps.make_optimizer(1e-2, warmup_steps=2, total_steps=TOTAL, weight_decay=0.1)
        self.abstract = steps.abstract_train_state(self.graphdef, self.params, self.tx, self.mesh)
        shardings = jax.tree.map(lambda a: a.sharding, self.abstract)
        example = next(batches(0))[1]
        self.step_fn = steps.jit_step(steps.sft_step, shardings,
                                          steps.batch_shardings(example, self.mesh), self.mesh,
                                          graphdef=self.graphdef, tx=self.tx, accum_steps=2)

    def run(self, workdir, total_steps: int, stop_at: int | None = None):
        """Resume from workdir's latest checkpoint (or start), train to total_steps; final state."""
        ckpt = Checkpointer(workdir / "checkpoints", save_every=SAVE_EVERY, keep=5)
        init = lambda: steps.init_sharded_train_state(self.graphdef, self.params, self.tx, 0, self.mesh)
        state, extra = restore_or_init(ckpt, self.abstract, init)
        logger = MetricsLogger(workdir, TOTAL, "sft", start_step=int(state.step), progress=False)
        try:
            return train(self.step_fn, state, batches(extra["data_position"], stop_at), self.mesh,
                         ckpt, logger, total_steps,
                         extra_fn=lambda step, s: {"kl_coef": 0.1 * step})
        finally:
            logger.close()
            ckpt.close()


def host(state):
    return jax.tree.map(np.asarray, state)


@pytest.fixture(scope="module")
def job():
    return Job()


@pytest.fixture(scope="module")
def straight(job, tmp_path_factory):
    """2N steps in one go: (final state on host, metrics.jsonl text, workdir)."""
    workdir = tmp_path_factory.mktemp("straight")
    final = job.run(workdir, TOTAL)
    return host(final), (workdir / "metrics.jsonl").read_text(), workdir


def test_epoch_batches_are_a_function_of_seed_epoch_index():
    first = list(zip(range(7), epoch_batches(10, 3, seed=5)))
    assert [i for _, (i, _) in first] == list(range(7))
    # each epoch (3 batches of 3, one example dropped) is a slice of that epoch's permutation
    for epoch in range(2):
        rows = np.concatenate([b for _, (_, b) in first[3 * epoch:3 * epoch + 3]])
        np.testing.assert_array_equal(rows, epoch_permutation(10, 5, epoch)[:9])
    assert not np.array_equal(epoch_permutation(10, 5, 0), epoch_permutation(10, 5, 1))
    resumed = list(zip(range(3), epoch_batches(10, 3, seed=5, start_index=4)))
    for (_, (i, b)), (_, (j, c)) in zip(resumed, first[4:]):
        assert i == j and np.array_equal(b, c)


def test_metrics_logger_drops_lines_after_the_resumed_step(tmp_path):
    with MetricsLogger(tmp_path, 5, progress=False) as logger:
        for step in range(1, 6):
            logger.log(step, {"train/loss": np.float32(1.0 / step), "train/tokens": np.int32(10)})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "train/loss": 1.0, "train/tokens": 10}
    with MetricsLogger(tmp_path, 5, start_step=3, progress=False) as logger:
        logger.log(4, {"train/loss": 9.0})
    steps_logged = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == [1, 2, 3, 4]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_is_bitwise_identical(job, straight, tmp_path):
    want, want_metrics, straight_dir = straight
    first = job.run(tmp_path, SAVE_EVERY)  # N steps, saved at the end (the first "process")
    assert int(first.step) == SAVE_EVERY
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [SAVE_EVERY]
    final = Job().run(tmp_path, TOTAL)  # a fresh "process": new objects, restore, N more steps
    for a, b in zip(jax.tree.leaves(host(final)), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert metrics == want_metrics and len(metrics.splitlines()) == TOTAL
    _, extra = Checkpointer(tmp_path / "checkpoints").restore(TOTAL, job.abstract)
    assert extra == {"data_position": TOTAL, "kl_coef": 0.1 * TOTAL}
    assert Checkpointer(straight_dir / "checkpoints").all_steps() == [SAVE_EVERY, TOTAL]


def test_keyboard_interrupt_saves_the_last_completed_step(job, straight, tmp_path):
    want, want_metrics, _ = straight
    with pytest.raises(KeyboardInterrupt):
        job.run(tmp_path, TOTAL, stop_at=2)  # interrupted while fetching batch 2: 2 steps done
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [2]  # not a multiple of save_every: saved by the interrupt handler
    state, extra = ckpt.restore(None, job.abstract)
    assert int(state.step) == 2 and extra["data_position"] == 2
    final = job.run(tmp_path, TOTAL)  # resuming loses nothing
    for a, b in zip(jax.tree.leaves(host(final)), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "metrics.jsonl").read_text() == want_metrics


def test_wall_clock_metrics_go_to_tensorboard_only(tmp_path):
    """A metric named "..._s" (seconds, or a rate per second) is a wall-clock value: TensorBoard gets
    it, metrics.jsonl does not (it stays deterministic across resumes)."""
    from rlft.train.logging import MetricsLogger
    from tests.test_async_rl import tensorboard_scalars

    with MetricsLogger(tmp_path, total_steps=2) as logger:
        record = logger.log(1, {"loss": 0.5, "async/weight_sync_s": 0.25, "rollout/tokens_per_s": 100.0})
    assert record == {"step": 1, "loss": 0.5}
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 0.5}
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["async/weight_sync_s"] == [0.25] and scalars["rollout/tokens_per_s"] == [100.0]
    assert scalars["loss"] == [0.5]
