"""New tokens per second of the continuous-batching engine beside the static sampler, same queue.

The queue: `--prompts` prompts of 4..16 tokens for a GPT-2-layout model with random weights (the
`tiny` shape of benchmarks/sampling.py: 4 layers, d_model 256, vocabulary 512) sampled at
temperature 1 with a near-uniform next-token distribution. Workloads:

    long-tail   `--eos-ids` of the 512 tokens end a completion, so lengths are geometric (mean ~
                512 / eos_ids) and cut at `--new-tokens`: a static batch runs until its longest row
                ends, while the continuous engine refills a finished row's slot
    uniform     no EOS: every row runs to `--new-tokens` (the engine's overhead, nothing to gain)

Static = `rlft.generate.sampling.sample` over the queue in batches of `--slots` rows; continuous =
`rlft.generate.engine.generate_continuous` with `--slots` slots (tests/test_engine.py proves it gives
the static sampler's tokens for the same keys); new tokens/s = Σ lengths / seconds of each. A, B alternate; medians
after one warm-up call each (compiles excluded).

    python benchmarks/continuous_batching.py
    python benchmarks/continuous_batching.py --slots 16 --prompts 128 --new-tokens 128 --reps 7 --chunk 8
    python benchmarks/continuous_batching.py --host-devices 2     # both sides on a 2-device mesh
"""

from __future__ import annotations

import argparse
import statistics
import time

import sys

from rlft.host import force_host_devices, tune_host_malloc

if __name__ == "__main__":
    tune_host_malloc()
    force_host_devices(sys.argv, default=1)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from rlft.generate.engine import generate_continuous  # noqa: E402
from rlft.generate.sampling import SamplingParams, sample  # noqa: E402
from rlft.models import Decoder, ModelConfig  # noqa: E402
from rlft.parallel.sharding import make_mesh, replicated  # noqa: E402

PAD = 0


def queue(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n left-padded prompts of 4..16 random tokens (ids 1..511) in a [n, 16] batch."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, 16), np.int32)
    mask = np.zeros((n, 16), np.int32)
    for i, length in enumerate(rng.integers(4, 17, size=n)):
        tokens[i, 16 - length:] = rng.integers(1, 512, size=length)
        mask[i, 16 - length:] = 1
    return tokens, mask


def static(graphdef, params, tokens, mask, key, slots, new_tokens, eos, sampling, mesh):
    """Lengths [n] of the queue through `sample` in consecutive batches of `slots` rows (row r of the
    queue draws row r's stream, `first_row`: the engine's completions, token for token)."""
    outs = [sample(graphdef, params, tokens[i:i + slots], mask[i:i + slots], key, first_row=i,
                   max_new_tokens=new_tokens, eos_id=eos, pad_id=PAD, sampling=sampling, mesh=mesh)
            for i in range(0, len(tokens), slots)]
    return np.concatenate([np.asarray(o.lengths) for o in outs])


def continuous(graphdef, params, tokens, mask, key, slots, new_tokens, eos, sampling, chunk, refill_rows, mesh):
    out = generate_continuous(graphdef, params, tokens, mask, key, slots=slots, max_new_tokens=new_tokens,
                              eos_id=eos, pad_id=PAD, sampling=sampling, chunk_steps=chunk, refill_rows=refill_rows,
                              mesh=mesh)
    return np.asarray(out.lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--eos-ids", type=int, default=16, help="how many token ids end a completion")
    parser.add_argument("--chunk", type=int, default=32, help="the engine's most decode steps between refills")
    parser.add_argument("--refill-rows", type=int, default=None,
                        help="rows that must end before a chunk stops early to refill (default: slots // 4)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--host-devices", type=int, default=1,
                        help="CPU devices: > 1 puts both sides on a data-parallel mesh (static batches split "
                             "over it, an engine of slots / N slots on each device)")
    args = parser.parse_args()

    cfg = ModelConfig.gpt2(vocab_size=512, d_model=256, n_layers=4, n_heads=4, max_positions=256)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    model.embed[...] = model.embed[...] * 0.05  # tied head: near-uniform next-token distributions
    graphdef, params = nnx.split(model)
    mesh = make_mesh((-1, 1, 1)) if args.host_devices > 1 else None
    params = jax.tree.map(jnp.asarray, params) if mesh is None else jax.device_put(params, replicated(mesh))
    tokens, mask = queue(args.prompts)
    sampling = SamplingParams(temperature=1.0)
    key = jax.random.key(0)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; queue {args.prompts} prompts, {args.slots} slots, "
          f"max_new_tokens {args.new_tokens}, chunk {args.chunk}, refill rows {args.refill_rows or 'slots // 4'}, "
          f"median of {args.reps}, {jax.device_count()} device(s)")
    for workload, eos in (("long-tail", list(range(500, 500 + args.eos_ids))), ("uniform", [-1])):
        runs = {"static": lambda: static(graphdef, params, tokens, mask, key, args.slots, args.new_tokens, eos, sampling,
                                         mesh),
                "continuous": lambda: continuous(graphdef, params, tokens, mask, key, args.slots, args.new_tokens,
                                                 eos, sampling, args.chunk, args.refill_rows, mesh)}
        seconds = {name: [] for name in runs}
        lengths = {name: fn() for name, fn in runs.items()}  # warm-up: compiles
        for _ in range(args.reps):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - start)
        rate = {name: lengths[name].sum() / statistics.median(seconds[name]) for name in runs}
        print(f"{workload:9s}  lengths mean {lengths['continuous'].mean():5.1f} max {lengths['continuous'].max():3d}"
              f"  static {rate['static']:8.0f} tok/s  continuous {rate['continuous']:8.0f} tok/s"
              f"  ratio {rate['continuous'] / rate['static']:.2f}x"
              f"  same lengths: {'yes' if np.array_equal(lengths['static'], lengths['continuous']) else 'NO'}")


if __name__ == "__main__":
    main()
