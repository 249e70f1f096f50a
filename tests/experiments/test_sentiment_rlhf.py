"""End to end: `rlft run experiments/sentiment_rlhf.py:tiny` (pretrain, SFT, reward, PPO, eval) and `rlft eval`."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import rlft
from rlft.train.checkpoints import load_params
from rlft.cli.main import main
from rlft.eval.metrics import win_rate
from rlft.rl.rewards import vader

from .conftest import ROOT, run_tiny_preset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def rlhf_tiny_run(tmp_path_factory) -> str:
    return run_tiny_preset(tmp_path_factory, "sentiment_rlhf")


def _report(run_dir: str) -> dict:
    return json.load(open(os.path.join(run_dir, "eval", "report.json")))


@pytest.mark.slow
def test_tiny_run_writes_every_stage_and_the_report(rlhf_tiny_run):
    stages = json.load(open(os.path.join(rlhf_tiny_run, "stages.json")))
    assert [(s["name"], s["kind"]) for s in stages] == [("pretrain", "lm"), ("sft", "lm"), ("reward", "scalar"),
                                                        ("rl", "lm")]
    report = _report(rlhf_tiny_run)
    assert report["policies"] == ["pretrain", "sft", "rl"] and report["missing"] == ["dpo"]
    for key in ("proxy_reward", "gold_reward", "kl", "perplexity", "distinct_1", "distinct_2", "mean_length",
                "no_eos_fraction"):
        assert set(report[key]) == {"pretrain", "sft", "rl"}, key
        assert all(np.isfinite(v) for v in report[key].values()), (key, report[key])
    assert report["kl"]["sft"] == pytest.approx(0.0, abs=1e-5)  # the reference against itself
    assert 0.0 <= report["gold_win_rate_rl_vs_sft"] <= 1.0
    assert report["perplexity_rl"] == report["perplexity"]["rl"] > 1.0
    assert report["perplexity_sft"] == report["perplexity"]["sft"] > 1.0
    # The Gao curve: the reference (step 0) and every saved RL checkpoint (save_every=4 of 12 steps).
    assert [p["step"] for p in report["gao"]] == [0, 4, 8, 12]
    assert report["gao"][0]["kl"] == pytest.approx(0.0, abs=1e-5)
    for name in ("gao.png", "policies.png"):
        assert open(os.path.join(rlhf_tiny_run, "eval", name), "rb").read(8) == PNG_MAGIC
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(rlhf_tiny_run, "eval", "tensorboard")))
    markdown = open(os.path.join(rlhf_tiny_run, "eval", "report.md")).read()
    assert "gold win rate vs sft" in markdown and "![proxy and gold vs sqrt KL](gao.png)" in markdown
    assert "The reward model beyond its training corpus" in markdown
    corpora = json.load(open(os.path.join(rlhf_tiny_run, "reward", "generalization.json")))["corpora"]
    assert set(corpora) == {"movie_reviews", "amazon", "nyt", "tweets"}
    assert all(0.0 <= c["model_pairwise_accuracy"] <= 1.0 for c in corpora.values())


@pytest.mark.slow
def test_gold_figures_recompute_from_the_samples(rlhf_tiny_run):
    """The report's gold reward and win rate are VADER on the written samples (prompt + completion)."""
    samples = json.load(open(os.path.join(rlhf_tiny_run, "eval", "samples.json")))
    prompts = samples["prompts"]
    gold = {p: vader([t + c for t, c in zip(prompts, samples[p])], []) for p in ("sft", "rl")}
    report = _report(rlhf_tiny_run)
    assert report["gold_reward"]["rl"] == pytest.approx(float(np.mean(gold["rl"])), abs=1e-6)
    assert report["gold_win_rate_rl_vs_sft"] == pytest.approx(win_rate(gold["rl"], gold["sft"]))


@pytest.mark.slow
def test_rl_raised_the_proxy_reward(rlhf_tiny_run):
    """RL did what it optimises: on held-out prompts (same prompts and keys for both policies) the
    proxy reward of the RL policy is above the SFT policy's, and the policy moved away from SFT.
    Measured for seeds 0-2 of the tiny preset: proxy +0.36, +5.4, +11.7; KL 3.5-34 (module doc)."""
    report = _report(rlhf_tiny_run)
    assert report["proxy_reward"]["rl"] > report["proxy_reward"]["sft"] + 0.15, report["proxy_reward"]
    assert report["kl"]["rl"] > 0.3, report["kl"]  # ~1e-7 for SFT against itself


@pytest.mark.slow
def test_eval_of_a_partial_run_says_what_is_missing(rlhf_tiny_run, tmp_path, capsys):
    """A run without an RL stage but with a DPO policy (here: the RL checkpoints under the name dpo)."""
    partial = str(tmp_path / "partial")
    shutil.copytree(rlhf_tiny_run, partial, ignore=shutil.ignore_patterns("rl", "eval"))
    shutil.copytree(os.path.join(rlhf_tiny_run, "rl"), os.path.join(partial, "dpo"))
    assert main(["eval", partial]) == 0
    assert "stages not in this run (not evaluated): rl" in capsys.readouterr().err
    report = _report(partial)
    assert report["policies"] == ["pretrain", "sft", "dpo"] and report["missing"] == ["rl"]
    assert report["gao"] == [] and "gold_win_rate_rl_vs_sft" not in report
    # Same prompts, keys and models: each policy gets the figures it got in the full run.
    full = _report(rlhf_tiny_run)
    assert report["gold_reward"]["sft"] == pytest.approx(full["gold_reward"]["sft"], abs=1e-6)
    assert report["gold_win_rate_dpo_vs_sft"] == pytest.approx(full["gold_win_rate_rl_vs_sft"])
    assert report["kl"]["dpo"] == pytest.approx(full["kl"]["rl"], rel=1e-5)


def test_eval_refuses_what_is_not_a_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a directory made by `rlft run`" in capsys.readouterr().err


@pytest.mark.slow
def test_init_from_copies_finished_stages_and_trains_only_lora_rl(rlhf_tiny_run, tmp_path):
    """`init_from` + LoRA PPO: the finished stages are copied (not retrained), only the RL stage
    trains (its adapters; the critic starts from the reward model), and the evaluation reads the
    merged LoRA policy through `rlft.load`. That LoRA RL learns is `tests/test_rl_stage.py`'s; on this
    preset (r16 on q,k,v,o,up,down, lr 1e-2, RLOO) 48 steps raised the rollout reward of the last
    quarter over the first by +0.13, +0.14, +0.19 (seeds 0-2), 32 steps by +0.04 to +0.41."""
    workdir = str(tmp_path / "lora_ppo")
    assert main(["run", os.path.join(ROOT, "experiments/sentiment_rlhf.py:tiny"), "--workdir", workdir,
                 f"--config.init_from={rlhf_tiny_run}", "--config.rl.algorithm=ppo", "--config.rl.steps=2",
                 "--config.rl.lora.rank=16", "--config.rl.lora.alpha=32", "--config.rl.lora.targets=q,k,v,o,up,down",
                 "--config.rl.learning_rate=1e-2", "--config.eval.num_prompts=16"]) == 0
    for stage in ("pretrain", "sft", "reward"):  # copied, not retrained: the same metrics lines
        assert (open(os.path.join(workdir, stage, "metrics.jsonl")).read()
                == open(os.path.join(rlhf_tiny_run, stage, "metrics.jsonl")).read())
    metrics = [json.loads(l) for l in open(os.path.join(workdir, "rl", "metrics.jsonl"))]
    assert len(metrics) == 2 and "val/explained_variance" in metrics[-1]  # PPO: the critic (from the reward model)
    saved, _ = load_params(os.path.join(workdir, "rl"))  # adapters only
    names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(saved)[0]]
    assert names and all("_lora/" in n for n in names), names[:3]
    sft, rl = rlft.load(os.path.join(workdir, "sft")), rlft.load(os.path.join(workdir, "rl"))
    ids = [[5, 9, 17, 33, 2]]
    assert not np.allclose(rl.logits(ids), sft.logits(ids), atol=1e-4)  # the adapters are merged in
    report = _report(workdir)
    assert 0.0 <= report["gold_win_rate_rl_vs_sft"] <= 1.0 and np.isfinite(report["kl"]["rl"])
