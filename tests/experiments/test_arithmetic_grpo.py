"""End to end: `rlft run experiments/arithmetic_grpo.py:tiny` (SFT then GRPO on exact match)."""

import json
import math
import os

import numpy as np
import pytest

import rlft
from rlft import config as config_lib
from rlft.cli.main import main
from rlft.data.arithmetic import split_problems
from rlft.errors import RlftError
from tests.experiments.conftest import ROOT, assert_rlft_eval_reproduces_the_report

EXPERIMENT = os.path.join(ROOT, "experiments", "arithmetic_grpo.py")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("arithmetic_grpo_tiny"))
    assert main(["run", f"{EXPERIMENT}:tiny", "--workdir", workdir]) == 0
    return workdir


@pytest.mark.slow
def test_tiny_run_report_and_stages(tiny_run):
    report = json.load(open(os.path.join(tiny_run, "eval", "report.json")))
    for key in ("accuracy_sft", "accuracy_rl", "accuracy_init", "format_sft", "format_rl", "format_init"):
        assert math.isfinite(report[key]) and 0.0 <= report[key] <= 1.0, key
    config = json.load(open(os.path.join(tiny_run, "run_config.json")))
    assert report["test_problems"] == config["task"]["num_test"] == 64
    # Training does something: the untrained model never ends a well-formed integer with EOS.
    assert report["format_sft"] > report["format_init"] + 0.5
    assert report["accuracy_sft"] >= report["accuracy_init"]
    assert "| SFT (" in open(os.path.join(tiny_run, "eval", "report.md")).read()
    # eval.samples_per_problem=4, eval.k=2 in the tiny preset: pass@1 <= pass@2, both in [0, 1]
    assert report["sampling"]["samples_per_problem"] == 4 and report["sampling"]["k"] == 2
    for name in ("init", "sft", "rl"):
        values = [report[f"{key}_{name}"] for key in ("pass@1", "pass@2", "maj@2", "mean_reward")]
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values), (name, values)
        assert report[f"pass@1_{name}"] <= report[f"pass@2_{name}"] + 1e-12
        assert report[f"mean_reward_{name}"] == pytest.approx(report[f"pass@1_{name}"])  # exact match
    assert report["pass@2_sft"] > report["pass@2_init"]
    assert "| pass@1 | pass@2 | maj@2 | mean reward |" in open(os.path.join(tiny_run, "eval", "report.md")).read()
    for stage, steps in (("sft", config["sft"]["steps"]), ("rl", config["rl"]["steps"])):
        lines = [json.loads(line) for line in open(os.path.join(tiny_run, stage, "metrics.jsonl"))]
        assert [line["step"] for line in lines] == list(range(1, steps + 1))
        saved = os.listdir(os.path.join(tiny_run, stage, "checkpoints"))
        assert steps in [int(d) for d in saved if d.isdigit()]
    assert [s["name"] for s in json.load(open(os.path.join(tiny_run, "stages.json")))] == ["sft", "rl"]
    rl_lines = [json.loads(line) for line in open(os.path.join(tiny_run, "rl", "metrics.jsonl"))]
    assert max(line["reward/mean"] for line in rl_lines) > 0  # SFT left the RL stage something to learn from


@pytest.mark.slow
def test_test_problems_never_occur_in_training(tiny_run):
    problems = {split: [json.loads(line) for line in open(os.path.join(tiny_run, f"{split}.jsonl"))]
                for split in ("train", "test")}
    config = json.load(open(os.path.join(tiny_run, "run_config.json")))
    task = config["task"]
    train, test = split_problems(task["max_operand"], task["ops"], task["num_test"], task["num_train"],
                                 config["seed"])
    assert problems == {"train": [{"prompt": p.prompt, "answer": p.answer} for p in train],
                        "test": [{"prompt": p.prompt, "answer": p.answer} for p in test]}
    assert len(test) == 64 and not {p.prompt for p in test} & {p.prompt for p in train}
    report = json.load(open(os.path.join(tiny_run, "eval", "report.json")))
    assert report["train_problems"] == len(train) == (task["max_operand"] + 1) ** 2 - 64


@pytest.mark.slow
def test_rlft_eval_reproduces_the_report_and_evaluates_a_partial_run(tiny_run, tmp_path):
    """`rlft eval` calls the experiment's evaluate(config, workdir): the same report as the run's
    (greedy decoding), and on a run whose RL stage has no checkpoint yet, the policies it has."""
    import shutil

    assert_rlft_eval_reproduces_the_report(tiny_run)
    written = json.load(open(os.path.join(tiny_run, "eval", "report.json")))
    partial = str(tmp_path / "partial")
    shutil.copytree(tiny_run, partial, ignore=shutil.ignore_patterns("rl", "eval"))
    assert main(["eval", partial]) == 0
    report = json.load(open(os.path.join(partial, "eval", "report.json")))
    assert report["policies"] == ["init", "sft"] and "accuracy_rl" not in report
    assert report["accuracy_sft"] == written["accuracy_sft"]


@pytest.mark.slow
def test_both_policies_load_and_generate(tiny_run):
    sft, rl = rlft.load(os.path.join(tiny_run, "sft")), rlft.load(os.path.join(tiny_run, "rl"))
    for model in (sft, rl):
        assert model.kind == "lm" and model.tokenizer.eos_token_id == 0
        out = model.generate(["12+34="], temperature=0)
        assert isinstance(out["text"][0], str)
    ids = np.array([sft.tokenizer.encode("12+34=", add_special_tokens=False)])
    assert ids.shape == (1, 6)
    assert np.abs(sft.logits(ids) - rl.logits(ids)).max() > 0  # RL changed the policy


def test_presets_and_config_errors(tmp_path, capsys):
    _, _, config = config_lib.load_experiment(EXPERIMENT)
    assert (config.task.ops, config.rl.algorithm) == ("+", "grpo")
    assert config.sft.max_length == len("99+99=") + len("198") + 1 and config.rl.max_new_tokens == 4
    assert config.sft.warmup_steps == config.sft.steps  # warm-up over the whole budget, no decay
    module, _, _ = config_lib.load_experiment(f"{EXPERIMENT}:tiny")
    with pytest.raises(RlftError, match="unknown preset"):
        module.get_config("huge")
    assert (config.eval.samples_per_problem, config.eval.k) == (8, 8)
    tiny = module.get_config("tiny")
    assert (tiny.eval.samples_per_problem, tiny.eval.k) == (4, 2)
    tiny.eval.k = 5
    with pytest.raises(RlftError, match=r"eval\.k=5 must be in \[1, eval\.samples_per_problem=4\]"):
        module.evaluate(tiny, str(tmp_path / "k"))  # checked before anything is loaded
    for flag, field in (("--config.task.ops=+/", "task.ops"),
                        ("--config.task.max_operand=0", "task.max_operand"),
                        ("--config.task.num_test=400", "task.num_test"),
                        ("--config.task.max_operand=999", "sft.max_length")):
        assert main(["run", f"{EXPERIMENT}:tiny", flag, "--workdir", str(tmp_path / field)]) == 2
        assert field in capsys.readouterr().err


def test_user_algorithm_pieces_selected_by_flags_only(tiny_run, tmp_path):
    """A test-local module's advantage estimator and policy loss, named by --config flags on the tiny
    preset (the SFT stage reused from the tiny run), are what the RL stage trains with: both were
    called, loss/policy is −1 (every group's mean advantage is 1 under optimistic_advantage, the
    ratio 1) and policy/clipfrac is 1 (plain_pg_loss marks every token) at every step."""
    import shutil

    from tests.fixtures import user_algorithms

    user_algorithms.CALLS.clear()
    shutil.copytree(os.path.join(tiny_run, "sft"), tmp_path / "sft")
    user = "tests.fixtures.user_algorithms"
    assert main(["run", f"{EXPERIMENT}:tiny", "--workdir", str(tmp_path),
                 f"--config.rl.advantage={user}:optimistic_advantage",
                 f"--config.rl.policy_loss={user}:plain_pg_loss"]) == 0
    assert user_algorithms.CALLS["advantage"] >= 1 and user_algorithms.CALLS["policy_loss"] >= 1
    logged = [json.loads(line) for line in open(tmp_path / "rl" / "metrics.jsonl")]
    assert len(logged) == 4
    for record in logged:
        np.testing.assert_allclose(record["loss/policy"], -1.0, rtol=1e-5)
        assert record["policy/clipfrac"] == 1.0
    assert json.load(open(tmp_path / "run_config.json"))["rl"]["advantage"] == f"{user}:optimistic_advantage"
