"""Direct preference optimisation on your data: a Hugging Face checkpoint or an rlft stage, a local
file of (prompt, chosen, rejected) rows.

    rlft run experiments/dpo.py --config.model.path=CHECKPOINT_DIR --config.data.train=pairs.jsonl \\
        --config.dpo.beta=0.1 --config.dpo.loss_type=sigmoid|ipo

The model, its tokenizer and the data section are those of experiments/rl.py (`rlft.recipes.general`):
each row gives a prompt (row[data.prompt_field], a string or chat messages, templated with
data.chat_template=true) and two completions, row[data.chosen_field] and row[data.rejected_field]
(text, closed by the tokenizer's EOS). The loss reads completion log-probabilities only (the
prompt is masked). The reference is the starting model, frozen (with LoRA, the base with the
adapters off). At the first step the policy is the reference, so the loss is log 2.

With data.eval, the report (WORKDIR/eval/report.json, also `rlft eval WORKDIR`) gives, on the eval
pairs, how often the chosen completion is the likelier one (start and trained), and the DPO
implicit reward's accuracy and mean margin, β·(Δ log-ratio chosen − rejected), of the trained policy.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from rlft.eval.report import write_report
from rlft.generate.scoring import completion_logprobs
from rlft.parallel.sharding import make_mesh
from rlft.recipes.general import (check_paths, data_rows, encoded_pairs, experiment_config, load_starting_model,
                                  save_run_files)
from rlft.train.stages import dpo_stage_config, run_dpo_stage


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    """Presets: "default" (a small model on one accelerator) and "tiny" (tests)."""
    c = experiment_config("dpo", preset)
    c.dpo = dpo_stage_config(steps=1000, batch_size=16, learning_rate=5e-7, max_length=1024, save_every=250)
    c.eval = ml_collections.ConfigDict(dict(batch_size=32, max_pairs=512))
    if preset == "tiny":
        c.dpo.update(steps=4, batch_size=8, learning_rate=1e-3, max_length=48, save_every=2)
        c.eval.update(batch_size=8, max_pairs=32)
    return c


def check(config: ml_collections.ConfigDict) -> None:
    """Before anything is written: model.path and data.train are set, model.path exists."""
    check_paths(config, "dpo.py")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The DPO stage "dpo" from model.path on data.train, then `evaluate` when data.eval is set."""
    check(config)
    mesh = make_mesh(dict(config.mesh))
    start = load_starting_model(config.model, mesh)
    pairs = encoded_pairs(data_rows(config.data, "train"), config.data, start, "data.train")
    save_run_files(workdir, start)
    run_dpo_stage(name="dpo", workdir=workdir, graphdef=start.graphdef, params=start.params, pairs=pairs,
                  cfg=config.dpo, mesh=mesh, seed=config.seed, pad_id=start.pad_id, base=start.path)
    return evaluate(config, workdir) if config.data.eval else {"dpo_steps": config.dpo.steps}


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`rlft eval WORKDIR`: preference accuracies on data.eval's pairs (its first eval.max_pairs
    rows), the starting model vs the DPO stage; writes WORKDIR/eval/report.{json,md}."""
    mesh = make_mesh(dict(config.mesh))
    start = load_starting_model(config.model, mesh)
    rows = data_rows(config.data, "eval")[:config.eval.max_pairs or None]
    pairs = encoded_pairs(rows, config.data, start, "data.eval")
    trained = load_starting_model(ml_collections.ConfigDict({**config.model.to_dict(),
                                                            "path": os.path.join(workdir, "dpo")}), mesh)

    def logps(model) -> np.ndarray:  # [pairs, 2]: log p(chosen | prompt), log p(rejected | prompt)
        flat = [side for pair in pairs for side in pair]
        return completion_logprobs(model.graphdef, model.params, flat, config.dpo.max_length, model.pad_id, mesh,
                                   min(config.eval.batch_size, len(flat))).reshape(-1, 2)

    before, after = logps(start), logps(trained)
    margin = config.dpo.beta * ((after - before) @ np.array([1.0, -1.0]))
    report = {"eval_pairs": len(pairs),
              "likelier_chosen_start": float(np.mean(before[:, 0] > before[:, 1])),
              "likelier_chosen_dpo": float(np.mean(after[:, 0] > after[:, 1])),
              "implicit_reward_accuracy": float(np.mean(margin > 0)),
              "implicit_reward_margin": float(np.mean(margin))}
    lines = ["# DPO: the starting model and the trained policy on data.eval's pairs", "",
             f"{len(pairs)} pairs of {config.data.eval}.", "",
             "| | start | dpo |", "|---|---|---|",
             f"| chosen is the likelier completion | {report['likelier_chosen_start']:.3f} | "
             f"{report['likelier_chosen_dpo']:.3f} |", "",
             f"Implicit reward β·(log-ratio chosen − rejected): accuracy {report['implicit_reward_accuracy']:.3f}, "
             f"mean margin {report['implicit_reward_margin']:.4f}."]
    write_report(os.path.join(workdir, "eval"), report, "\n".join(lines) + "\n")
    return report
