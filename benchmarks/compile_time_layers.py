"""Compile time of one SFT train step against depth, with and without `ModelConfig.scan_layers`.

The step is `rlft.train.steps.sft_step` (forward, backward, AdamW from `make_optimizer`) under `jax.jit`,
lowered from abstract shapes (no parameter is ever initialised) and compiled for this machine's
default backend. Model: Llama layout, d_model 64, 4 heads (2 kv), d_ff 172, vocab 512, float32;
batch 8 x 128. Columns: trace + lower seconds, XLA compile seconds, for the unrolled layers, the
scanned layers, and scanned layers with remat "full". The last column is the cores other
processes used meanwhile (from /proc/stat): figures taken on a busy machine are inflated.

    python benchmarks/compile_time_layers.py                 # 4, 12, 24, 48 layers
    python benchmarks/compile_time_layers.py --layers 4 48
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_load import LoadMeter  # noqa: E402  (benchmarks/, this script's directory)

from rlft.models import Decoder, ModelConfig  # noqa: E402
from rlft.train.steps import init_train_state, make_optimizer, sft_step  # noqa: E402

BATCH, LENGTH = 8, 128


def compile_seconds(cfg: ModelConfig, meter: LoadMeter) -> tuple[float, float, float]:
    """(trace + lower seconds, compile seconds, other processes' cores) of one SFT step for `cfg`."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    tx = make_optimizer(1e-3, warmup_steps=10, total_steps=100, weight_decay=0.01)
    state = jax.eval_shape(lambda p: init_train_state(p, tx, seed=0), abstract)
    tokens = jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32)
    batch = dict(tokens=tokens, positions=tokens, segment_ids=tokens,
                 loss_mask=jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.float32))
    step = jax.jit(functools.partial(sft_step, graphdef=graphdef, tx=tx), donate_argnums=0)
    lowered, lower_s, _ = meter.measure(lambda: step.lower(state, batch))
    _, compile_s, others = meter.measure(lowered.compile)
    return lower_s, compile_s, others


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12, 24, 48])
    args = parser.parse_args()
    meter = LoadMeter()
    variants = {"unrolled": {}, "scan": dict(scan_layers=True), "scan+remat": dict(scan_layers=True, remat="full")}
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; SFT step, batch {BATCH} x {LENGTH}; "
          f"seconds as trace+lower / compile; 'others' = cores used by other processes")
    print(f"{'layers':>6} | " + " | ".join(f"{name:>17}" for name in variants) + " | others")
    for n in args.layers:
        cells, load = [], []
        for changes in variants.values():
            cfg = ModelConfig.llama(vocab_size=512, d_model=64, n_layers=n, n_heads=4, n_kv_heads=2, d_ff=172,
                                    max_positions=LENGTH, **changes)
            lower_s, compile_s, others = compile_seconds(cfg, meter)
            cells.append(f"{lower_s:6.2f} / {compile_s:6.2f}")
            load.append(others)
        print(f"{n:>6} | " + " | ".join(f"{c:>17}" for c in cells) + f" | {max(load):.1f}", flush=True)


if __name__ == "__main__":
    main()
