"""experiments/sft.py, dpo.py and reward.py on a random-weight Hugging Face Qwen2 checkpoint (the one of
test_rl_byo.py: a chat template, two EOS ids) and JSONL files made here: SFT's first loss is the
completion-only NLL computed by transformers (the prompt is masked), DPO's first loss is log 2, the
reward stage learns the pairs and is a valid rl.reward_model for experiments/rl.py."""

import json
import math
import os

import numpy as np
import pytest

from rlft.cli.main import main
from tests.experiments.conftest import ROOT
from tests.experiments.test_rl_byo import write_checkpoint

QUESTION = "2+5"
ANSWER = "7"


def experiment(name: str) -> str:
    return os.path.join(ROOT, "experiments", f"{name}.py")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("general")
    write_checkpoint(root / "qwen2")
    (root / "sft.jsonl").write_text((json.dumps({"question": QUESTION, "answer": ANSWER}) + "\n") * 8)
    rng = np.random.default_rng(0)
    pairs = [{"question": f"{a}+{b}", "chosen": "77", "rejected": "11"} for a, b in rng.integers(0, 20, (32, 2))]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return root


def metrics(workdir, stage) -> list[dict]:
    return [json.loads(line) for line in open(workdir / stage / "metrics.jsonl")]


COMMON = ["--config.data.prompt_field=question", "--config.data.chat_template=true"]


@pytest.mark.slow
def test_sft_loss_is_the_completion_nll_of_transformers(files, tmp_path):
    """Eight copies of one row (so every batch is known): step 1's loss == the mean NLL of the completion tokens
    ("7" and the closing EOS) under the transformers model; the NLL of all tokens would differ."""
    import torch
    import transformers as tf

    workdir = tmp_path / "sft"
    assert main(["run", f"{experiment('sft')}:tiny", "--workdir", str(workdir), *COMMON,
                 f"--config.model.path={files / 'qwen2'}", f"--config.data.train={files / 'sft.jsonl'}",
                 f"--config.data.eval={files / 'sft.jsonl'}", "--config.data.completion_field=answer",
                 "--config.sft.steps=2"]) == 0
    tok = tf.AutoTokenizer.from_pretrained(files / "qwen2")
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                     tokenize=False)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    completion_ids = tok.encode(ANSWER, add_special_tokens=False) + [tok.eos_token_id]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(tf.AutoModelForCausalLM.from_pretrained(files / "qwen2")(ids).logits[0, :-1], -1)
    token_nll = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].numpy()
    completion_nll = token_nll[len(prompt_ids) - 1:].mean()
    first = metrics(workdir, "sft")[0]
    assert first["train/loss"] == pytest.approx(completion_nll, rel=1e-4, abs=1e-5)
    assert abs(token_nll.mean() - completion_nll) > 1e-2  # the test would see an unmasked prompt
    report = json.load(open(workdir / "eval" / "report.json"))
    assert report["nll_start"] == pytest.approx(completion_nll, rel=1e-4) and report["nll_sft"] < report["nll_start"]


@pytest.mark.slow
def test_dpo_starts_at_log_2_and_learns_the_pairs(files, tmp_path):
    workdir = tmp_path / "dpo"
    assert main(["run", f"{experiment('dpo')}:tiny", "--workdir", str(workdir), *COMMON,
                 f"--config.model.path={files / 'qwen2'}", f"--config.data.train={files / 'pairs.jsonl'}",
                 f"--config.data.eval={files / 'pairs.jsonl'}", "--config.dpo.steps=6"]) == 0
    lines = metrics(workdir, "dpo")
    assert lines[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert lines[-1]["train/loss"] < lines[0]["train/loss"]
    report = json.load(open(workdir / "eval" / "report.json"))
    assert report["implicit_reward_accuracy"] > 0.9 and report["likelier_chosen_dpo"] >= report["likelier_chosen_start"]


@pytest.mark.slow
def test_a_reward_stage_from_a_checkpoint_rewards_rl(files, tmp_path):
    """The reward stage separates "77" from "11" on the eval pairs, writes reward_stats.json, and
    experiments/rl.py takes it as rl.reward_model (same vocabulary: scored from the token ids)."""
    workdir = tmp_path / "reward"
    assert main(["run", f"{experiment('reward')}:tiny", "--workdir", str(workdir), *COMMON,
                 f"--config.model.path={files / 'qwen2'}", f"--config.data.train={files / 'pairs.jsonl'}",
                 f"--config.data.eval={files / 'pairs.jsonl'}"]) == 0
    report = json.load(open(workdir / "eval" / "report.json"))
    assert report["accuracy"] == 1.0 and report["margin"] > 0
    stats = json.load(open(workdir / "reward" / "reward_stats.json"))
    assert stats["count"] == 64 and stats["std"] > 0 and not stats["add_bos"] and stats["add_eos"]
    rl = tmp_path / "rl"
    assert main(["run", f"{experiment('rl')}:tiny", "--workdir", str(rl), *COMMON,
                 f"--config.model.path={files / 'qwen2'}", f"--config.data.train={files / 'pairs.jsonl'}",
                 "--config.rl.rewards=reward_model", f"--config.rl.reward_model={workdir / 'reward'}",
                 "--config.rl.steps=2"]) == 0
    assert [line["step"] for line in metrics(rl, "rl")] == [1, 2]
    assert all(np.isfinite(line["objective/scores"]) for line in metrics(rl, "rl"))
