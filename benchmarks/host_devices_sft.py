"""Is a data-parallel step on 2 XLA:CPU host devices slower than on 1 because of the program or
because of the host? The SFT step of the RL benchmark's model and tokens (tiny GPT-2 4 × 256,
vocab 512; 32 rows × 64 tokens, as GRPO's update in `rl_step.py`) on N host devices.

    python benchmarks/host_devices_sft.py --host-devices 1
    python benchmarks/host_devices_sft.py --host-devices 2

An SFT step has no rollout, no gather of rows and one all-reduce of the gradients: if it slows
down on 2 devices as much as the RL update does, the RL update's program is not the cause.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from rlft.host import force_host_devices, tune_host_malloc  # noqa: E402

tune_host_malloc()
DEVICES = force_host_devices(sys.argv, default=1)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from rlft.data.batching import TokenBatch  # noqa: E402
from rlft.models import Decoder, ModelConfig  # noqa: E402
from rlft.parallel.sharding import make_mesh, shard_batch, sharded_init  # noqa: E402
from rlft.train.steps import (batch_shardings, init_sharded_train_state, jit_step, make_optimizer,  # noqa: E402
                              sft_step, train_state_shardings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host-devices", type=int, default=1, help="data-parallel CPU devices")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the median")
    args = parser.parse_args()
    cfg = ModelConfig.gpt2(vocab_size=512, d_model=256, n_layers=4, n_heads=4, max_positions=128)
    mesh = make_mesh((DEVICES, 1, 1), jax.devices()[:DEVICES])
    graphdef, params = sharded_init(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), mesh)
    tx = make_optimizer(1e-5, 0, 1000)
    state = init_sharded_train_state(graphdef, params, tx, 0, mesh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (32, 64)).astype(np.int32)
    batch = TokenBatch(tokens=tokens, positions=np.tile(np.arange(64, dtype=np.int32), (32, 1)),
                       segment_ids=np.ones_like(tokens), loss_mask=np.ones(tokens.shape, np.float32))
    batch = shard_batch(batch, mesh)
    step = jit_step(sft_step, train_state_shardings(state, mesh), batch_shardings(batch, mesh), mesh,
                    graphdef=graphdef, tx=tx, accum_steps=1)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    print(f"sft step, {DEVICES} host device(s), 32 × 64 tokens: median {statistics.median(times[args.skip:]):.3f} s "
          f"(steps {args.skip + 1}-{args.steps})")


if __name__ == "__main__":
    main()
