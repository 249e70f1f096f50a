"""Training tokens per second of the rlft SFT step beside PyTorch / transformers, same shape, same run.

rlft: `rlft.train.steps.sft_step` compiled with `rlft.train.steps.jit_step` on a 1-device mesh
(`make_mesh((1, 1, 1))`), AdamW from `rlft.train.steps.make_optimizer` (global-norm clipping 1.0, weight
decay 0.01), full-sequence loss (every token after the first of each row is a target), float32.
PyTorch: `transformers.GPT2LMHeadModel` in train mode with dropout 0 (resid/embd/attn_pdrop=0,
default attention implementation), `loss = model(input_ids, labels=input_ids).loss`, backward,
`clip_grad_norm_(1.0)`, `torch.optim.AdamW(weight_decay=0.01)`, `torch.set_num_threads(2)`. Both
start from the same random weights (built with transformers, imported with `load_hf_checkpoint`),
so their first losses agree; both see the same token batches.

Shapes: tiny = n_layer 4, n_head 4, n_embd 256, vocab 512, batch 32 x 64; small = GPT-2 small
(12 layers, 12 heads, 768, vocab 50257), batch 8 x 128.

Timing: after two warm-up repetitions each, repetitions alternate rlft, PyTorch, rlft, ... in one
process; each runs `--steps` optimizer steps and reports wall time per step. Every repetition also
records the CPU time other processes used meanwhile (from /proc/stat minus this process), so on a
shared machine the summary uses the "quiet" repetitions (other processes < 0.25 cores) when each
side has at least 3 of them, and all repetitions otherwise (said in the output). Compile time
(lower + compile of the step) is measured separately and excluded.

Model-FLOPs utilisation: (6 * N_matmul + 12 * n_layer * length * d_model) * tokens/s, where N_matmul
counts the weights used in matmuls (blocks + the tied LM head; embeddings and norms excluded) and the
second term the full (non-causal) T x T attention products, forward + backward; divided by a float32
matmul peak measured in the same run (best of several jnp.dot / torch.mm on 2048 and 4096 square
matrices).

The process's glibc allocator is tuned before JAX starts, as the `rlft` command does
(`rlft.host.tune_host_malloc`; `RLFT_MALLOC=default` leaves it alone): without it XLA:CPU
page-faults every step's temporary buffers anew.

    python benchmarks/sft_throughput.py                   # tiny and GPT-2 small shapes
    python benchmarks/sft_throughput.py --shape tiny --repeats 15
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time

from rlft.host import tune_host_malloc

MALLOC_TUNED = tune_host_malloc() if __name__ == "__main__" else False  # before torch/XLA threads start

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from host_load import QUIET_CORES, LoadMeter  # noqa: E402  (benchmarks/, this script's directory)
from rlft.train import steps  # noqa: E402
from rlft.models.decoder import Decoder  # noqa: E402
from rlft.models.hf import load_hf_checkpoint  # noqa: E402
from rlft.parallel.sharding import batch_sharding, make_mesh, shard_batch  # noqa: E402

SHAPES = {
    # name: (GPT-2 config, batch, length, default repeats, optimizer steps per repeat)
    "tiny": (dict(n_layer=4, n_head=4, n_embd=256, vocab_size=512, n_positions=256), 32, 64, 15, 3),
    "small": (dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024), 8, 128, 5, 1),
}
LR = 1e-4
WEIGHT_DECAY = 0.01
CLIP = 1.0


METER = LoadMeter()


def summarise(samples: dict[str, list[tuple[float, float]]], min_quiet: int = 3):
    """{side: median seconds}, and whether only quiet repetitions were used."""
    quiet = {k: [w for w, load in v if load < QUIET_CORES] for k, v in samples.items()}
    if all(len(q) >= min_quiet for q in quiet.values()):
        return {k: statistics.median(q) for k, q in quiet.items()}, True
    return {k: statistics.median(w for w, _ in v) for k, v in samples.items()}, False


def matmul_peaks(sizes=(2048, 4096), reps: int = 7) -> dict:
    """float32 GFLOP/s of one n x n x n matmul, best of `reps`: {('jax'|'torch', n): GFLOP/s}."""
    out = {}
    dot = jax.jit(jnp.dot)
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        dot(a, b).block_until_ready()
        ta, tb = torch.randn(n, n), torch.randn(n, n)
        torch.mm(ta, tb)
        jt, tt = [], []
        for _ in range(reps):  # alternate so both see the same machine load
            jt.append(METER.measure(lambda: dot(a, b).block_until_ready())[1])
            tt.append(METER.measure(lambda: torch.mm(ta, tb))[1])
        out["jax", n] = 2 * n**3 / min(jt) / 1e9
        out["torch", n] = 2 * n**3 / min(tt) / 1e9
    return out


def model_flops_per_token(cfg: dict, length: int) -> float:
    """6 * N_matmul + 12 * L * T * d: forward + backward FLOPs per trained token."""
    d, layers, vocab = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"]
    n_matmul = layers * 12 * d * d + d * vocab
    return 6 * n_matmul + 12 * layers * length * d


def full_sequence_batches(count: int, batch: int, length: int, vocab: int) -> list[dict]:
    """Random token rows with every position real and every token after the first a target."""
    rng = np.random.default_rng(0)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()
    loss_mask = np.ones((batch, length), np.float32)
    loss_mask[:, 0] = 0.0
    return [{"tokens": rng.integers(0, vocab, (batch, length)).astype(np.int32),
             "positions": positions, "segment_ids": np.ones((batch, length), np.int32),
             "loss_mask": loss_mask} for _ in range(count)]


def bench_shape(name: str, repeats: int, steps_per_rep: int, batch: int, length: int, peaks: dict) -> dict:
    hf_cfg, *_ = SHAPES[name]
    torch.manual_seed(0)
    config = transformers.GPT2Config(**hf_cfg, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        cfg, host_params = load_hf_checkpoint(tmp)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    host_batches = full_sequence_batches(4, batch, length, hf_cfg["vocab_size"])
    tokens_per_step = batch * length

    # --- rlft
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    tx = steps.make_optimizer(LR, warmup_steps=0, total_steps=10**6, weight_decay=WEIGHT_DECAY,
                              clip_norm=CLIP)
    state = steps.init_sharded_train_state(graphdef, jax.tree.map(jnp.asarray, host_params), tx, 0, mesh)
    del host_params
    batches = [shard_batch(b, mesh) for b in host_batches]
    step = steps.jit_step(steps.sft_step, jax.tree.map(lambda a: a.sharding, state),
                              jax.tree.map(lambda x: batch_sharding(mesh, x.ndim), host_batches[0]),
                              mesh, graphdef=graphdef, tx=tx, accum_steps=1)
    start = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    state, metrics = compiled(state, batches[0])
    first_loss_rlft = float(metrics["loss"])

    def run_rlft():
        nonlocal state
        for i in range(steps_per_rep):
            state, m = compiled(state, batches[i % len(batches)])
        jax.block_until_ready(m["loss"])

    # --- PyTorch
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    torch_batches = [torch.from_numpy(b["tokens"]).long() for b in host_batches]

    def torch_step(ids) -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first_loss_torch = torch_step(torch_batches[0])

    def run_torch():
        for i in range(steps_per_rep):
            torch_step(torch_batches[i % len(torch_batches)])

    for _ in range(2):  # warm-up (excluded): caches, allocator heap, PyTorch's lazy state
        run_rlft()
        run_torch()
    samples = {"rlft": [], "torch": []}
    faults = {"rlft": 0, "torch": 0}
    for _ in range(repeats):
        for side, fn in (("rlft", run_rlft), ("torch", run_torch)):
            faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            _, wall, load = METER.measure(fn)
            samples[side].append((wall / steps_per_rep, load))
            faults[side] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    faults = {k: v / (repeats * steps_per_rep) for k, v in faults.items()}
    med, quiet_only = summarise(samples)
    tps = {k: tokens_per_step / v for k, v in med.items()}
    flops = model_flops_per_token(hf_cfg, length)
    jax_peak = max(v for (lib, _), v in peaks.items() if lib == "jax")
    torch_peak = max(v for (lib, _), v in peaks.items() if lib == "torch")
    n_quiet = sum(load < QUIET_CORES for _, load in samples["rlft"] + samples["torch"])
    result = dict(shape=name, params_m=n_params / 1e6, batch=batch, length=length, repeats=repeats,
                  steps_per_rep=steps_per_rep, rlft=tps["rlft"], torch=tps["torch"],
                  ratio=tps["rlft"] / tps["torch"], compile_s=compile_s,
                  rlft_gflops=flops * tps["rlft"] / 1e9, torch_gflops=flops * tps["torch"] / 1e9,
                  mfu_rlft=flops * tps["rlft"] / 1e9 / jax_peak,
                  mfu_torch=flops * tps["torch"] / 1e9 / torch_peak, quiet_only=quiet_only,
                  first_loss=(first_loss_rlft, first_loss_torch))
    print(f"\n== {name}: {n_params / 1e6:.1f}M params, batch {batch} x {length} = {tokens_per_step} "
          f"tokens/step, {repeats} repeats x {steps_per_rep} steps, {flops / 1e6:.1f} MFLOP/token")
    print(f"   first-step loss: rlft {first_loss_rlft:.5f}, PyTorch {first_loss_torch:.5f}")
    if memory is not None:
        print(f"   XLA step memory: temp {memory.temp_size_in_bytes / 2**20:.0f} MiB, arguments "
              f"{memory.argument_size_in_bytes / 2**20:.0f} MiB; page faults per step: rlft "
              f"{faults['rlft']:,.0f}, PyTorch {faults['torch']:,.0f}")
    for side in ("rlft", "torch"):
        print(f"   {side:5s} {tps[side]:>9,.0f} tok/s  ({med[side] * 1e3:.1f} ms/step); ms/step "
              f"[other processes' cores]: " + ", ".join(
                  f"{w * 1e3:.0f} [{load:.1f}]" for w, load in samples[side]))
    print(f"   {'quiet' if quiet_only else 'ALL (too few quiet)'} repetitions used "
          f"({n_quiet} of {2 * repeats} quiet); ratio rlft/PyTorch {result['ratio']:.2f}x; rlft compile "
          f"{compile_s:.1f} s; MFU rlft {result['mfu_rlft']:.0%} of the jnp.dot peak, PyTorch "
          f"{result['mfu_torch']:.0%} of the torch.mm peak")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=("tiny", "small", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=0, help="default: 15 tiny, 5 small")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per repeat "
                        "(default: 3 tiny, 1 small)")
    parser.add_argument("--batch", type=int, default=0, help="rows (default: 32 tiny, 8 small)")
    parser.add_argument("--length", type=int, default=0, help="tokens per row (default: 64 tiny, "
                        "128 small)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}, {len(jax.devices())} device(s)), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}, {os.cpu_count()} CPUs; XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r}; malloc {'tuned' if MALLOC_TUNED else 'default'}; "
          f"load average {os.getloadavg()[0]:.2f}")
    peaks = matmul_peaks()
    print("float32 matmul peak (best of 7), GFLOP/s: " + ", ".join(
        f"{'jnp.dot' if lib == 'jax' else 'torch.mm'} {n}: {v:.0f}" for (lib, n), v in sorted(peaks.items())))
    shapes = ["tiny", "small"] if args.shape == "both" else [args.shape]
    results = []
    for name in shapes:
        _, batch, length, repeats, steps_per_rep = SHAPES[name]
        results.append(bench_shape(name, args.repeats or repeats, args.steps or steps_per_rep,
                                   args.batch or batch, args.length or length, peaks))
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}; malloc "
          f"{'tuned' if MALLOC_TUNED else 'default'}")
    print("\n| shape | batch | rlft tok/s | PyTorch tok/s | rlft/PyTorch | rlft compile s | "
          "rlft GFLOP/s (MFU vs jnp.dot) | PyTorch GFLOP/s (MFU vs torch.mm) | reps used |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['shape']} ({r['params_m']:.1f}M) | {r['batch']} x {r['length']} | {r['rlft']:,.0f} | "
              f"{r['torch']:,.0f} | {r['ratio']:.2f}x | {r['compile_s']:.1f} | "
              f"{r['rlft_gflops']:.0f} ({r['mfu_rlft']:.0%}) | {r['torch_gflops']:.0f} ({r['mfu_torch']:.0%}) | "
              f"{'quiet' if r['quiet_only'] else 'all'} |")
    print("matmul peak GFLOP/s: " + ", ".join(
        f"{'jnp.dot' if lib == 'jax' else 'torch.mm'} {n}: {v:.0f}" for (lib, n), v in sorted(peaks.items())))


if __name__ == "__main__":
    main()
