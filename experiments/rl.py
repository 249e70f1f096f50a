"""RL on your model, your prompts and your rewards: GRPO (or PPO, RLOO, REINFORCE) from a Hugging Face
checkpoint or an rlft stage, on a local data file, with built-in or Python reward functions.

    rlft run experiments/rl.py --config.model.path=CHECKPOINT_DIR --config.data.train=problems.jsonl \\
        --config.rl.rewards=exact_match,my_rewards:brevity --config.rl.reward_weights=1,0.1

model.path: a Hugging Face checkpoint directory (GPT-2, Llama or Qwen2: config.json, safetensors,
tokenizer files) or a stage of an rlft run (runs/x/sft); its own tokenizer is used, and generation
stops at any of its EOS ids (generation_config.json may list several). The KL reference is the
starting model. `--config.rl.lora.rank=16` trains adapters only.

data.train (and data.eval): a .jsonl, .json, .csv or .parquet file, or tfds:NAME:SPLIT
(`rlft.data.records`). Each row is one prompt: row[data.prompt_field], a string or a list of chat
messages [{"role", "content"}]; data.chat_template=true applies the tokenizer's chat template
(add_generation_prompt). Prompts longer than data.max_prompt_tokens (0: no limit) keep their end.

rl.rewards: comma-separated names, each a built-in (exact_match: the completion equals
row[data.answer_field]; format: rl.format_pattern matches; length: DAPO's soft over-length penalty
over the last rl.length_buffer tokens; reward_model: rl.reward_model, an rlft reward stage or a
Hugging Face sequence-classification checkpoint; vader) or module:function (importable; the
current directory is on the path). The reward of a completion is the weighted sum (rl.reward_weights,
default 1 each), and each one's mean is logged as rewards/NAME/mean. A reward function is

    def fn(completions: list[str], records: list[dict]) -> list[float] | np.ndarray  # one per completion

where records[i] holds every field of the completion's data row, plus "prompt" (the text the model
saw, after the chat template), "answer" (row[data.answer_field], when the row has it) and "ids".
An exception, NaN/inf, a wrong length or type from it is one error line naming the function and
the step, after the last completed step is saved.

With data.eval, the report (WORKDIR/eval/report.json, also `rlft eval WORKDIR`) gives each reward's
mean over the eval prompts' greedy completions, from the starting model and from the trained one.
With eval.samples_per_problem = n > 0 (0: off) and a checker, the reward eval.checker (default
exact_match; any reward name; a completion is correct when it scores exactly 1.0; exact_match is used
only when every eval row has data.answer_field), it also gives for both models, over n completions
per prompt sampled at rl.temperature / top_k / top_p (key eval.seed): pass@1, pass@k (k = eval.k <= n,
Chen et al.'s unbiased estimator), maj@k (the majority stripped completion text of the first k
samples, `rlft.eval.metrics.majority_at_k`) and mean_reward (the checker's mean over all samples),
as pass@1_start, pass@8_rl, maj@8_rl, mean_reward_rl etc.

    rlft run experiments/rl.py:tiny ...      # a few steps (tests)
    rlft export WORKDIR/rl --out DIR         # a Hugging Face directory transformers loads
"""

from __future__ import annotations

import os
import sys

import jax
import ml_collections
import numpy as np

from rlft.data.records import column
from rlft.errors import RlftError
from rlft.eval.metrics import check_sample_counts, sampled_accuracy
from rlft.eval.policies import sample_policy
from rlft.eval.report import write_report
from rlft.generate.sampling import SamplingParams
from rlft.parallel.sharding import make_mesh, rollout_mesh
from rlft.recipes.general import (check_paths, data_rows, experiment_config, load_starting_model, prompt_records,
                                  save_run_files)
from rlft.rl.config import rl_stage_config
from rlft.rl.rewards import LengthPenalty, build_rewards, score_completions
from rlft.rl.stage import run_rl_stage


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    """Presets: "default" (GRPO, sized for a small model on one accelerator) and "tiny" (tests)."""
    c = experiment_config("rl", preset, max_eval_prompts=256)
    c.mesh.rollout = 0.0  # devices left to the RL sampler: a count, or a fraction in (0, 1) (0: colocated)
    c.rl = rl_stage_config(steps=200, prompts_per_step=16, group_size=8, learning_rate=1e-6,
                           max_new_tokens=256, algorithm="grpo", save_every=50, keep=2)
    c.rl.update(rewards="exact_match", reward_weights="", format_pattern="", length_buffer=0, reward_model="")
    # samples_per_problem (n) sampled completions per eval prompt for pass@1, pass@k, maj@k (k <= n;
    # 0: off), judged by the reward `checker` (1.0: correct), at rl.temperature, from the key `seed`.
    c.eval = ml_collections.ConfigDict(dict(batch_size=64, samples_per_problem=8, k=8, seed=0,
                                            checker="exact_match"))
    if preset == "tiny":
        c.rl.update(steps=4, prompts_per_step=8, group_size=4, max_new_tokens=8, learning_rate=1e-3, save_every=2)
        c.data.max_eval_prompts = 32
        c.eval.update(batch_size=32, samples_per_problem=4, k=2)
    return c


def check(config: ml_collections.ConfigDict) -> None:
    """Before anything is written: model.path and data.train are set, model.path exists, eval.k
    fits eval.samples_per_problem."""
    check_paths(config, "rl.py")
    check_sample_counts(config.eval.samples_per_problem, config.eval.k)


def rewards_of(config: ml_collections.ConfigDict, names: str | None = None, weights: str | None = None):
    """The weighted rewards rl.rewards / rl.reward_weights name (`build_rewards`), or `names` /
    `weights` built with the same rl.* options."""
    rl = config.rl
    return build_rewards(rl.rewards if names is None else names, rl.reward_weights if weights is None else weights,
                         format_pattern=rl.format_pattern, max_new_tokens=rl.max_new_tokens,
                         length_buffer=rl.length_buffer, reward_model=rl.reward_model)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The RL stage "rl" from model.path on data.train, then `evaluate` when data.eval is set."""
    check(config)
    mesh = make_mesh(dict(config.mesh))
    start = load_starting_model(config.model, mesh)
    rows = data_rows(config.data, "train")
    prompts = prompt_records(rows, start.tokenizer, config.data, "data.train")
    longest = max(len(p["ids"]) for p in prompts)
    if not start.config.uses_rope and longest + config.rl.max_new_tokens > start.config.max_positions:
        raise RlftError(f"the longest prompt of data.train ({longest} tokens) + rl.max_new_tokens="
                        f"{config.rl.max_new_tokens} exceed the model's max_positions={start.config.max_positions}; "
                        f"set data.max_prompt_tokens or lower rl.max_new_tokens")
    rewards = rewards_of(config)
    if any(name == "exact_match" for name, _, _ in rewards):  # it reads "answer": say so before any work
        column(rows, config.data.answer_field, "data.answer_field", f"data.train={config.data.train}")
    save_run_files(workdir, start)
    run_rl_stage(name="rl", workdir=workdir, graphdef=start.graphdef, params=start.params, prompts=prompts,
                 reward_fn=rewards, cfg=config.rl, mesh=mesh, seed=config.seed, eos_id=start.eos_ids,
                 pad_id=start.pad_id, tokenizer=start.tokenizer, base=start.path,
                 rollout_mesh=rollout_mesh(dict(config.mesh)))
    if not config.data.eval:
        return {"rl_steps": config.rl.steps}
    if jax.process_count() > 1:
        print(f"rl: trained; evaluate with `rlft eval {workdir}` (one process)", file=sys.stderr)
        return {}
    return evaluate(config, workdir)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`rlft eval WORKDIR`: each reward's mean over greedy completions of data.eval's prompts
    (the first data.max_eval_prompts) by the starting model and by the run's RL stage, and with
    eval.samples_per_problem > 0 and a checker their pass@1, pass@k, maj@k and mean reward over that
    many sampled completions per prompt (module doc); writes WORKDIR/eval/report.{json,md}."""
    samples, k = check_sample_counts(config.eval.samples_per_problem, config.eval.k)
    mesh = make_mesh(dict(config.mesh))
    start = load_starting_model(config.model, mesh)
    rows = data_rows(config.data, "eval")[:config.data.max_eval_prompts or None]
    prompts = prompt_records(rows, start.tokenizer, config.data, "data.eval")
    trained = load_starting_model(ml_collections.ConfigDict({**config.model.to_dict(),
                                                            "path": os.path.join(workdir, "rl")}), mesh)
    rewards = rewards_of(config)
    checker = _checker(config, rewards, prompts) if samples else None
    report = {"eval_prompts": len(prompts)}
    sampled = {}
    for name, model in (("start", start), ("rl", trained)):
        greedy = completions(model, prompts, config, mesh, SamplingParams(temperature=0.0), seed=0)
        texts, mask = greedy.texts, greedy.mask
        for reward_name_, _, fn in rewards:
            if isinstance(fn, LengthPenalty):
                values = np.asarray(fn(mask))
            else:
                values = score_completions(fn, texts, prompts, where=f"rl eval ({name})")
            report[f"{reward_name_}_{name}"] = float(np.mean(values))
        if checker is not None:
            sampled[name] = _sampled_metrics(config, model, prompts, checker[1], samples, k, mesh,
                                             where=f"rl eval ({name}, eval.checker={checker[0]})")
            report.update({f"{key}_{name}": value for key, value in sampled[name].items()})
    if checker is not None:
        report["sampling"] = {"samples_per_problem": samples, "k": k, "checker": checker[0],
                              "temperature": config.rl.temperature, "top_k": config.rl.top_k,
                              "top_p": config.rl.top_p, "seed": config.eval.seed}
    lines = ["# RL: the starting model and the trained policy on data.eval (greedy)", "",
             f"{len(prompts)} prompts of {config.data.eval}.", "", "| reward | start | rl |", "|---|---|---|"]
    lines += [f"| {n} | {report[f'{n}_start']:.4f} | {report[f'{n}_rl']:.4f} |" for n, _, _ in rewards]
    if sampled:
        lines += ["", f"{samples} samples per prompt at temperature {config.rl.temperature} (top_k {config.rl.top_k}, "
                  f"top_p {config.rl.top_p}), judged by {checker[0]}; maj@{k}: majority stripped completion of "
                  f"the first {k} samples.", "", "| metric | start | rl |", "|---|---|---|"]
        lines += [f"| {key} | {sampled['start'][key]:.4f} | {sampled['rl'][key]:.4f} |" for key in sampled["start"]]
    write_report(os.path.join(workdir, "eval"), report, "\n".join(lines) + "\n")
    return report


def _checker(config: ml_collections.ConfigDict, rewards, prompts: list[dict]):
    """(name, reward function) of eval.checker, the reward of rl.rewards of that name or else one
    built alone; None when eval.checker is empty, or is exact_match and an eval row has no answer."""
    name = str(config.eval.checker or "").strip()
    if not name or (name == "exact_match" and not all("answer" in p for p in prompts)):
        return None
    fn = next((f for n, _, f in rewards if n == name), None)
    if fn is None:
        (_, _, fn), = rewards_of(config, name, "")
    if isinstance(fn, LengthPenalty):
        raise RlftError(f"eval.checker={name!r}: a length penalty judges no correctness; name a reward that "
                        "gives 1.0 for a correct completion (e.g. exact_match), or set eval.samples_per_problem=0")
    return name, fn


def _sampled_metrics(config: ml_collections.ConfigDict, model, prompts: list[dict], checker, samples: int,
                     k: int, mesh, where: str) -> dict:
    """pass@1, pass@k, maj@k, mean_reward (`sampled_accuracy`) of `samples` completions per prompt
    sampled at rl.temperature / top_k / top_p from the key eval.seed; correct: the checker gives 1.0."""
    rl = config.rl
    repeated = [p for p in prompts for _ in range(samples)]
    texts = completions(model, repeated, config, mesh, SamplingParams(temperature=rl.temperature, top_k=rl.top_k,
                                                                      top_p=rl.top_p), seed=config.eval.seed).texts
    values = np.asarray(score_completions(checker, texts, repeated, where=where), np.float64)
    values = values.reshape(len(prompts), samples)
    answers = [[t.strip() for t in texts[i * samples:(i + 1) * samples]] for i in range(len(prompts))]
    return sampled_accuracy(answers, values == 1.0, k, values)


def completions(model, prompts: list[dict], config: ml_collections.ConfigDict, mesh, sampling: SamplingParams,
                seed: int):
    """`rlft.eval.policies.sample_policy` of `model` (a StartingModel) on the records' ids:
    rl.max_new_tokens, eval.batch_size, the model's EOS ids; texts, mask [n, max_new_tokens], ended."""
    return sample_policy(model.graphdef, model.params, [p["ids"] for p in prompts], model.tokenizer,
                         max_new_tokens=config.rl.max_new_tokens, sampling=sampling, seed=seed, eos_id=model.eos_ids,
                         pad_id=model.pad_id, mesh=mesh, batch_size=config.eval.batch_size)
