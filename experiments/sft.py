"""Supervised fine-tuning on your data: a Hugging Face checkpoint or an rlft stage, a local file of
prompts and completions.

    rlft run experiments/sft.py --config.model.path=CHECKPOINT_DIR --config.data.train=train.jsonl \\
        --config.data.prompt_field=question --config.data.completion_field=answer --config.data.chat_template=true

The model, its tokenizer and the data section are those of experiments/rl.py (see its docstring
and `rlft.recipes.general`): each row gives a prompt (row[data.prompt_field], a string or chat
messages, templated with data.chat_template=true) and a completion (row[data.completion_field],
text), closed by the tokenizer's EOS. The loss is on completion tokens only (the prompt is
masked; sft.full_sequence_loss=true trains on both); sequences longer than sft.max_length are
truncated (the prompt loses its start). `--config.sft.lora.rank=16` trains adapters only.

With data.eval, the report (WORKDIR/eval/report.json, also `rlft eval WORKDIR`) gives the
per-token negative log-likelihood and perplexity of the eval completions under the starting model
and the trained one.
"""

from __future__ import annotations

import math
import os

import ml_collections

from rlft.eval.report import write_report
from rlft.generate.scoring import completion_token_logprobs
from rlft.parallel.sharding import make_mesh
from rlft.recipes.general import (check_paths, completion_ids, data_rows, experiment_config, load_starting_model,
                                  prompt_records, save_run_files)
from rlft.train.stages import run_sft_stage, sft_stage_config


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    """Presets: "default" (a small model on one accelerator) and "tiny" (tests)."""
    c = experiment_config("sft", preset)
    c.sft = sft_stage_config(steps=1000, batch_size=32, learning_rate=1e-5, max_length=1024, save_every=250)
    c.eval = ml_collections.ConfigDict(dict(batch_size=32, max_examples=512))
    if preset == "tiny":
        c.sft.update(steps=4, batch_size=8, learning_rate=1e-3, max_length=48, save_every=2)
        c.eval.update(batch_size=8, max_examples=32)
    return c


def check(config: ml_collections.ConfigDict) -> None:
    """Before anything is written: model.path and data.train are set, model.path exists."""
    check_paths(config, "sft.py")


def examples_of(rows: list[dict], config: ml_collections.ConfigDict, start, flag: str) -> list:
    """(prompt ids, completion ids + EOS) of each row."""
    data = config.data
    prompts = prompt_records(rows, start.tokenizer, data, flag)
    completions = completion_ids(rows, data.completion_field, "data.completion_field",
                                 f"{flag}={data.get(flag.split('.')[1])}", start)
    return [(p["ids"], c) for p, c in zip(prompts, completions)]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The SFT stage "sft" from model.path on data.train, then `evaluate` when data.eval is set."""
    check(config)
    mesh = make_mesh(dict(config.mesh))
    start = load_starting_model(config.model, mesh)
    examples = examples_of(data_rows(config.data, "train"), config, start, "data.train")
    save_run_files(workdir, start)
    run_sft_stage(name="sft", workdir=workdir, graphdef=start.graphdef, params=start.params, examples=examples,
                  cfg=config.sft, mesh=mesh, seed=config.seed, pad_id=start.pad_id, base=start.path)
    return evaluate(config, workdir) if config.data.eval else {"sft_steps": config.sft.steps}


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`rlft eval WORKDIR`: completion NLL per token and perplexity on data.eval (its first
    eval.max_examples rows), starting model vs the SFT stage; writes WORKDIR/eval/report.{json,md}."""
    mesh = make_mesh(dict(config.mesh))
    start = load_starting_model(config.model, mesh)
    rows = data_rows(config.data, "eval")[:config.eval.max_examples or None]
    examples = examples_of(rows, config, start, "data.eval")
    trained = load_starting_model(ml_collections.ConfigDict({**config.model.to_dict(),
                                                            "path": os.path.join(workdir, "sft")}), mesh)
    report = {"eval_examples": len(examples)}
    for name, model in (("start", start), ("sft", trained)):
        logp, mask = completion_token_logprobs(model.graphdef, model.params, examples, config.sft.max_length,
                                               model.pad_id, mesh, min(config.eval.batch_size, len(examples)))
        nll = float(-(logp * mask).sum() / max(mask.sum(), 1))
        report[f"nll_{name}"], report[f"perplexity_{name}"] = nll, math.exp(min(nll, 700.0))
    lines = ["# SFT: the starting model and the trained one on data.eval", "",
             f"{len(examples)} examples of {config.data.eval}; completion tokens only.", "",
             "| model | NLL / token | perplexity |", "|---|---|---|"]
    lines += [f"| {n} | {report[f'nll_{n}']:.4f} | {report[f'perplexity_{n}']:.3f} |" for n in ("start", "sft")]
    write_report(os.path.join(workdir, "eval"), report, "\n".join(lines) + "\n")
    return report
