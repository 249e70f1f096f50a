"""`rlft eval`: compare a run's policies (base, SFT, DPO, RL) on the same held-out prompts.

An experiment describes its evaluation with an `EvalTask` (prompts, the proxy reward model, the
gold judge, held-out human text, sampling settings); `evaluate_run` does the rest for any run, finished
or not: it loads each policy stage that exists (and says which are missing), samples every policy
on the same prompts with the same keys, and measures (DESIGN.md §7)

    proxy reward    the run's reward model, normalised (mean over prompts)
    gold reward     the independent judge (VADER for sentiment), and its win rate over the reference
    KL              KL(policy‖reference) per sequence on the policy's own samples (k1, summed)
    perplexity      of held-out human text under the policy
    diversity       distinct-1/2, mean completion length, fraction without EOS

and, over the RL stage's saved checkpoints, the Gao et al. (2022) curve of proxy and gold reward
against √KL. Writes RUN_DIR/eval/{report.md, report.json, gao.png, policies.png} and the same
scalars and figures to RUN_DIR/eval/tensorboard.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rlft.train.checkpoints import checkpoint_steps, load_model_config
from rlft.data.batching import Example
from rlft.errors import RlftError
from rlft.eval import metrics, plots
from rlft.eval.policies import PolicySamples, logprobs_under, sample_policy, text_perplexity
from rlft.eval.report import write_report
from rlft.files import replaced_atomically, write_text
from rlft.generate.logprobs import SamplingParams
from rlft.models import Decoder
from rlft.rl.rewards import RewardFn, check_scores
from rlft.train.warm_start import decoder_state

POLICY_STAGES = ("pretrain", "sft", "dpo", "rl")
EVAL_DIR = "eval"


@dataclasses.dataclass
class EvalTask:
    """What an experiment's evaluation compares its policies on.

    prompts: records {"ids": prompt token ids, "text": prompt text, ...} (held out from training);
    proxy / gold: reward functions (completions, records) -> float32 [n] (`rlft.rl.rewards`); proxy may
    be None when the run has no reward model yet; heldout: (prompt ids, text ids) examples of human
    text for perplexity, `heldout_length` tokens long at most; gao_prompts: how many of the prompts
    each RL checkpoint is sampled on for the over-optimisation curve.
    """

    prompts: list[dict]
    gold: RewardFn
    gold_name: str
    heldout: list[Example]
    heldout_length: int
    max_new_tokens: int
    sampling: SamplingParams
    proxy: RewardFn | None = None
    proxy_name: str = "reward model"
    policies: Sequence[str] = POLICY_STAGES
    reference: str = "sft"
    gao_stage: str = "rl"
    gao_prompts: int = 128
    seed: int = 0
    batch_size: int = 128
    samples_shown: int = 8
    extra_markdown: str = ""  # experiment-specific sections appended to the report


def _log(message: str) -> None:
    print(f"rlft eval: {message}", file=sys.stderr)


def _policy_metrics(samples: PolicySamples, proxy: np.ndarray | None, gold: np.ndarray,
                    ref_logprobs: np.ndarray | None, perplexity: float) -> dict:
    """The per-policy row of the report (floats, None where not measurable)."""
    kl = None if ref_logprobs is None else metrics.sequence_kl(samples.logprobs, ref_logprobs, samples.mask)
    return {
        "proxy_reward": None if proxy is None else float(np.mean(proxy)),
        "gold_reward": float(np.mean(gold)),
        "gold_reward_sem": metrics.summary(gold)["sem"],
        "kl": None if kl is None else float(np.mean(kl)),
        "kl_sem": None if kl is None else metrics.summary(kl)["sem"],
        "perplexity": perplexity,
        "distinct_1": metrics.distinct_n(samples.texts, 1),
        "distinct_2": metrics.distinct_n(samples.texts, 2),
        "mean_length": float(np.mean(samples.lengths)),
        "no_eos_fraction": float(np.mean(~samples.ended)),
    }


def _score(fn: RewardFn, samples: PolicySamples, records: Sequence[dict]) -> np.ndarray:
    return check_scores(fn(samples.texts, list(records)), len(samples.texts))


def evaluate_run(run_dir: str, task: EvalTask, mesh: Mesh, tokenizer) -> dict:
    """Evaluate every policy stage of `run_dir` that exists; writes RUN_DIR/eval/*; returns report.json's dict."""
    model_cfg = load_model_config(run_dir)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0))))
    present = [s for s in task.policies if checkpoint_steps(os.path.join(run_dir, s))]
    missing = [s for s in task.policies if s not in present]
    if not present:
        raise RlftError(f"rlft eval: {run_dir} has none of the policy stages {list(task.policies)} "
                        f"with a checkpoint yet")
    if missing:
        _log(f"stages not in this run (not evaluated): {', '.join(missing)}")
    load = lambda path: decoder_state(model_cfg, path, mesh)
    params = {s: load(os.path.join(run_dir, s)) for s in present}
    reference = params.get(task.reference)
    records = task.prompts
    ids = [r["ids"] for r in records]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def draw(p, prompt_ids) -> PolicySamples:
        return sample_policy(graphdef, p, prompt_ids, tokenizer, max_new_tokens=task.max_new_tokens,
                             sampling=task.sampling, seed=task.seed, eos_id=eos, pad_id=pad, mesh=mesh,
                             batch_size=task.batch_size)

    samples, proxy, gold, rows = {}, {}, {}, {}
    for stage in present:
        _log(f"sampling {stage} on {len(records)} prompts")
        samples[stage] = draw(params[stage], ids)
        proxy[stage] = None if task.proxy is None else _score(task.proxy, samples[stage], records)
        gold[stage] = _score(task.gold, samples[stage], records)
        ref_logp = None if reference is None else logprobs_under(graphdef, reference, samples[stage])
        ppl = text_perplexity(graphdef, params[stage], task.heldout, task.heldout_length, pad, mesh)
        rows[stage] = _policy_metrics(samples[stage], proxy[stage], gold[stage], ref_logp, ppl)
    for stage in present:
        rows[stage]["gold_win_rate_vs_reference"] = (
            metrics.win_rate(gold[stage], gold[task.reference]) if task.reference in gold else None)

    gao = _gao_points(run_dir, task, graphdef, load, reference, records, draw) if reference is not None else []
    report = _report(task, rows, present, missing, gao, len(records))
    _write(run_dir, task, report, rows, samples, gao, present, records)
    return report


def _gao_points(run_dir, task, graphdef, load, reference, records, draw) -> list[dict]:
    """{"step", "kl", "sqrt_kl", "proxy", "gold"} for the reference (step 0) and each saved RL checkpoint."""
    stage_dir = os.path.join(run_dir, task.gao_stage)
    steps = checkpoint_steps(stage_dir)
    if not steps or task.proxy is None:
        return []
    records = records[:task.gao_prompts]
    ids = [r["ids"] for r in records]
    points = []
    for step, params in [(0, reference)] + [(s, None) for s in steps]:
        _log(f"over-optimisation curve: {task.gao_stage} step {step}")
        if params is None:
            step_dir = os.path.join(stage_dir, "checkpoints", str(step))
            try:
                params = load(step_dir)
            except Exception:
                if step in checkpoint_steps(stage_dir):
                    raise
                # A running run deleted it (it keeps its last `keep` checkpoints) after we listed it.
                _log(f"{task.gao_stage} step {step} was deleted by the running run while being read; skipped")
                continue
        samples = draw(params, ids)
        kl = metrics.sequence_kl(samples.logprobs, logprobs_under(graphdef, reference, samples), samples.mask)
        mean_kl = float(np.mean(kl))
        points.append({"step": step, "kl": mean_kl, "sqrt_kl": math.sqrt(max(mean_kl, 0.0)),
                       "proxy": float(np.mean(_score(task.proxy, samples, records))),
                       "gold": float(np.mean(_score(task.gold, samples, records)))})
    return points


def _report(task: EvalTask, rows: dict, present: list[str], missing: list[str], gao: list[dict],
            num_prompts: int) -> dict:
    """report.json: per-policy dicts under each metric name, plus the headline RL-vs-reference figures."""
    per_metric = {name: {s: rows[s][name] for s in present} for name in next(iter(rows.values()))}
    report = {
        "policies": present, "missing": missing, "reference": task.reference, "prompts": num_prompts,
        "gold_judge": task.gold_name, "proxy": task.proxy_name, "kl_estimator": "k1",
        "sampling": {"temperature": task.sampling.temperature, "top_k": task.sampling.top_k,
                     "top_p": task.sampling.top_p, "max_new_tokens": task.max_new_tokens},
        **per_metric,
        "gao": gao,
    }
    for stage in present:
        report[f"perplexity_{stage}"] = rows[stage]["perplexity"]
        if stage != task.reference:
            report[f"gold_win_rate_{stage}_vs_{task.reference}"] = rows[stage]["gold_win_rate_vs_reference"]
    return report


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _markdown(task: EvalTask, report: dict, rows: dict, samples: dict, present: list[str],
              records: Sequence[dict]) -> str:
    ref = task.reference
    lines = [f"# Evaluation: {', '.join(present)} on {report['prompts']} held-out prompts\n",
             f"One sample per prompt and policy (temperature {task.sampling.temperature}, top-k "
             f"{task.sampling.top_k}, top-p {task.sampling.top_p}, {task.max_new_tokens} new tokens, the same "
             f"random keys for every policy). Gold judge: {task.gold_name}, never seen in training; proxy: "
             f"{task.proxy_name}. KL(policy ‖ {ref}) is the k1 estimate summed over each sampled completion, "
             f"averaged over prompts. Perplexity is of held-out human text.\n"]
    if report["missing"]:
        lines.append(f"Not in this run (not evaluated): {', '.join(report['missing'])}.\n")
    lines.append(f"| policy | proxy reward | gold reward | gold win rate vs {ref} | KL vs {ref} | perplexity "
                 "| distinct-1 | distinct-2 | mean length | no EOS |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for s in present:
        r = rows[s]
        lines.append(f"| {s} | {_fmt(r['proxy_reward'])} | {_fmt(r['gold_reward'])} ± {_fmt(r['gold_reward_sem'])} "
                     f"| {_fmt(r['gold_win_rate_vs_reference'])} | {_fmt(r['kl'])} | {_fmt(r['perplexity'], 2)} "
                     f"| {_fmt(r['distinct_1'])} | {_fmt(r['distinct_2'])} | {_fmt(r['mean_length'], 1)} "
                     f"| {_fmt(r['no_eos_fraction'])} |")
    if "rl" in rows and ref in rows:
        rise = rows["rl"]["perplexity"] / rows[ref]["perplexity"] - 1
        lines.append(f"\nRL vs {ref}: gold win rate {_fmt(rows['rl']['gold_win_rate_vs_reference'])} (ties ½); "
                     f"perplexity {rise:+.1%}.\n")
    if report["gao"]:
        lines.append("## Over-optimisation (Gao et al. 2022)\n\n![proxy and gold vs sqrt KL](gao.png)\n")
        lines.append("| RL step | KL | √KL | proxy | gold |\n|---|---|---|---|---|")
        lines += [f"| {p['step']} | {p['kl']:.3f} | {p['sqrt_kl']:.3f} | {p['proxy']:.3f} | {p['gold']:.3f} |"
                  for p in report["gao"]]
    lines.append("\n![policies](policies.png)\n\n## Samples (same prompt, each policy)\n")
    lines.append("| prompt | " + " | ".join(present) + " |\n|---|" + "---|" * len(present))
    cell = lambda t: t.replace("|", "\\|").replace("\n", " ")
    for i in range(min(task.samples_shown, len(records))):
        lines.append(f"| {cell(records[i]['text'])} | " + " | ".join(cell(samples[s].texts[i]) for s in present) + " |")
    return "\n".join(lines) + "\n" + task.extra_markdown


def _write(run_dir: str, task: EvalTask, report: dict, rows: dict, samples: dict, gao: list[dict],
           present: list[str], records: Sequence[dict]) -> None:
    """report.{md,json}, PNG plots and TensorBoard events into RUN_DIR/eval."""
    from tensorboardX import SummaryWriter

    out = os.path.join(run_dir, EVAL_DIR)
    os.makedirs(out, exist_ok=True)
    # Atomic writes: a run may evaluate itself while `rlft eval` of the same run writes here too.
    write_report(out, report, _markdown(task, report, rows, samples, present, records))
    write_text(os.path.join(out, "samples.json"),
               json.dumps({s: samples[s].texts for s in present} | {"prompts": [r["text"] for r in records]}))
    writer = SummaryWriter(logdir=os.path.join(out, "tensorboard"))
    for stage in present:
        for name, value in rows[stage].items():
            if value is not None:
                writer.add_scalar(f"eval/{name}/{stage}", value, 0)
    figures = {"policies": plots.policies_figure(rows, ["proxy_reward", "gold_reward", "kl", "perplexity"])}
    if gao:
        for p in gao:
            for name in ("proxy", "gold", "kl", "sqrt_kl"):
                writer.add_scalar(f"gao/{name}", p[name], p["step"])
        figures["gao"] = plots.gao_figure(gao, task.reference)
    for name, fig in figures.items():
        writer.add_figure(f"eval/{name}", fig, 0, close=False)
        with replaced_atomically(os.path.join(out, f"{name}.png")) as tmp:
            plots.save_figure(fig, tmp)
    writer.close()
    _log(f"wrote {out}/report.md")
