"""A reward model from your preference data: a Hugging Face checkpoint or an rlft stage as the
backbone, a local file of (prompt, chosen, rejected) rows, Bradley–Terry.

    rlft run experiments/reward.py --config.model.path=CHECKPOINT_DIR --config.data.train=pairs.jsonl
    rlft run experiments/rl.py ... --config.rl.rewards=reward_model --config.rl.reward_model=WORKDIR/reward

The model, its tokenizer and the data section are those of experiments/rl.py (`rlft.recipes.general`);
rows are read as by experiments/dpo.py. The stage "reward" (kind scalar) is the backbone with a
new zero-initialised scalar head, scored at each sequence's last token (the EOS that closes the
completion). After training, its scores of the chosen and rejected completions of data.eval (or,
without it, of data.train) go to WORKDIR/reward/reward_stats.json with how inputs are framed (the
prompt as rendered, the completion closed by EOS), so `rlft.load(WORKDIR/reward).score(texts,
prompts)` and an RL stage's `reward_model` reward normalise and tokenise alike.

With data.eval, the report (WORKDIR/eval/report.json, also `rlft eval WORKDIR`) gives the pairwise
accuracy (chosen scored above rejected) and the mean score margin on the eval pairs.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

import rlft

from rlft.eval.report import write_report
from rlft.generate.scoring import read_reward_stats, sequence_scores, write_reward_stats
from rlft.parallel.sharding import make_mesh
from rlft.recipes.general import (check_paths, data_rows, encoded_pairs, experiment_config, load_starting_model,
                                  save_run_files)
from rlft.train.stages import reward_stage_config, run_reward_stage
from rlft.train.warm_start import scalar_model_from_lm


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    """Presets: "default" (a small model on one accelerator) and "tiny" (tests)."""
    c = experiment_config("reward", preset)
    c.reward = reward_stage_config(steps=1000, batch_size=16, learning_rate=1e-5, max_length=1024, save_every=250)
    c.eval = ml_collections.ConfigDict(dict(batch_size=32, max_pairs=512))
    if preset == "tiny":
        c.reward.update(steps=6, batch_size=8, learning_rate=1e-3, max_length=48, save_every=3)
        c.eval.update(batch_size=8, max_pairs=32)
    return c


def check(config: ml_collections.ConfigDict) -> None:
    """Before anything is written: model.path and data.train are set, model.path exists."""
    check_paths(config, "reward.py")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The reward stage from model.path on data.train, its reward_stats.json, then `evaluate`
    when data.eval is set."""
    check(config)
    mesh = make_mesh(dict(config.mesh))
    start = load_starting_model(config.model, mesh)
    train_rows = data_rows(config.data, "train")
    pairs = encoded_pairs(train_rows, config.data, start, "data.train")
    save_run_files(workdir, start)
    graphdef, params = scalar_model_from_lm(start.config, start.params, mesh, seed=config.seed)
    params = run_reward_stage(name="reward", workdir=workdir, graphdef=graphdef, params=params, pairs=pairs,
                              cfg=config.reward, mesh=mesh, seed=config.seed, pad_id=start.pad_id, base=start.path)
    stage_dir = os.path.join(workdir, "reward")
    if read_reward_stats(stage_dir) is None:
        which = "eval" if config.data.eval else "train"
        rows = (data_rows(config.data, "eval") if config.data.eval else train_rows)[:config.eval.max_pairs or None]
        scores = pair_scores(graphdef, params, encoded_pairs(rows, config.data, start, f"data.{which}"), config,
                             start.pad_id, mesh)
        # The prompt carries the tokenizer's own special tokens (render_prompt); EOS closes completions.
        write_reward_stats(stage_dir, scores.reshape(-1), f"chosen and rejected completions of "
                           f"{config.data[which]}", add_bos=False, add_eos=True, max_length=config.reward.max_length)
    return evaluate(config, workdir) if config.data.eval else {"reward_steps": config.reward.steps}


def pair_scores(graphdef, params, pairs: list, config: ml_collections.ConfigDict, pad_id: int, mesh) -> np.ndarray:
    """float32 [pairs, 2]: the reward model's scores of each pair's chosen and rejected sequences."""
    sides = [side for pair in pairs for side in pair]
    return sequence_scores(graphdef, params, sides, config.reward.max_length, pad_id, mesh,
                           min(config.eval.batch_size, len(sides))).reshape(-1, 2)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`rlft eval WORKDIR`: pairwise accuracy and mean margin of the reward stage on data.eval's
    pairs (its first eval.max_pairs rows); writes WORKDIR/eval/report.{json,md}."""
    mesh = make_mesh(dict(config.mesh))
    start = load_starting_model(config.model, mesh)
    rows = data_rows(config.data, "eval")[:config.eval.max_pairs or None]
    pairs = encoded_pairs(rows, config.data, start, "data.eval")
    stage = rlft.load(os.path.join(workdir, "reward"))
    scores = pair_scores(stage.graphdef, stage.params, pairs, config, start.pad_id, mesh)
    margin = scores[:, 0] - scores[:, 1]
    report = {"eval_pairs": len(pairs), "accuracy": float(np.mean(margin > 0)), "margin": float(np.mean(margin))}
    lines = ["# Reward model on data.eval's pairs", "", f"{len(pairs)} pairs of {config.data.eval}: the "
             f"chosen completion scored above the rejected one in {report['accuracy']:.3f} of them "
             f"(mean margin {report['margin']:.4f})."]
    write_report(os.path.join(workdir, "eval"), report, "\n".join(lines) + "\n")
    return report
