"""New tokens per second of `rlft.generate.sampling.sample` beside transformers' PyTorch `generate`.

Both sides run the same GPT-2-layout weights (random, built with transformers and imported with
`load_hf_checkpoint`) on the same batch of prompts, produce exactly `--new-tokens` tokens (no EOS),
and alternate A, B, A, B in one process; medians and the ratio rlft / PyTorch are printed.
PyTorch uses its KV cache and `torch.set_num_threads(2)`. glibc's allocator is tuned for both, as the
`rlft` command does (`rlft.host.tune_host_malloc`; `RLFT_MALLOC=default` leaves it alone).

rlft runs twice: on one device, and with the batch sharded over `--host-devices` (default 2) CPU
devices (`--xla_force_host_platform_device_count`), i.e. data parallel over the cores. A small
model's decode step is a chain of latency-bound ops that a single XLA:CPU program cannot spread
over two cores; two independent half-batch programs can.

    python benchmarks/sampling.py                    # tiny and GPT-2 small shapes
    python benchmarks/sampling.py --shapes tiny --reps 9
    python benchmarks/sampling.py --host-devices 1   # one CPU device: no batch-sharded run
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import sys
import tempfile
import time

from rlft.host import force_host_devices, tune_host_malloc

MALLOC_TUNED = False
if __name__ == "__main__":  # before torch and XLA start their threads and devices
    MALLOC_TUNED = tune_host_malloc()
    force_host_devices(sys.argv)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from rlft.models.decoder import Decoder  # noqa: E402
from rlft.models.hf import load_hf_checkpoint  # noqa: E402
from rlft.generate.sampling import SamplingParams, _sample_jit, sample  # noqa: E402
from rlft.parallel.sharding import make_mesh, replicated  # noqa: E402

SHAPES = {
    "tiny": {"n_layer": 4, "n_head": 4, "n_embd": 256, "vocab_size": 512, "n_positions": 256},
    "gpt2-small": {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "n_positions": 1024},
}


def rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(shape: str, tmp: str):
    """(torch model, rlft graphdef, rlft params) with identical random weights."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPES[shape])).eval()
    hf.save_pretrained(tmp)
    cfg, params = load_hf_checkpoint(tmp)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    return hf, graphdef, params


def bench_shape(shape: str, reps: int, batch: int, prompt_len: int, new_tokens: int, modes: list[str]):
    with tempfile.TemporaryDirectory() as tmp:
        hf, graphdef, params = build(shape, tmp)
    vocab = SHAPES[shape]["vocab_size"]
    prompts = np.random.RandomState(0).randint(0, vocab, (batch, prompt_len)).astype(np.int32)
    mask = np.ones_like(prompts)
    torch_prompts, torch_mask = torch.from_numpy(prompts).long(), torch.from_numpy(mask).long()
    print(f"\n== {shape}: {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M params, "
          f"{batch} prompts x {prompt_len} tokens, {new_tokens} new tokens, {reps} reps; "
          f"RSS after loading {rss_mib():.0f} MiB")
    for mode in modes:
        sampling = SamplingParams(temperature=0.0 if mode == "greedy" else 1.0)
        gen_cfg = transformers.GenerationConfig(
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=mode != "greedy",
            temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0, use_cache=True)

        def run_rlft(seed: int, sampling=sampling, mesh=None, params=params):
            out = sample(graphdef, params, prompts, mask, jax.random.key(seed),
                         max_new_tokens=new_tokens, eos_id=-1, pad_id=0, sampling=sampling, mesh=mesh)
            out.tokens.block_until_ready()
            assert int(out.lengths.min()) == new_tokens
            return out

        def run_torch(seed: int, gen_cfg=gen_cfg):
            torch.manual_seed(seed)
            with torch.inference_mode():
                out = hf.generate(input_ids=torch_prompts, attention_mask=torch_mask,
                                  generation_config=gen_cfg)
            assert out.shape[1] == prompt_len + new_tokens, out.shape
            return out

        runs = {"rlft": run_rlft, "torch": run_torch}
        sharded = f"rlft x{jax.device_count()}"
        if jax.device_count() > 1:  # the batch over all host devices, parameters replicated
            mesh = make_mesh((-1, 1, 1))
            runs[sharded] = functools.partial(run_rlft, mesh=mesh,
                                              params=jax.device_put(params, replicated(mesh)))
        first_call, firsts = {}, {}
        for name in (n for n in runs if n != "torch"):
            start = time.perf_counter()
            firsts[name] = runs[name](0)
            first_call[name] = time.perf_counter() - start
        compiled = _sample_jit.lower(
            graphdef, params, prompts, mask, jax.random.key(0), np.int32(-1), np.int32(0),
            max_new_tokens=new_tokens, sampling=sampling, mesh=None).compile()
        mem = compiled.memory_analysis()
        run_torch(0)  # warm-up
        if mode == "greedy":  # same weights, same argmax: the tokens should agree
            ref = run_torch(0)[:, prompt_len:].numpy()
            agree = {k: float(np.mean(np.asarray(v.tokens) == ref)) for k, v in firsts.items()}
        times = {name: [] for name in runs}
        for rep in range(reps):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn(rep + 1)
                times[name].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        tps = {k: batch * new_tokens / v for k, v in med.items()}
        best = {k: batch * new_tokens / min(v) for k, v in times.items()}
        print(f"[{shape} {mode}] PyTorch generate {tps['torch']:,.0f} new tok/s; 1-min load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        for name in (n for n in runs if n != "torch"):
            where = "one device" if name == "rlft" else f"batch over {jax.device_count()} host devices"
            print(f"    {name} ({where}): {tps[name]:,.0f} new tok/s, ratio "
                  f"{tps[name] / tps['torch']:.2f}x (best of {reps}: {best[name] / best['torch']:.2f}x); "
                  f"compile ~{first_call[name] - med[name]:.1f} s (first call {first_call[name]:.1f} s)")
        print("    medians per batch: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in med.items()) +
              "; all: " + "; ".join(f"{k} {[round(t * 1e3) for t in v]}" for k, v in times.items()))
        if mem is not None:
            print(f"    XLA sampler memory (one device): args {mem.argument_size_in_bytes / 2**20:.1f} MiB, "
                  f"outputs {mem.output_size_in_bytes / 2**20:.2f} MiB, "
                  f"temp {mem.temp_size_in_bytes / 2**20:.1f} MiB; process peak RSS {rss_mib():.0f} MiB")
        if mode == "greedy":
            print("    greedy tokens equal to PyTorch's: " + ", ".join(f"{k} {v:.1%}" for k, v in agree.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="tiny,gpt2-small")
    parser.add_argument("--modes", default="greedy,sample")
    parser.add_argument("--reps", type=int, default=0, help="default: 7 tiny, 3 gpt2-small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--host-devices", type=int, default=2,
                        help="CPU devices for the batch-sharded rlft run (1 = skip it)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
          f"transformers {transformers.__version__}, torch threads {torch.get_num_threads()}; "
          f"malloc {'tuned' if MALLOC_TUNED else 'default'}")
    for shape in args.shapes.split(","):
        reps = args.reps or (7 if shape == "tiny" else 3)
        bench_shape(shape, reps, args.batch, args.prompt_len, args.new_tokens, args.modes.split(","))


if __name__ == "__main__":
    main()
