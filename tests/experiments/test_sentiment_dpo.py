"""End to end: `rlft run experiments/sentiment_dpo.py:tiny --config.init_from=<a sentiment run>`."""

import json
import os

import numpy as np
import pytest

import rlft
from tests.experiments.conftest import assert_rlft_eval_reproduces_the_report
from rlft.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def dpo_tiny_run(reward_tiny_run, tmp_path_factory):
    """DPO from the pretrain stage of the tiny reward run (tokenizer and model config come with it)."""
    workdir = str(tmp_path_factory.mktemp("sentiment_dpo_tiny"))
    assert main(["run", os.path.join(ROOT, "experiments/sentiment_dpo.py:tiny"), "--workdir", workdir,
                 f"--config.init_from={reward_tiny_run}"]) == 0
    return workdir


@pytest.mark.slow
def test_tiny_dpo_run_writes_report_and_metrics(dpo_tiny_run, reward_tiny_run):
    report = json.load(open(os.path.join(dpo_tiny_run, "eval", "report.json")))
    assert report["test_pairs"] == 64 and report["train_pairs"] == 64
    for key in ("implicit_reward_accuracy", "reference_likelihood_accuracy", "vader_pairwise_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    assert np.isfinite(report["implicit_reward_margin"])
    # DPO fitted its training pairs: β·log π/π_ref ranks chosen above rejected on most of them
    # (~0.94-1.0 and margin ~0.3 over seeds 0-3; 0 and 0 with dpo.learning_rate=0).
    assert report["train_implicit_reward_accuracy"] > 0.75
    assert report["train_implicit_reward_margin"] > 0.1
    assert "| DPO implicit reward" in open(os.path.join(dpo_tiny_run, "eval", "report.md")).read()
    lines = [json.loads(l) for l in open(os.path.join(dpo_tiny_run, "dpo", "metrics.jsonl"))]
    assert [l["step"] for l in lines] == list(range(1, 9))
    # The first step sees the policy equal to its reference: the loss is log 2, every margin 0.
    assert lines[0]["train/loss"] == pytest.approx(np.log(2.0), abs=1e-6)
    assert abs(lines[0]["train/rewards/margins"]) < 1e-6
    assert {"train/rewards/accuracies", "train/rewards/chosen", "train/rewards/rejected",
            "train/logps/chosen", "train/logps/rejected"} <= set(lines[-1])
    # init_from: no pretraining here; the tokenizer and model config come from the reward run.
    assert [s["name"] for s in json.load(open(os.path.join(dpo_tiny_run, "stages.json")))] == ["sft", "dpo"]
    assert (open(os.path.join(dpo_tiny_run, "model_config.json")).read()
            == open(os.path.join(reward_tiny_run, "model_config.json")).read())


@pytest.mark.slow
def test_load_the_dpo_policy(dpo_tiny_run):
    policy = rlft.load(dpo_tiny_run)
    reference = rlft.load(os.path.join(dpo_tiny_run, "sft"))
    assert policy.kind == "lm"
    ids = np.array([policy.tokenizer.encode("Write a positive movie review sentence:\na fine film")])
    assert np.abs(policy.logits(ids) - reference.logits(ids)).max() > 1e-5


@pytest.mark.slow
def test_rlft_eval_reproduces_the_report(dpo_tiny_run):
    assert_rlft_eval_reproduces_the_report(dpo_tiny_run)
