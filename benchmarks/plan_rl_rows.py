"""The realistic RL rows of docs/big_models.md: GRPO of 7-8B models at 256 and 1,024 rollout rows
× 2,048 tokens (1,024 prompt + 1,024 completion), groups of 8, on 16, 32 and 64 devices (fsdp),
full fine-tuning and LoRA r16 (q,k,v,o), before and after chunking, `--remat full --scan`.

"after" = one row per device per experience forward (`--experience-chunk DEVICES`) and per loss
micro-batch (`--accum-steps ROWS / DEVICES`), log-probs over 8,192-column vocabulary blocks.

    python benchmarks/plan_rl_rows.py [--out plans.jsonl]    # ~20 min on 2 cores; one plan per process

Prints one markdown row per plan (and appends its JSON to --out).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys

GIB = 1024 ** 3
MODELS = ("llama2_7b", "llama3_8b", "qwen2_7b")
ROWS = (256, 1024)
DEVICES = (16, 32, 64)
VOCAB_CHUNK = 8192


def plan(model: str, rows: int, devices: int, lora: int, chunked: bool) -> dict:
    """One `rlft plan --json` in a fresh process (the device count is fixed when JAX starts)."""
    command = [sys.executable, "-m", "rlft", "plan", "--model", model, "--devices", str(devices),
               "--mesh", f"fsdp={devices}", "--step", "grpo", "--batch", str(rows), "--length", "2048",
               "--new-tokens", "1024", "--group", "8", "--remat", "full", "--scan", "--json",
               "--lora", str(lora)]
    if chunked:
        command += ["--accum-steps", str(rows // devices), "--experience-chunk", str(devices),
                    "--vocab-chunk", str(VOCAB_CHUNK)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(command)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(p: dict) -> str:
    gib = lambda b: f"{b / GIB:.1f}"
    chunks = "rows 1/device, vocab 8192" if p["vocab_chunk"] else "-"
    fits = lambda memory: "yes" if p["total_bytes"] <= 0.9 * memory * GIB else "tight" if p["total_bytes"] <= memory * GIB else "no"
    return (f"| {p['model']} | {p['batch']} | {p['mesh']['fsdp']} | {p['lora_rank'] or '-'} | {chunks} | "
            f"{gib(p['argument_bytes'])} | {gib(p['temp_bytes'])} | **{gib(p['total_bytes'])}** | "
            f"{fits(40)} | {fits(80)} | {fits(141)} | {p['compile_seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="append each plan's JSON here")
    args = parser.parse_args()
    print("| model | rows | devices | lora | chunks | state (args) | temps | total | 40 GiB | 80 GiB | 141 GiB | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, rows, devices, lora, chunked in itertools.product(MODELS, ROWS, DEVICES, (0, 16), (False, True)):
        p = plan(model, rows, devices, lora, chunked)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(p) + "\n")
        print(row(p), flush=True)


if __name__ == "__main__":
    main()
