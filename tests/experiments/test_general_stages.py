"""experiments/sft.py, dpo.py and reward.py on a random-weight Hugging Face Qwen2 checkpoint (the one of
test_rl_byo.py: a chat template, two EOS ids) and JSONL files made here: SFT's first loss is the
completion-only NLL computed by transformers (the prompt is masked), DPO's first loss is log 2, the
reward stage learns the pairs and is a valid rl.reward_model for experiments/rl.py."""

import json
import math
import os

import numpy as np
import pytest

import rlft

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
    (root / "dpo.jsonl").write_text((json.dumps({"question": QUESTION, "chosen": ANSWER, "rejected": "9"}) + "\n") * 8)
    return root


def completion_logp(checkpoint, completion: str) -> tuple[float, np.ndarray]:
    """(log p(completion + EOS | the templated QUESTION), the NLL of every token of the whole
    sequence) under the transformers model at `checkpoint`: the independent reference."""
    import torch
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(checkpoint)
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                     tokenize=False)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    ids = torch.tensor([prompt_ids + tok.encode(completion, add_special_tokens=False) + [tok.eos_token_id]])
    with torch.no_grad():
        logp = torch.log_softmax(tf.AutoModelForCausalLM.from_pretrained(checkpoint)(ids).logits[0, :-1], -1)
    token_nll = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].numpy()
    return -float(token_nll[len(prompt_ids) - 1:].sum()), token_nll


def metrics(workdir, stage) -> list[dict]:
    return [json.loads(line) for line in open(workdir / stage / "metrics.jsonl")]


COMMON = ["--config.data.prompt_field=question", "--config.data.chat_template=true"]


@pytest.mark.slow
def test_sft_loss_is_the_completion_nll_of_transformers(files, tmp_path):
    """Eight copies of one row (so every batch is known): step 1's loss == the mean NLL of the completion tokens
    ("7" and the closing EOS) under the transformers model; the NLL of all tokens would differ."""
    workdir = tmp_path / "sft"
    assert main(["run", f"{experiment('sft')}:tiny", "--workdir", str(workdir), *COMMON,
                 f"--config.model.path={files / 'qwen2'}", f"--config.data.train={files / 'sft.jsonl'}",
                 f"--config.data.eval={files / 'sft.jsonl'}", "--config.data.completion_field=answer",
                 "--config.sft.steps=2"]) == 0
    logp, token_nll = completion_logp(files / "qwen2", ANSWER)
    completion_nll = -logp / 2  # "7" and the closing EOS
    first = metrics(workdir, "sft")[0]
    assert first["train/loss"] == pytest.approx(completion_nll, rel=1e-4, abs=1e-5)
    assert abs(token_nll.mean() - completion_nll) > 1e-2  # the test would see an unmasked prompt
    report = json.load(open(workdir / "eval" / "report.json"))
    assert report["nll_start"] == pytest.approx(completion_nll, rel=1e-4) and report["nll_sft"] < report["nll_start"]
    # The trained stage is a starting model too (model.path = a stage of an rlft run): its
    # tokenizer and both EOS ids come from the run. LoRA in the other layer layout (scan_layers):
    # the RL stage's adapters merge onto its unrolled base when loaded.
    rl = tmp_path / "rl"
    assert main(["run", f"{experiment('rl')}:tiny", "--workdir", str(rl), *COMMON,
                 f"--config.model.path={workdir / 'sft'}",
                 f"--config.data.train={files / 'sft.jsonl'}", "--config.rl.steps=2", "--config.model.scan_layers=true",
                 "--config.model.remat=full", "--config.rl.lora.rank=4", "--config.rl.learning_rate=3e-2",
                 "--config.rl.rewards=length", "--config.rl.length_buffer=8"]) == 0  # dense: lengths differ
    assert json.load(open(rl / "tokenizer" / "generation_config.json")) == {"eos_token_id": [0, 3]}
    ids = np.array([[4, 5, 6, 7, 8]])
    tuned, base = rlft.load(str(rl / "rl")), rlft.load(str(workdir / "sft"))
    assert tuned.config.scan_layers and not base.config.scan_layers
    assert 1e-4 < np.abs(tuned.logits(ids) - base.logits(ids)).max() < 10


@pytest.mark.slow
def test_dpo_starts_at_log_2_on_completion_log_probs(files, tmp_path):
    """Eight copies of one pair: step 1's loss is log 2 (policy == reference), its log-probs are
    transformers' log p(completion | prompt) (the prompt masked), and the pairs are learned."""
    workdir = tmp_path / "dpo"
    assert main(["run", f"{experiment('dpo')}:tiny", "--workdir", str(workdir), *COMMON,
                 f"--config.model.path={files / 'qwen2'}", f"--config.data.train={files / 'dpo.jsonl'}",
                 f"--config.data.eval={files / 'dpo.jsonl'}", "--config.dpo.steps=6"]) == 0
    lines = metrics(workdir, "dpo")
    assert lines[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert lines[0]["train/logps/chosen"] == pytest.approx(completion_logp(files / "qwen2", ANSWER)[0], rel=1e-4)
    assert lines[0]["train/logps/rejected"] == pytest.approx(completion_logp(files / "qwen2", "9")[0], rel=1e-4)
    assert lines[-1]["train/loss"] < lines[0]["train/loss"]
    report = json.load(open(workdir / "eval" / "report.json"))
    assert report["implicit_reward_accuracy"] == 1.0 and report["likelier_chosen_dpo"] == 1.0


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


@pytest.mark.slow
def test_a_hugging_face_sequence_classifier_rewards_rl(files, tmp_path):
    """rl.reward_model = a Qwen2ForSequenceClassification directory (the policy's tokenizer): the RL
    stage takes it as a reward (unnormalised: it records no mean/std). That its scores equal the
    transformers classifier's logits is tests/models/test_hf_reward.py's job."""
    import shutil

    import torch
    import transformers as tf

    classifier = tmp_path / "classifier"
    config = tf.AutoConfig.from_pretrained(files / "qwen2")
    config.num_labels, config.architectures = 1, ["Qwen2ForSequenceClassification"]
    torch.manual_seed(1)
    tf.Qwen2ForSequenceClassification(config).save_pretrained(classifier)
    for name in os.listdir(files / "qwen2"):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(files / "qwen2" / name, classifier / name)
    rl = tmp_path / "rl"
    assert main(["run", f"{experiment('rl')}:tiny", "--workdir", str(rl), *COMMON,
                 f"--config.model.path={files / 'qwen2'}", f"--config.data.train={files / 'pairs.jsonl'}",
                 "--config.rl.rewards=reward_model", f"--config.rl.reward_model={classifier}",
                 "--config.rl.steps=2"]) == 0
    assert all(np.isfinite(line["objective/scores"]) for line in metrics(rl, "rl"))
