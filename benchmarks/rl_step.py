"""Seconds per RL optimizer step of rlft beside its peers (trl, Tunix), on the same workload, in the same run.

The workload (benchmarks/peers/workload.py, shared by every side): a tiny random GPT-2 (4 layers x
4 heads x d 256, vocab 512, n_positions 256, tied head), a byte-level BPE tokenizer of 512 ids
trained locally, 64 prompts of exactly 16 tokens. One step = 4 prompts x 8 completions = 32
completions, up to 48 new tokens, temperature 1 (no top-k / top-p), reward = number of letters 'a'
in the completion text (a Python function), learning rate 1e-5, one update per rollout. Step time
is the wall time between consecutive optimizer steps; the first ``--skip`` steps (compilation,
warm-up) are left out and the median of the rest is reported.

Rows (``--algorithms``) and their peers (``--peers``, default ``trl,tunix``):

- ``grpo``: one row per ``--beta`` value (default 0 and 0.04), two peers run in the same run:
  trl 1.16 ``GRPOTrainer`` with its defaults otherwise (gradient checkpointing on, loss ``dapo``;
  beta > 0 adds the reference model's forward), and Tunix 0.1.7 ``GRPOLearner`` (JAX; its Qwen2
  class at the tiny GPT-2's shape, GPT-2-style init, since Tunix has no GPT-2 class; AdamW with
  weight decay 0.01, the vanilla rollout engine colocated with the trainer; beta > 0 adds its
  reference forward; benchmarks/peers/tunix_grpo.py).
- ``rloo``: trl 1.16 ``RLOOTrainer`` defaults (beta 0.05: old and reference log-prob forwards).
- ``ppo``: trl 1.12 ``trl.experimental.ppo.PPOTrainer`` (the last trl that has it). One "step" is
  one PPO update: 32 rollouts (32 different prompts, one completion each), 4 PPO epochs over them
  as 1 minibatch (4 AdamW steps), a random tiny ``GPT2ForSequenceClassification`` as reward model
  and another as value model, kl_coef 0.05. Compare per update; ``--ppo-steps`` updates are run.

The RLOO and PPO rows keep trl only. Tunix 0.1.7 has no RLOO trainer: only an ``"rloo"``
advantage estimator that its GRPO learner can be configured with, which keeps the KL as a loss
term (trl's RLOO puts a beta 0.05 k1 penalty into the reward). Its ``PPOLearner`` (GAE, KL in
the reward) needs a critic, an nnx model returning per-token values, and Tunix 0.1.7 ships no
value- or score-head model (trl's row also scores with a reward model); the PPO row would need
Tunix-side models written for the benchmark, and the anchors (shared/anchors) measured Tunix on
GRPO only.

Each peer runs in its own virtual environment, created on first use under the user cache
(``~/.cache/rlft/bench/trl-1.16``: torch 2.13.0 + trl 1.16.0; ``~/.cache/rlft/bench/trl-1.12``:
torch 2.13.0 + trl 1.12.0; ``~/.cache/rlft/bench/tunix-0.1.7``: google-tunix 0.1.7, jax/jaxlib
0.10.2, flax 0.12.8, no torch; see benchmarks/peers/envs.py; the first run spends a few minutes
installing). A peer is a subprocess (benchmarks/peers/trl_grpo_rloo.py, trl_ppo.py,
tunix_grpo.py) that prints one ``RESULT {json}`` line; ``--threads`` is trl's torch thread count
and the number of CPUs the Tunix process is pinned to (XLA:CPU sizes its pools from them; Tunix
runs on one CPU device whatever ``--host-devices`` says). rlft runs in this process
(`rlft_rl_step`). Every side gets glibc's allocator tuned as the ``rlft`` command does
(``rlft.host.tune_host_malloc`` here, the equivalent ``MALLOC_*`` variables for the peers;
``RLFT_MALLOC=default`` leaves them all alone).

Breakdown (medians over the measured steps, seconds; the peer scripts' docstrings say exactly
which trl / Tunix methods are timed):

- ``sampling_s``: generating the completions (trl: tokenising, ``generate``, decoding; Tunix:
  ``rl_cluster.generate``);
- ``logprobs_s``: no-grad forwards for old / reference log-probs (PPO: reference only, the old
  log-probs come from the sampling logits);
- ``reward_s``: the reward (GRPO/RLOO: the Python function; PPO: value- and reward-model forwards);
- ``scoring_s``: everything between sampling and the update (includes logprobs_s and reward_s,
  plus advantages and bookkeeping);
- ``update_s``: the rest of the step: loss forward and backward, clipping, AdamW, logging
  (PPO: all 4 epochs; Tunix: ``rl_cluster.update_actor``).

Machines here are noisy (10-30% between runs minutes apart); only the ratios of one run mean
anything. Each run also reports how many cores other processes used meanwhile ("other load"): on
a busy machine trl's two OpenMP threads slow down far more than XLA does, so figures taken with
other load above ~0.25 cores are not comparable. ``--rounds N`` repeats every row N times,
alternating the order of the sides (peers and rlft variants; reversed every other round), and
reports the median of the per-round medians.

    python benchmarks/rl_step.py                                   # all rows, 16 steps (PPO: 10 updates)
    python benchmarks/rl_step.py --algorithms grpo --beta 0 --steps 8 --skip 2
    python benchmarks/rl_step.py --no-peers --algorithms rloo      # rlft only
    python benchmarks/rl_step.py --peers trl --algorithms grpo     # trl as the only peer
    python benchmarks/rl_step.py --no-rlft --steps 4 --ppo-steps 3 # peers only (e.g. to check them)
    python benchmarks/rl_step.py --algorithms ppo --rounds 3 --json /tmp/rl_step.json
    python benchmarks/peers/envs.py                                # only create the peer environments

Targets: rlft's step time <= 0.5 x trl's on every row, <= 0.6 x Tunix's on the GRPO rows.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlft.host import OPT_OUT_ENV, force_host_devices, tune_host_malloc

MALLOC_TUNED = False
if __name__ == "__main__":  # before XLA starts its threads and devices
    MALLOC_TUNED = tune_host_malloc()
    force_host_devices(sys.argv, default=1)

PEERS_DIR = Path(__file__).resolve().parent / "peers"
sys.path.insert(0, str(PEERS_DIR))

import envs  # noqa: E402
from host_load import QUIET_CORES, LoadMeter  # noqa: E402
import workload  # noqa: E402

PEERS = ("trl", "tunix")  # in the order their columns are printed
TARGET_RATIO = {"trl": 0.5, "tunix": 0.6}  # rlft time / peer time
PEER_ALGORITHMS = {"trl": ("grpo", "rloo", "ppo"), "tunix": ("grpo",)}  # rows each peer can run (docstring)
RLOO_BETA = 0.05  # trl 1.16 RLOOConfig.beta default: the RLOO row runs trl's defaults
PPO_KL_COEF = 0.05  # trl 1.12 PPOConfig.kl_coef default
BREAKDOWN_KEYS = ("sampling_s", "logprobs_s", "reward_s", "scoring_s", "update_s")
# glibc settings equivalent to rlft.host.tune_host_malloc, for a peer process started by us
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
              "MALLOC_TRIM_THRESHOLD_": str(1 << 40), "MALLOC_TOP_PAD_": str(64 << 20)}


# --------------------------------------------------------------------------------------------
# The workload, rlft's side
# --------------------------------------------------------------------------------------------

def rlft_workload() -> dict:
    """The tokenizer and prompts the peers use, for rlft's side of the benchmark.

    Returns ``{"tokenizer", "prompts" (64 texts), "prompt_ids" (int32 [64, 16]), "reward_fn"
    (texts -> list of floats), "model_config" (GPT2Config kwargs), "digest"}``. The tokenizer is
    built exactly as the peer scripts build it (benchmarks/peers/workload.py), so both sides see
    the same ids; ``digest`` is compared with the one each peer reports.
    """
    import numpy as np

    tok, prompts = workload.build_workload()
    ids = np.asarray([tok(p)["input_ids"] for p in prompts], dtype=np.int32)
    assert ids.shape == (workload.NUM_PROMPTS, workload.PROMPT_TOKENS), ids.shape
    return {"tokenizer": tok, "prompts": prompts, "prompt_ids": ids, "reward_fn": workload.reward_count_a,
            "model_config": dict(workload.TINY_GPT2, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
            "digest": workload.workload_digest(tok, prompts)}


# --------------------------------------------------------------------------------------------
# rlft's side of a row
# --------------------------------------------------------------------------------------------

def rlft_rl_step(algorithm: str, beta: float, steps: int, skip: int, staleness: int = 0,
                 rollout_devices: int = 0, rollout_slots: int = 0) -> dict:
    """Run ``steps`` RL optimizer steps of rlft on the workload and time them.

    staleness: rl.max_staleness (asynchronous RL; 0 = the synchronous step); rollout_devices: that
    many of this process's devices (the last ones) hold the sampler, the others the trainer
    (mesh.rollout; 0 = colocated); rollout_slots: rl.rollout_slots (the continuous-batching engine).
    The asynchronous step reports no breakdown.

    The step is the RL stage's own (`rlft.rl.stage.make_rl_step`: jitted rollout -> host decode and
    reward -> jitted `pg_step`), on a mesh over this process's CPU devices (``--host-devices``).
    Settings follow the peer's row: GRPO with KL ``beta`` as a k3 loss term and token-mean
    aggregation (trl's "dapo"); RLOO with trl's beta 0.05 in the reward; PPO as trl 1.12 runs it
    (32 prompts x 1 completion, 4 epochs x 1 minibatch, old logprobs from the sampler, a separate
    critic from the policy, and a random tiny reward model scoring prompt + completion, like trl's). Returns ``median_step_s``,
    ``step_s`` and ``breakdown`` (sampling_s: the jitted sampler; reward_s == scoring_s: decoding
    and the reward; update_s: the jitted step, reference / old logprobs, values and advantages
    included; logprobs_s is not separable there and is left out).
    """
    import jax
    import numpy as np
    from flax import nnx

    from rlft.data.loader import epoch_batches
    from rlft.models import Decoder, ModelConfig, ScalarModel, positions_from_mask
    from rlft.rl.config import resolve_pg_config, rl_stage_config
    from rlft.rl.stage import make_rl_step, pg_state_program, prompt_batch
    from rlft.parallel.sharding import make_mesh, rollout_mesh, shard_batch, sharded_init
    from rlft.train.steps import make_optimizer
    from rlft.train.warm_start import scalar_model_from_lm

    w = rlft_workload()
    tok = w["tokenizer"]
    shape = workload.TINY_GPT2
    cfg = ModelConfig.gpt2(vocab_size=shape["vocab_size"], d_model=shape["n_embd"], n_layers=shape["n_layer"],
                           n_heads=shape["n_head"], max_positions=shape["n_positions"])
    mesh_section = {"data": -1, "fsdp": 1, "tensor": 1, "rollout": rollout_devices}
    mesh, sampler_mesh = make_mesh(mesh_section), rollout_mesh(mesh_section)
    graphdef, params = sharded_init(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), mesh)
    ppo = algorithm == "ppo"
    overrides = dict(loss_aggregation="token-mean") if algorithm == "grpo" else {}
    if ppo:  # trl 1.12's PPO takes the old logprobs from its sampling logits, as "sampler" does
        overrides.update(epochs=4, minibatches=1, old_logprobs="sampler")
    section = rl_stage_config(steps=steps, prompts_per_step=32 if ppo else workload.PROMPTS_PER_STEP,
                              group_size=1 if ppo else workload.GROUP_SIZE,
                              learning_rate=workload.LEARNING_RATE, max_new_tokens=workload.MAX_NEW_TOKENS,
                              algorithm=algorithm, temperature=workload.TEMPERATURE, max_staleness=staleness,
                              rollout_slots=rollout_slots, **overrides)
    section.kl.coef = beta
    config = resolve_pg_config(section, eos_id=tok.eos_token_id)
    prompts = [{"ids": row.tolist(), "text": text} for row, text in zip(w["prompt_ids"], w["prompts"])]
    if ppo:  # a random reward model, as trl's PPO row has (prompt + completion through a GPT-2 scorer)
        rm_graphdef, rm_params = sharded_init(lambda: ScalarModel(cfg, rngs=nnx.Rngs(2), head_init_std=0.02), mesh)
        rm_forward = jax.jit(lambda p, t, m: nnx.merge(rm_graphdef, p)(t, positions_from_mask(m), m))

        def reward_fn(texts, records):
            ids = [r["ids"] + tok(t, add_special_tokens=False)["input_ids"] for t, r in zip(texts, records)]
            width = 16 + workload.MAX_NEW_TOKENS
            tokens = np.full((len(ids), width), tok.pad_token_id, np.int32)
            mask = np.zeros((len(ids), width), np.int32)
            for i, row in enumerate(ids):
                row = row[:width]
                tokens[i, :len(row)], mask[i, :len(row)] = row, 1
            scores = np.asarray(rm_forward(rm_params, tokens, mask))
            return scores[np.arange(len(ids)), mask.sum(-1) - 1]
    else:
        reward_fn = lambda texts, records: np.asarray(w["reward_fn"](texts), np.float32)

    total_updates = steps * config.epochs * config.minibatches
    tx = make_optimizer(workload.LEARNING_RATE, 0, total_updates)
    critic_graphdef = critic_params = critic_tx = None
    if config.critic == "separate":
        critic_graphdef, critic_params = scalar_model_from_lm(cfg, params, mesh, seed=1)
        critic_tx = make_optimizer(workload.LEARNING_RATE, 0, total_updates)
    width = workload.PROMPT_TOKENS
    rows = section.prompts_per_step * config.group_size
    _, shardings, initial, ops = pg_state_program(config, graphdef, params, None, critic_params, tx, critic_tx, 0,
                                                  mesh, rows=rows, width=width, pad_id=tok.pad_token_id)
    state = initial()
    timings: dict[str, list[float]] = {}
    host_batch = lambda indices: prompt_batch(prompts, indices, config.group_size, width, tok.pad_token_id)
    prompts_at = lambda position: host_batch(next(epoch_batches(len(prompts), section.prompts_per_step, seed=0,
                                                                start_index=position))[1])
    step = make_rl_step(config=config, graphdef=graphdef, shardings=shardings, prompts=prompts,
                        reward_fn=reward_fn, tokenizer=tok, mesh=mesh, pad_id=tok.pad_token_id, tx=tx, critic_graphdef=critic_graphdef,
                        critic_tx=critic_tx, reference=params if config.uses_reference else None,
                        timings=timings, prompts_at=prompts_at, pending_ops=ops, rollout_mesh=sampler_mesh)
    step_s, step_cpu_s, lengths, scores = [], [], [], []
    batches = epoch_batches(len(prompts), section.prompts_per_step, seed=0)
    for _ in range(steps):
        _, indices = next(batches)
        batch = shard_batch(host_batch(indices), mesh)
        start, cpu_start = time.perf_counter(), time.process_time()
        state, metrics = step(state, batch)
        jax.block_until_ready(state)
        step_s.append(time.perf_counter() - start)
        step_cpu_s.append(time.process_time() - cpu_start)
        lengths.append(float(metrics["completions/mean_length"]))
        scores.append(float(metrics["objective/scores"]))
    breakdown = {key: statistics.median(timings[key][skip:]) for key in ("sampling_s", "reward_s", "update_s")
                 if timings.get(key)}
    if "reward_s" in breakdown:
        breakdown["scoring_s"] = breakdown["reward_s"]
    cores = lambda cpu, wall: statistics.median(c / w for c, w in zip(cpu[skip:], wall[skip:]))
    phase_cores = {key: cores(timings[key[:-2] + "_cpu_s"], timings[key]) for key in ("sampling_s", "reward_s", "update_s")
                   if timings.get(key)}
    return {"median_step_s": statistics.median(step_s[skip:]), "step_s": [round(x, 4) for x in step_s],
            "step_cores": cores(step_cpu_s, step_s), "phase_cores": phase_cores,
            "steps": steps, "breakdown": breakdown, "mean_completion_length": statistics.mean(lengths),
            "scores_first_last": [scores[0], scores[-1]], "devices": len(jax.devices()),
            "kl_coef": config.kl_coef, "jax": jax.__version__}


# --------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------

def peer_command(peer: str, algorithm: str, beta: float, steps: int, skip: int,
                 threads: int) -> tuple[str, list[str]]:
    """(environment name, script arguments) of ``peer``'s run matching a row."""
    common = ["--steps", str(steps), "--skip", str(skip), "--threads", str(threads)]
    if peer == "tunix" and algorithm == "grpo":
        return "tunix-0.1.7", [str(PEERS_DIR / "tunix_grpo.py"), "--beta", str(beta), *common]
    if peer == "trl" and algorithm == "grpo":
        return "trl-1.16", [str(PEERS_DIR / "trl_grpo_rloo.py"), "--trainer", "grpo", "--beta", str(beta), *common]
    if peer == "trl" and algorithm == "rloo":  # trl's defaults, beta included
        return "trl-1.16", [str(PEERS_DIR / "trl_grpo_rloo.py"), "--trainer", "rloo", *common]
    if peer == "trl" and algorithm == "ppo":
        return "trl-1.12", [str(PEERS_DIR / "trl_ppo.py"), *common]
    raise ValueError(f"no {peer} run for algorithm {algorithm!r}")


def peer_environment() -> dict:
    """Environment of a peer subprocess: ours, minus PYTHONPATH, plus the allocator settings."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if os.environ.get(OPT_OUT_ENV) != "default":
        env.update(MALLOC_ENV)
    return env


def run_peer(peer: str, algorithm: str, beta: float, steps: int, skip: int, threads: int, log_dir: Path,
             tag: str) -> dict:
    """Run one peer subprocess, return its RESULT (raises RuntimeError with its output's tail on failure)."""
    env_name, argv = peer_command(peer, algorithm, beta, steps, skip, threads)
    python = envs.ensure_env(env_name)
    log_path = log_dir / f"{tag}.log"
    with open(log_path, "w") as log:
        proc = subprocess.run([str(python), *argv], stdout=log, stderr=subprocess.STDOUT,
                              env=peer_environment(), cwd=str(PEERS_DIR))
    output = log_path.read_text()
    results = [line[len(workload.RESULT_PREFIX):] for line in output.splitlines()
               if line.startswith(workload.RESULT_PREFIX)]
    if proc.returncode != 0 or len(results) != 1:
        tail = "\n".join(output.splitlines()[-30:])
        raise RuntimeError(f"peer {tag} failed (exit {proc.returncode}, {len(results)} RESULT lines); "
                           f"log {log_path}:\n{tail}")
    result = json.loads(results[0])
    result["log"] = str(log_path)
    return result


def parse_peers(text: str) -> list[str]:
    """The peers named in a comma-separated ``--peers`` value, in PEERS order (SystemExit on an unknown one)."""
    names = {p.strip() for p in text.split(",") if p.strip()}
    unknown = names - set(PEERS)
    if unknown:
        raise SystemExit(f"unknown peer(s) {', '.join(sorted(unknown))} (known: {', '.join(PEERS)})")
    return [p for p in PEERS if p in names]


def row_peers(peers: list[str], algorithm: str) -> list[str]:
    """The chosen peers that have a trainer for ``algorithm``."""
    return [p for p in peers if algorithm in PEER_ALGORITHMS[p]]


def check_peer_result(row: dict, peer: str, result: dict, digest: str) -> None:
    """Note on the row when a peer built another workload or ran another KL coefficient than the row's."""
    if result.get("workload_digest") != digest:
        row["notes"].append(f"{peer} workload digest {result.get('workload_digest')} != {digest}")
    peer_beta = result.get("beta", result.get("kl_coef"))
    if peer_beta is not None and abs(peer_beta - row["beta"]) > 1e-12:
        row["notes"].append(f"{peer} ran with KL coefficient {peer_beta}, the row says {row['beta']}")


# --------------------------------------------------------------------------------------------
# Load, rows, table
# --------------------------------------------------------------------------------------------

def plan_rows(algorithms: list[str], betas: list[float]) -> list[dict]:
    """One row per (algorithm, KL coefficient) in the order asked for."""
    rows = []
    for algorithm in algorithms:
        if algorithm == "grpo":
            rows += [{"algorithm": "grpo", "beta": b, "name": f"GRPO beta={b:g}"} for b in betas]
        elif algorithm == "rloo":
            rows.append({"algorithm": "rloo", "beta": RLOO_BETA, "name": f"RLOO beta={RLOO_BETA:g}"})
        elif algorithm == "ppo":
            rows.append({"algorithm": "ppo", "beta": PPO_KL_COEF, "name": f"PPO kl={PPO_KL_COEF:g} (per update)"})
        else:
            raise SystemExit(f"unknown algorithm {algorithm!r} (grpo, rloo, ppo)")
    return rows


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec: str = ".3f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def summarise_side(runs: list[dict]) -> dict | None:
    """Median over rounds of one side's step median and breakdown (None if no run succeeded)."""
    ok = [r for r in runs if r.get("median_step_s") is not None]
    if not ok:
        return None
    return {"median_step_s": median_or_none(r["median_step_s"] for r in ok),
            "breakdown": {k: median_or_none(r.get("breakdown", {}).get(k) for r in ok) for k in BREAKDOWN_KEYS},
            "other_load": max(r.get("other_load", 0.0) for r in ok), "steps": ok[0].get("steps"), "rounds": len(ok),
            "step_cores": median_or_none(r.get("step_cores") for r in ok),
            "phase_cores": {k: median_or_none(r.get("phase_cores", {}).get(k) for r in ok)
                            for k in ("sampling_s", "reward_s", "update_s")}}


def peer_ratio(row: dict, peer: str, side: str = "rlft") -> float | None:
    """``side``'s median step time over ``peer``'s on ``row`` (None when either is missing)."""
    theirs, ours = row["summary"].get(peer), row["summary"].get(side)
    return ours["median_step_s"] / theirs["median_step_s"] if theirs and ours else None


def peer_cell(row: dict, peer: str, value, spec: str = ".3f") -> str:
    """A table cell about ``peer``: "n/a" where it has no trainer for the row, "-" where it did not run."""
    return fmt(value, spec) if peer in row["runs"] else "n/a"


def print_table(rows: list[dict], peers: list[str]) -> None:
    """Step times, the ratio of rlft to each peer with its target, and every side's breakdown."""
    targets = ", ".join(f"rlft/{p} <= {TARGET_RATIO[p]}" for p in peers)
    print("\n== RL step: seconds per optimizer step (PPO: per update), medians; ratio = rlft / peer"
          + (f"; targets {targets}" if peers else ""))
    sides = [*peers, "rlft"]
    header = (f"{'row':<26} " + " ".join(f"{p + ' s/step':>12}" for p in sides) + " "
              + " ".join(f"{'rlft/' + p:>10} {'<= ' + format(TARGET_RATIO[p], 'g'):>8}" for p in peers)
              + f"  other load ({' / '.join(sides)})")
    print(header)
    print("-" * len(header))
    for row in rows:
        summary = row["summary"]
        times = [peer_cell(row, p, summary.get(p) and summary[p]["median_step_s"]) for p in peers]
        times.append(fmt(summary.get("rlft") and summary["rlft"]["median_step_s"]))
        ratios = []
        for p in peers:
            ratio = peer_ratio(row, p)
            verdict = "-" if ratio is None else ("met" if ratio <= TARGET_RATIO[p] else "NOT met")
            ratios.append(f"{peer_cell(row, p, ratio, '.2f'):>10} {verdict if p in row['runs'] else 'n/a':>8}")
        loads = [peer_cell(row, p, summary.get(p) and summary[p]["other_load"], ".2f") for p in peers]
        loads.append(fmt(summary.get("rlft") and summary["rlft"]["other_load"], ".2f"))
        print(f"{row['name']:<26} " + " ".join(f"{t:>12}" for t in times) + " " + " ".join(ratios)
              + f"  {' / '.join(loads)} cores")
        for note in row.get("notes", []):
            print(f"{'':<26} note: {note}")
    print("\nBreakdown (medians, s): " + " / ".join(BREAKDOWN_KEYS))
    for row in rows:
        for side in sides:
            if side != "rlft" and side not in row["runs"]:
                continue
            summary = row["summary"].get(side)
            parts = " / ".join(fmt(summary["breakdown"].get(k)) for k in BREAKDOWN_KEYS) if summary else "-"
            print(f"  {row['name']:<26} {side:<6} {parts}")


VARIANTS = {"rlft": {}, "rlft-k1": dict(staleness=1), "rlft-k1-split": dict(staleness=1, rollout_devices=1),
            "rlft-k1-split-engine": dict(staleness=1, rollout_devices=1, rollout_slots=workload.GROUP_SIZE * 2)}
VARIANT_HELP = {"rlft": "the synchronous step", "rlft-k1": "asynchronous, rl.max_staleness=1, colocated",
                "rlft-k1-split": "asynchronous K=1, the sampler on the last device (needs --host-devices 2)",
                "rlft-k1-split-engine": "the same, sampling with the continuous-batching engine "
                                        "(rl.rollout_slots = 2 groups)"}


def print_cpu_use(rows: list[dict]) -> None:
    """Cores each rlft variant kept busy (process CPU time / wall time, XLA's threads included): over
    the whole step, and per phase for the synchronous step (whose phases are timed one by one).
    A phase near the machine's core count leaves nothing for another phase to overlap with."""
    lines = []
    for row in rows:
        for name in VARIANTS:
            ours = row["summary"].get(name)
            if not ours or ours.get("step_cores") is None:
                continue
            phases = ", ".join(f"{k[:-2]} {fmt(v, '.2f')}" for k, v in ours["phase_cores"].items() if v is not None)
            lines.append(f"  {row['name']:<26} {name:<20} step {fmt(ours['step_cores'], '.2f')}"
                         + (f"; {phases}" if phases else ""))
    if lines:
        print(f"\nCPU use of rlft (cores busy = process CPU time / wall time; this machine has {os.cpu_count()} CPUs)")
        print("\n".join(lines))


def print_variants(rows: list[dict], peers: list[str]) -> None:
    """Each rlft variant's step time and its ratio to each peer's and to the synchronous step."""
    lines = []
    for row in rows:
        for name in VARIANTS:
            ours = row["summary"].get(name)
            if name == "rlft" or not ours:
                continue
            to_peers = "".join(f"/{p} {fmt(peer_ratio(row, p, name), '.2f')}, " for p in peers if p in row["runs"])
            lines.append(f"  {row['name']:<26} {name:<20} {fmt(ours['median_step_s'])} s/step, "
                         f"{to_peers}/synchronous {fmt(peer_ratio(row, 'rlft', name), '.2f')}")
    if lines:
        print("\nAsynchronous variants (" + "; ".join(f"{k}: {v}" for k, v in VARIANT_HELP.items()) + ")")
        print("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def side_call(side: str, row: dict, steps: int, a: argparse.Namespace, log_dir: Path, tag: str):
    """A no-argument callable running one side (a peer or an rlft variant) of ``row`` once."""
    if side in PEERS:
        return functools.partial(run_peer, side, row["algorithm"], row["beta"], steps, a.skip, a.threads, log_dir, tag)
    return functools.partial(rlft_rl_step, row["algorithm"], row["beta"], steps, a.skip, **VARIANTS[side])


def run_row(row: dict, peers: list[str], a: argparse.Namespace, meter: LoadMeter, log_dir: Path,
            digest: str) -> None:
    """Run every side of ``row`` ``a.rounds`` times, the order of the sides reversed every other round.

    Fills ``row["runs"]`` (side -> list of results), ``row["notes"]`` and ``row["summary"]``.
    """
    variants = [v for v in a.variants.split(",") if v] if row["algorithm"] != "ppo" else ["rlft"]
    these_peers = row_peers(peers, row["algorithm"])
    row.update(runs={**{p: [] for p in these_peers}, **{v: [] for v in variants}}, notes=[])
    steps = a.ppo_steps if row["algorithm"] == "ppo" else a.steps
    sides = these_peers + (variants if a.rlft else [])
    for rnd in range(a.rounds):
        for side in (sides if rnd % 2 == 0 else sides[::-1]):
            tag = f"{row['algorithm']}-beta{row['beta']:g}-{side}-r{rnd}"
            try:
                result, wall, load = meter.measure(side_call(side, row, steps, a, log_dir, tag))
            except NotImplementedError as e:
                row["notes"].append(f"rlft: {e}")
                print(f"[{row['name']}] rlft: not implemented ({e})", flush=True)
                sides = [s for s in sides if s != side]
                continue
            except RuntimeError as e:
                row["notes"].append(f"{side}: failed (see {log_dir})")
                print(f"[{row['name']}] {side} FAILED: {e}", flush=True)
                continue
            result.update(other_load=load, wall_s=wall)
            row["runs"][side].append(result)
            if side in PEERS:
                check_peer_result(row, side, result, digest)
            bd = result.get("breakdown", {})
            print(f"[{row['name']}] {side} round {rnd}: {fmt(result.get('median_step_s'))} s/step over "
                  f"{result.get('steps')} steps (skip {a.skip}); "
                  + ", ".join(f"{k} {fmt(bd.get(k))}" for k in BREAKDOWN_KEYS)
                  + f"; other load {load:.2f} cores; run {wall:.0f} s", flush=True)
    row["summary"] = {side: summarise_side(runs) for side, runs in row["runs"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", default="grpo,rloo,ppo", help="comma-separated: grpo, rloo, ppo")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per GRPO / RLOO run")
    parser.add_argument("--ppo-steps", type=int, default=10, help="PPO updates per PPO run")
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of every median")
    parser.add_argument("--beta", default="0,0.04", help="comma-separated KL coefficients of the GRPO rows")
    parser.add_argument("--peers", nargs="?", const=",".join(PEERS), default=",".join(PEERS),
                        help="comma-separated peers run beside rlft: trl (every row), tunix (GRPO rows); "
                             "default: both")
    parser.add_argument("--no-peers", dest="peers", action="store_const", const="",
                        help="rlft only (same as --peers '')")
    parser.add_argument("--rlft", action=argparse.BooleanOptionalAction, default=True,
                        help="run rlft's side (--no-rlft: peers only)")
    parser.add_argument("--threads", type=int, default=2,
                        help="trl's torch threads; CPUs the Tunix process is pinned to")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every row, alternating which side goes first")
    parser.add_argument("--log-dir", default=None, help="where peer logs go (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="write every result to this file")
    parser.add_argument("--host-devices", type=int, default=1,
                        help="CPU devices of rlft's mesh (data parallel over the completions)")
    parser.add_argument("--variants", default="rlft",
                        help="rlft sides of the GRPO / RLOO rows, comma-separated: " + ", ".join(
                            f"{k} ({v})" for k, v in VARIANT_HELP.items()))
    a = parser.parse_args()
    if min(a.steps, a.ppo_steps) <= a.skip:
        parser.error("--steps and --ppo-steps must exceed --skip")
    peers = parse_peers(a.peers)

    rows = plan_rows([s.strip() for s in a.algorithms.split(",") if s.strip()],
                     [float(b) for b in a.beta.split(",") if b.strip()])
    log_dir = Path(a.log_dir or (tempfile.mkdtemp(prefix="rlft-rl-step-") if peers else "."))
    if peers:
        log_dir.mkdir(parents=True, exist_ok=True)
    digest = workload.workload_digest(*workload.build_workload())
    print(f"rl_step: rows {', '.join(r['name'] for r in rows)}; steps {a.steps} (PPO {a.ppo_steps}), skip {a.skip}, "
          f"rounds {a.rounds}; peers {', '.join(peers) or 'none'} ({a.threads} threads); "
          f"malloc {'tuned' if MALLOC_TUNED else 'default'}; workload digest {digest}; "
          f"{os.cpu_count()} CPUs, 1-min load {os.getloadavg()[0]:.1f}"
          + (f"; peer logs {log_dir}" if peers else ""),
          flush=True)

    meter = LoadMeter()
    for row in rows:
        run_row(row, peers, a, meter, log_dir, digest)

    print_table(rows, peers)
    print_variants(rows, peers)
    print_cpu_use(rows)
    if any((s or {}).get("other_load", 0.0) > QUIET_CORES for r in rows for s in r["summary"].values()):
        print(f"\nOther processes used more than {QUIET_CORES} cores during some runs: those figures are not "
              "comparable (trl's OpenMP threads suffer most); rerun on a quiet machine.")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "peers": peers, "digest": digest, "rows": rows},
                                           indent=1, default=str))
        print(f"results written to {a.json}")


if __name__ == "__main__":
    main()
