"""Verifiable rewards: SFT a small decoder on integer arithmetic, then RL (GRPO) on exact match.

Problems a{op}b with a, b in [0, task.max_operand] and op from task.ops ("+-*") are drawn from the
seed (`rlft.data.arithmetic`); task.num_test of them are held out and never occur in training
(task.num_train = 0: every other problem is a training problem). The prompt is exactly
f"{a}{op}{b}=" (one token per character, no leading token), the target the decimal result then
EOS, in SFT, RL and evaluation alike.

Stage "sft" trains a GPT-2-layout decoder from scratch on (prompt, answer + EOS) for a budget that
stops it half way; stage "rl" continues from it with `rlft.rl.stage` (GRPO by default,
--config.rl.algorithm=ppo|rloo|reinforce) on the training prompts with the exact-match reward.
The report (`evaluate`, also `rlft eval WORKDIR`; WORKDIR/eval/report.{json,md}) gives the greedy
exact-match accuracy (and the rate of well-formed "integer + EOS" answers) of the untrained, SFT
and RL policies on the test problems; WORKDIR/train.jsonl and test.jsonl list both splits, one
{"prompt": "12+34=", "answer": "46"} per line (what experiments/rl.py reads: README's worked example).
With eval.samples_per_problem = n > 0 (default 8; 0: off) the report also gives, per policy, n
samples per test problem at the RL stage's sampling settings (rl.temperature, top_k, top_p; key from
eval.seed): pass@1, pass@k (k = eval.k <= n, Chen et al.'s unbiased estimator), maj@k (majority
answer of the first k samples, `rlft.eval.metrics.majority_at_k`) and mean_reward (the exact-match
mean over all samples), as pass@1_rl, pass@8_rl, maj@8_rl, mean_reward_rl etc.

The SFT budget (default preset, measured on 2 CPU cores): 2-digit addition is learned in a sharp
transition whose timing depends on the seed. With warm-up + cosine decay the accuracy after 450
steps was 58%, 11% and 16% for seeds 0-2, and 13% instead of 58-66% for seed 0 when only the
warm-up changed from 15 to 22 steps. Warming the learning rate up over the whole budget (no
decay) makes it repeatable: 500 steps give 36%, 55%, 60%, 61% and 43% for seeds 0-4 (~40 s).
GRPO then takes seed 0 from 36% to 84% in 500 steps (~3 min); the whole run takes ~4 minutes.
Session 12 (seed 0; the whole run 2 min 41 s on a quiet 2-core CPU): greedy accuracy SFT 0.518 -> RL
0.848; over 8 samples per problem at temperature 1 (each problem's sample i draws the stream of its
row, on the continuous-batching engine), pass@1 0.278 -> 0.724, pass@8 0.794 -> 0.922, maj@8 0.424
-> 0.848. Eight algorithms x 3 seeds: docs/ablations.md (sampled with the keys of session 11).

    rlft run experiments/arithmetic_grpo.py            # ~4 minutes on 2 CPU cores
    rlft run experiments/arithmetic_grpo.py:tiny       # seconds (tests)
    rlft.load("runs/arithmetic_grpo/rl").generate(["12+34="], temperature=0)["text"]   # Python
"""

from __future__ import annotations

import json
import os
import re
import time

import ml_collections
import numpy as np
from flax import nnx

from rlft.train.checkpoints import checkpoint_steps, load_model_config, save_model_config
from rlft.data import arithmetic
from rlft.data.batching import pad_left
from rlft.parallel.distributed import is_primary, to_host
from rlft.errors import RlftError
from rlft.eval.metrics import check_sample_counts, sampled_accuracy
from rlft.eval.policies import sample_policy
from rlft.eval.report import write_report
from rlft.files import write_json, write_text
from rlft.models import Decoder, model_from_section, model_section
from rlft.rl.rewards import exact_match
from rlft.rl.config import rl_stage_config
from rlft.rl.stage import run_rl_stage
from rlft.generate.sampling import SamplingParams, sample
from rlft.parallel.sharding import batch_axes, make_mesh, rollout_mesh, sharded_init
from rlft.train.stages import run_sft_stage, sft_stage_config
from rlft.train.warm_start import decoder_state

INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    """Presets: "default" (the case study, <= 10 min on 2 CPU cores) and "tiny" (tests).

    sft.max_length and rl.max_new_tokens fit the preset's task exactly (longest prompt + answer +
    EOS; longest answer + EOS); a larger task.max_operand needs them raised (`check` says so).
    """
    if preset not in ("default", "tiny"):
        raise RlftError(f"arithmetic_grpo: unknown preset {preset!r} (default, tiny)")
    tiny = preset == "tiny"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = ml_collections.ConfigDict(dict(max_operand=19 if tiny else 99, ops="+",
                                            num_test=64 if tiny else 500, num_train=0))
    prompt_len, completion_len = _lengths(c.task)
    c.model = model_section(d_model=128, n_layers=3, n_heads=4, max_positions=64)
    # rollout: devices left to the RL sampler, a count or a fraction in (0, 1) of them (0: colocated;
    # `rlft.parallel.sharding.rollout_mesh`)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rollout=0.0))
    # The learning rate warms up over the whole SFT budget (no decay): measured, this makes the
    # SFT accuracy after the budget far less seed-dependent than warm-up + cosine (module doc).
    c.sft = sft_stage_config(steps=500, batch_size=64, learning_rate=1e-3, warmup_steps=500,
                             max_length=prompt_len + completion_len)
    c.rl = rl_stage_config(steps=500, prompts_per_step=32, group_size=8, learning_rate=3e-4,
                           max_new_tokens=completion_len, algorithm="grpo")
    # samples_per_problem (n) sampled completions per test problem for pass@1, pass@k, maj@k (k <= n;
    # n = 0: greedy accuracy only), at rl.temperature / top_k / top_p, from the key eval.seed.
    c.eval = ml_collections.ConfigDict(dict(batch_size=256, samples_per_problem=8, k=8, seed=0))
    if tiny:
        c.model.update(d_model=64, n_layers=1)
        c.sft.update(steps=150, batch_size=32, learning_rate=3e-3, warmup_steps=7, save_every=150)
        c.rl.update(steps=4, prompts_per_step=8, group_size=4, save_every=4)
        c.eval.update(batch_size=64, samples_per_problem=4, k=2)
    return c


def _lengths(task: ml_collections.ConfigDict) -> tuple[int, int]:
    """(longest prompt, longest answer + EOS) in tokens; checks the task section."""
    arithmetic.check_task(task.max_operand, task.ops, task.num_test, task.num_train)
    return (arithmetic.max_prompt_length(task.max_operand, task.ops),
            arithmetic.max_answer_length(task.max_operand, task.ops) + 1)


def greedy_answers(graphdef: nnx.GraphDef, params: nnx.State, tokenizer, prompts: list[str],
                   max_new_tokens: int, prompt_length: int, batch_size: int, mesh) -> list[tuple[str, bool]]:
    """(text before EOS, EOS produced) of each prompt's greedy completion, in fixed-shape batches.

    Prompts are left-padded to `prompt_length`; the last batch is filled with copies of the first
    prompt, so one compiled sampler serves every batch (batch_size is rounded up to a multiple of
    the mesh's data axes).
    """
    ways = int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))
    batch_size = -(-min(batch_size, len(prompts)) // ways) * ways
    ids = [arithmetic.encode(tokenizer, p) for p in prompts]
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        chunk = chunk + [ids[0]] * (batch_size - len(chunk))
        tokens, mask, _ = pad_left(chunk, prompt_length, tokenizer.pad_token_id)
        result = sample(graphdef, params, tokens, mask, None, max_new_tokens=max_new_tokens,
                        eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                        sampling=SamplingParams(temperature=0.0), mesh=mesh)
        rows = to_host(result.tokens)[:len(ids) - start]
        out += [arithmetic.decode_answer(tokenizer, row, tokenizer.eos_token_id) for row in rows]
    return out


def score_samples(answers: list[list[tuple[str, bool]]], problems: list[arithmetic.Problem], k: int) -> dict:
    """pass@1, pass@k, maj@k and mean_reward (`rlft.eval.metrics.sampled_accuracy`) of sampled
    answers: a sample is correct when it is the answer then EOS (the exact-match reward); the vote
    of maj@k is over texts before an EOS (a sample without EOS abstains)."""
    votes = [[text if ended else None for text, ended in row] for row in answers]
    correct = [[ended and text == p.answer for text, ended in row] for row, p in zip(answers, problems)]
    return sampled_accuracy(votes, np.array(correct, bool), k)


def score_answers(answers: list[tuple[str, bool]], problems: list[arithmetic.Problem]) -> dict:
    """accuracy (text before EOS == answer, EOS produced) and format (an integer, then EOS)."""
    correct = [ended and text == p.answer for (text, ended), p in zip(answers, problems)]
    formatted = [ended and INTEGER.fullmatch(text) is not None for text, ended in answers]
    return {"accuracy": float(np.mean(correct)), "format": float(np.mean(formatted))}


def check(config: ml_collections.ConfigDict) -> None:
    """What only this experiment can check, before `rlft run` writes anything: the task's longest
    prompt and answer fit sft.max_length, rl.max_new_tokens and model.max_positions; eval.k fits
    eval.samples_per_problem."""
    check_sample_counts(config.eval.samples_per_problem, config.eval.k)
    prompt_len, new_tokens = _lengths(config.task)
    if config.sft.max_length < prompt_len + new_tokens:
        raise RlftError(f"sft.max_length={config.sft.max_length}: the longest problem has "
                        f"{prompt_len + new_tokens} tokens (prompt + answer + EOS); raise it")
    if config.rl.max_new_tokens < new_tokens:
        raise RlftError(f"rl.max_new_tokens={config.rl.max_new_tokens}: the longest answer + EOS has "
                        f"{new_tokens} tokens; raise it")
    if prompt_len + max(new_tokens, config.rl.max_new_tokens) > config.model.max_positions:
        raise RlftError(f"model.max_positions={config.model.max_positions} is shorter than the longest "
                        f"prompt + completion ({prompt_len} + {max(new_tokens, config.rl.max_new_tokens)})")


STAGES = ("sft", "rl")
PRIMARY_METRIC = "accuracy_rl"  # what `rlft sweep` sorts its report by


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Split, SFT, RL, then `evaluate`; writes train.jsonl, test.jsonl, seconds.json and eval/ in the work directory."""
    check(config)
    task = config.task
    train, test = arithmetic.split_problems(task.max_operand, task.ops, task.num_test, task.num_train,
                                            config.seed)
    if is_primary():
        os.makedirs(workdir, exist_ok=True)
        for split, problems in (("train", train), ("test", test)):
            write_text(os.path.join(workdir, f"{split}.jsonl"),
                       "".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems))
    tokenizer = arithmetic.build_tokenizer(os.path.join(workdir, "tokenizer"))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    model_cfg = model_from_section(config.model, len(tokenizer))
    save_model_config(workdir, model_cfg)
    mesh = make_mesh(dict(config.mesh))
    graphdef, init_params = sharded_init(lambda: Decoder(model_cfg, rngs=nnx.Rngs(config.seed)), mesh)

    seconds = {}
    clock = time.perf_counter()
    examples = [(arithmetic.encode(tokenizer, p.prompt), arithmetic.encode(tokenizer, p.answer) + [eos])
                for p in train]
    sft_params = run_sft_stage(name="sft", workdir=workdir, graphdef=graphdef, params=init_params,
                               examples=examples, cfg=config.sft, mesh=mesh, seed=config.seed + 1, pad_id=pad)
    seconds["sft"] = time.perf_counter() - clock

    clock = time.perf_counter()
    records = [p.record(tokenizer) for p in train]
    run_rl_stage(name="rl", workdir=workdir, graphdef=graphdef, params=sft_params, prompts=records,
                 reward_fn=exact_match, cfg=config.rl, mesh=mesh, seed=config.seed + 2, eos_id=eos,
                 pad_id=pad, tokenizer=tokenizer, base=os.path.join(workdir, "sft"),
                 rollout_mesh=rollout_mesh(dict(config.mesh)))
    seconds["rl"] = time.perf_counter() - clock

    clock = time.perf_counter()
    report = evaluate(config, workdir)
    seconds["eval"] = time.perf_counter() - clock
    if is_primary():
        write_json(os.path.join(workdir, "seconds.json"), {k: round(v, 1) for k, v in seconds.items()})
    return report


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`rlft eval WORKDIR`: greedy exact-match accuracy and well-formed-answer rate of the untrained
    policy and of each stage with a finished checkpoint (sft, rl) on the held-out test problems, and
    with eval.samples_per_problem > 0 their pass@1, pass@k, maj@k and mean reward over that many
    samples per problem (module doc); writes WORKDIR/eval/report.json and report.md, and returns the report."""
    samples, k = check_sample_counts(config.eval.samples_per_problem, config.eval.k)
    task = config.task
    # Evaluation decodes longest answer + EOS tokens: a completion without EOS is longer than any
    # answer, so "text == answer" already implies that the EOS came.
    prompt_len, new_tokens = _lengths(task)
    train, test = arithmetic.split_problems(task.max_operand, task.ops, task.num_test, task.num_train,
                                            config.seed)
    tokenizer = arithmetic.build_tokenizer()  # the fixed character tokenizer every run saves
    model_cfg = load_model_config(workdir)
    mesh = make_mesh(dict(config.mesh))
    graphdef, init_params = sharded_init(lambda: Decoder(model_cfg, rngs=nnx.Rngs(config.seed)), mesh)
    policies = {"init": init_params}
    for stage in STAGES:
        if checkpoint_steps(os.path.join(workdir, stage)):
            policies[stage] = decoder_state(model_cfg, os.path.join(workdir, stage), mesh)
    if len(policies) == 1:
        raise RlftError(f"rlft eval: {workdir} has no finished checkpoint of {' or '.join(STAGES)} yet")
    metrics, answers, sampled = {}, {}, {}
    sampling = SamplingParams(temperature=config.rl.temperature, top_k=config.rl.top_k, top_p=config.rl.top_p)
    for name, params in policies.items():
        answers[name] = greedy_answers(graphdef, params, tokenizer, [p.prompt for p in test], new_tokens,
                                       prompt_len, config.eval.batch_size, mesh)
        metrics[name] = score_answers(answers[name], test)
        if samples:
            ids = [arithmetic.encode(tokenizer, p.prompt) for p in test for _ in range(samples)]
            drawn = sample_policy(graphdef, params, ids, tokenizer, max_new_tokens=new_tokens, sampling=sampling,
                                  seed=config.eval.seed, eos_id=tokenizer.eos_token_id,
                                  pad_id=tokenizer.pad_token_id, mesh=mesh, batch_size=config.eval.batch_size)
            flat = list(zip(drawn.texts, drawn.ended.tolist()))
            sampled[name] = score_samples([flat[i * samples:(i + 1) * samples] for i in range(len(test))], test, k)

    report = {f"{key}_{name}": value for name, m in metrics.items() for key, value in m.items()}
    report.update({f"{key}_{name}": value for name, m in sampled.items() for key, value in m.items()})
    if "rl" in metrics and "sft" in metrics:
        report["rl_gain"] = metrics["rl"]["accuracy"] - metrics["sft"]["accuracy"]
    report.update({
        "policies": list(policies),
        "test_problems": len(test),
        "train_problems": len(train),
        "task": {"max_operand": task.max_operand, "ops": arithmetic.unique_ops(task.ops)},
        "sft_steps": config.sft.steps,
        "rl_algorithm": config.rl.algorithm,
        "rl_steps": config.rl.steps,
    })
    if sampled:
        report["sampling"] = {"samples_per_problem": samples, "k": k, "temperature": config.rl.temperature,
                              "top_k": config.rl.top_k, "top_p": config.rl.top_p, "seed": config.eval.seed}
    labels = {"init": "untrained", "sft": f"SFT ({config.sft.steps} steps)",
              "rl": f"RL ({config.rl.algorithm}, {config.rl.steps} steps)"}
    table = "".join(f"| {labels[name]} | {m['accuracy']:.3f} | {m['format']:.3f} |\n" for name, m in metrics.items())
    sampled_md = ""
    if sampled:
        sampled_md = (f"\n{samples} samples per problem at temperature {config.rl.temperature} "
                      f"(top_k {config.rl.top_k}, top_p {config.rl.top_p}); maj@{k}: majority answer of the "
                      f"first {k} samples.\n\n| policy | pass@1 | pass@{k} | maj@{k} | mean reward |\n|---|---|---|---|---|\n"
                      + "".join(f"| {labels[name]} | {m['pass@1']:.3f} | {m[f'pass@{k}']:.3f} | {m[f'maj@{k}']:.3f} "
                                f"| {m['mean_reward']:.3f} |\n" for name, m in sampled.items()))
    shown = [name for name in STAGES if name in answers]
    examples_md = "".join(f"| `{p.prompt}` | `{p.answer}` | " + " | ".join(f"`{answers[n][i][0]}`" for n in shown)
                          + " |\n" for i, p in enumerate(test[:8]))
    markdown = (f"# Integer arithmetic: SFT then {config.rl.algorithm.upper()} on exact match\n\n"
                f"Problems a{{op}}b=, a and b in [0, {task.max_operand}], ops {task.ops!r}: "
                f"{len(test)} held-out test problems, {len(train)} training problems (disjoint).\n\n"
                "| policy | greedy exact-match accuracy | well-formed answers |\n|---|---|---|\n" + table +
                sampled_md + "\n| prompt | answer | " + " | ".join(n.upper() for n in shown) + " |\n|---|---|"
                + "---|" * len(shown) + "\n" + examples_md)
    write_report(os.path.join(workdir, "eval"), report, markdown)
    return report
