"""Bring your own: `rlft run experiments/rl.py` on a random-weight Hugging Face Qwen2 checkpoint written
by transformers (a tokenizer with a chat template and two EOS ids), a JSONL file and a
module:function reward defined here: the reward sees the templated prompt and the row's fields,
it rises over the run, and the exported stage loads in transformers with rlft.load's logits."""

import json
import os

import numpy as np
import pytest

import rlft
from rlft.cli.main import main
from tests.experiments.conftest import ROOT

EXPERIMENT = os.path.join(ROOT, "experiments", "rl.py")
ALPHABET = "0123456789+-*=?abcdefghijklmnopqrstuvwxyz \n"
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TARGET = "7"  # the reward: the share of this character in the completion


def seven_share(completions, records):
    """The learnable reward: the share of TARGET among the completion's characters. Checks what
    a reward function receives: the templated prompt and every field of its data row."""
    for r in records:
        assert r["prompt"].startswith("<|im_start|>user\n") and r["prompt"].endswith("<|im_start|>assistant\n"), r
        assert r["topic"] == "arithmetic" and r["answer"] == str(eval(r["question"])), r
    return np.array([c.count(TARGET) / max(len(c), 1) for c in completions], np.float32)


def write_checkpoint(path) -> None:
    """A random Qwen2 model (transformers) with a character tokenizer, a chat template and
    generation_config.json listing two EOS ids (<|endoftext|> and <|im_end|>)."""
    import torch
    import transformers as tf
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + list(ALPHABET))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens(SPECIALS)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf_tok = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                        clean_up_tokenization_spaces=False)
    hf_tok.chat_template = TEMPLATE
    hf_tok.save_pretrained(path)
    torch.manual_seed(0)
    config = tf.Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            bos_token_id=None, eos_token_id=[0, 3], pad_token_id=1, tie_word_embeddings=False)
    tf.Qwen2ForCausalLM(config).save_pretrained(path)
    tf.GenerationConfig(eos_token_id=[0, 3], pad_token_id=1).save_pretrained(path)


@pytest.fixture(scope="module")
def byo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    checkpoint, workdir = root / "qwen2", root / "run"
    write_checkpoint(checkpoint)
    rng = np.random.default_rng(0)
    rows = [{"question": f"{a}+{b}", "answer": str(a + b), "topic": "arithmetic"}
            for a, b in rng.integers(0, 20, size=(64, 2))]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    status = main(["run", f"{EXPERIMENT}:tiny", "--workdir", str(workdir), f"--config.model.path={checkpoint}",
                   f"--config.data.train={root / 'train.jsonl'}", f"--config.data.eval={root / 'eval.jsonl'}",
                   "--config.data.prompt_field=question", "--config.data.chat_template=true",
                   "--config.rl.rewards=tests.experiments.test_rl_byo:seven_share,length",
                   "--config.rl.reward_weights=1,0.1", "--config.rl.length_buffer=4",
                   "--config.rl.steps=12", "--config.rl.learning_rate=1e-2", "--config.rl.max_new_tokens=12"])
    assert status == 0
    return checkpoint, workdir


@pytest.mark.slow
def test_the_reward_rises_on_a_hugging_face_checkpoint(byo_run):
    _, workdir = byo_run
    lines = [json.loads(line) for line in open(workdir / "rl" / "metrics.jsonl")]
    assert [line["step"] for line in lines] == list(range(1, 13))
    share = [line["rewards/tests.experiments.test_rl_byo:seven_share/mean"] for line in lines]
    assert np.mean(share[-3:]) > np.mean(share[:3]) + 0.05, share
    report = json.load(open(workdir / "eval" / "report.json"))
    name = "tests.experiments.test_rl_byo:seven_share"
    assert report["eval_prompts"] == 16 and report[f"{name}_rl"] > report[f"{name}_start"], report
    # The eval rows have "answer": the default eval.checker=exact_match scores 4 samples per prompt
    # (tiny: eval.samples_per_problem=4, eval.k=2) from both models.
    assert report["sampling"]["checker"] == "exact_match" and report["sampling"]["samples_per_problem"] == 4
    for model in ("start", "rl"):
        values = [report[f"{key}_{model}"] for key in ("pass@1", "pass@2", "maj@2", "mean_reward")]
        assert all(0.0 <= v <= 1.0 for v in values) and values[0] <= values[1] + 1e-12, (model, values)
        assert report[f"mean_reward_{model}"] == pytest.approx(report[f"pass@1_{model}"])  # a 0/1 checker
    assert "| maj@2 |" in (workdir / "eval" / "report.md").read_text()


def test_eval_sampling_flags_are_checked_before_any_work(tmp_path):
    from rlft import config as config_lib
    from rlft.errors import RlftError

    module, _, config = config_lib.load_experiment(f"{EXPERIMENT}:tiny")
    assert (config.eval.samples_per_problem, config.eval.k, config.eval.checker) == (4, 2, "exact_match")
    config.eval.k = 5
    with pytest.raises(RlftError, match=r"eval\.k=5 must be in \[1, eval\.samples_per_problem=4\]"):
        module.evaluate(config, str(tmp_path))
    config.eval.update(samples_per_problem=-1, k=2)
    with pytest.raises(RlftError, match=r"eval\.samples_per_problem=-1"):
        module.evaluate(config, str(tmp_path))


@pytest.mark.slow
def test_the_trained_stage_exports_to_transformers(byo_run, tmp_path):
    import torch
    import transformers as tf

    _, workdir = byo_run
    out = tmp_path / "hf"
    assert main(["export", str(workdir / "rl"), "--out", str(out)]) == 0
    model = rlft.load(str(workdir / "rl"))
    ids = np.array([[2, 10, 20, 30, 5, 6], [3, 4, 11, 12, 13, 14]])
    with torch.no_grad():
        expected = tf.AutoModelForCausalLM.from_pretrained(out).eval()(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(model.logits(ids), expected, atol=1e-4, rtol=1e-4)
    assert tf.AutoTokenizer.from_pretrained(out).chat_template == TEMPLATE


@pytest.mark.parametrize("flags, files, error", [
    ([], {}, "model.path is not set"),
    (["--config.data.train={root}/absent.jsonl"], {}, "absent.jsonl"),
    (["--config.data.train={root}/empty.jsonl"], {"empty.jsonl": ""}, "empty.jsonl"),
    (["--config.data.train={root}/bad.jsonl"], {"bad.jsonl": '{"question": "1+1"}\n{"question": \n'}, "line 2"),
    (["--config.data.prompt_field=nope"], {}, "data.prompt_field='nope': row 1 of data.train="),
    (["--config.data.chat_template=false"], {"chat.jsonl": '{"question": [{"role": "user", "content": "1+1"}]}\n'},
     "set --config.data.chat_template=true"),
    (["--config.rl.rewards=no_such_module:score"], {}, "rl.rewards='no_such_module:score': cannot import it"),
    (["--config.rl.rewards=length"], {}, "rl.length_buffer=0: expected an integer in [1, rl.max_new_tokens=8]"),
    (["--config.rl.rewards=exact_match", "--config.data.answer_field=solution"], {},
     "data.answer_field='solution': row 1 of data.train="),
], ids=["no-model", "no-file", "empty-file", "bad-jsonl-line", "missing-field", "messages-without-template",
        "reward-import", "length-without-buffer", "exact-match-without-answers"])
def test_bad_inputs_are_one_error_line(byo_run, tmp_path, capsys, flags, files, error):
    checkpoint, _ = byo_run
    root = checkpoint.parent
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    data = next((f"{tmp_path}/{name}" for name in files if name.startswith("chat")), f"{root}/train.jsonl")
    model = [] if "model" in error else [f"--config.model.path={checkpoint}"]
    status = main(["run", f"{EXPERIMENT}:tiny", "--workdir", str(tmp_path / "run"), *model,
                   f"--config.data.train={data}", "--config.data.prompt_field=question",
                   "--config.data.chat_template=true", *[f.format(root=tmp_path) for f in flags]])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].startswith("rlft: error: ") and error in err[-1], err[-5:]
    assert "Traceback" not in "\n".join(err)


@pytest.mark.slow
def test_generation_stops_at_either_eos_of_the_checkpoint(byo_run):
    """rlft.load of the checkpoint and of the run's stage both carry generation_config.json's two
    EOS ids, and generate() ends a completion at the first of either."""
    checkpoint, workdir = byo_run
    for path in (checkpoint, workdir / "rl"):
        assert rlft.load(str(path)).eos_ids == (0, 3), path
    out = rlft.load(str(checkpoint)).generate([f"{i}+{i}=" for i in range(16)], max_new_tokens=40, temperature=1.0)
    ends = []
    for row, n in zip(out["tokens"], out["mask"].sum(-1).astype(int)):
        stops = [t for t in row[:n].tolist() if t in (0, 3)]
        assert stops in ([], [row[n - 1]]) and (stops or n == 40), row[:n]
        ends += stops
    assert set(ends) == {0, 3}, ends  # a random 47-token model stops at both within 40 tokens
