"""Bad inputs at every boundary: config values, damaged files, Python API arguments, export targets.

Each case is one clean error that names the culprit: `rlft.cli.main.main` returns 2 and prints exactly
one `rlft: error: ...` line, or the Python API raises an RlftError. Config mistakes fail before
the run directory is written, so these cases are fast.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import rlft
from rlft import config as config_lib
from rlft.cli.main import main
from rlft.errors import RlftError
from rlft.models import Decoder, ModelConfig
from rlft.cli.validate import validate_config
from tests.pairs_util import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "tests", "fixtures", "toy_experiment.py")
EXPERIMENTS = ("arithmetic_grpo", "sentiment_classify", "sentiment_dpo", "sentiment_reward", "sentiment_rlhf")
RLHF, DPO = (os.path.join(ROOT, f"experiments/{name}.py:tiny") for name in ("sentiment_rlhf", "sentiment_dpo"))
ARITHMETIC = os.path.join(ROOT, "experiments/arithmetic_grpo.py:tiny")


def cli_error(argv: list[str], capsys) -> str:
    """The one stderr line of `rlft ARGV`, which must exit with status 2."""
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlft: error: "), lines
    return lines[0]


# --- config values: refused before any work starts ------------------------------------------------

@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("preset", ["default", "tiny"])
def test_shipped_presets_pass_validation(name, preset):
    _, _, config = config_lib.load_experiment(os.path.join(ROOT, f"experiments/{name}.py:{preset}"))
    validate_config(config)


CONFIG_CASES = [
    (RLHF, ["--config.pretrain.steps=-1"], "pretrain.steps=-1: must be an integer >= 0"),
    (RLHF, ["--config.sft.batch_size=0"], "sft.batch_size=0: must be an integer >= 1"),
    (RLHF, ["--config.reward.save_every=0"], "reward.save_every=0"),
    (RLHF, ["--config.sft.keep=0"], "sft.keep=0"),
    (RLHF, ["--config.sft.learning_rate=nan"], "sft.learning_rate=nan: must be a finite number > 0"),
    (RLHF, ["--config.pretrain.learning_rate=-0.001"], "pretrain.learning_rate=-0.001"),
    (RLHF, ["--config.reward.learning_rate=inf"], "reward.learning_rate=inf"),
    (RLHF, ["--config.sft.warmup_steps=-1"], "sft.warmup_steps=-1"),
    (RLHF, ["--config.sft.weight_decay=-0.1"], "sft.weight_decay=-0.1"),
    (RLHF, ["--config.sft.clip_norm=-1"], "sft.clip_norm=-1.0"),
    (RLHF, ["--config.reward.accum_steps=3"], "reward.accum_steps=3: must divide reward.batch_size=16"),
    (RLHF, ["--config.sft.max_length=4096"], "sft.max_length=4096: must be <= model.max_positions=128"),
    (RLHF, ["--config.model.n_heads=3"], "model.d_model=64: must be a multiple of model.n_heads=3"),
    (RLHF, ["--config.model.n_layers=0"], "model.n_layers=0"),
    (RLHF, ["--config.model.max_positions=0"], "model.max_positions=0"),
    (RLHF, ["--config.tokenizer.vocab_size=100"], "tokenizer.vocab_size=100: must be an integer >= 258"),
    (RLHF, ["--config.mesh.data=0"], "mesh.data=0"),
    (RLHF, ["--config.seed=-3"], "seed=-3"),
    (RLHF, ["--config.eval.seed=-1"], "eval.seed=-1"),
    (RLHF, ["--config.eval.batch_size=0"], "eval.batch_size=0"),
    (RLHF, ["--config.data.min_gap=0"], "data.min_gap=0.0"),
    (RLHF, ["--config.init_from=/no/such/run"], "init_from='/no/such/run'"),
    (RLHF, ["--config.rl.steps=0"], "rl.steps=0: must be an integer >= 1"),
    (RLHF, ["--config.rl.keep=0"], "rl.keep=0"),
    (RLHF, ["--config.rl.top_p=1.5"], "rl.top_p=1.5"),
    (RLHF, ["--config.rl.top_p=0"], "rl.top_p=0.0"),
    (RLHF, ["--config.rl.top_k=-1"], "rl.top_k=-1"),
    (RLHF, ["--config.rl.temperature=-0.5"], "rl.temperature=-0.5"),
    (RLHF, ["--config.rl.temperature=0"], "rl.temperature=0"),
    (RLHF, ["--config.rl.max_new_tokens=0"], "rl.max_new_tokens=0"),
    (RLHF, ["--config.rl.max_new_tokens=500"], "rl.max_new_tokens=500: must be < model.max_positions=128"),
    (RLHF, ["--config.rl.critic_learning_rate=-1"], "rl.critic_learning_rate=-1"),
    (RLHF, ["--config.rl.prompts_per_step=0"], "rl.prompts_per_step=0"),
    (RLHF, ["--config.rl.minibatches=3"], "rl.minibatches=3"),
    (RLHF, ["--config.rl.algorithm=a2c"], "rl.algorithm='a2c'"),
    (RLHF, ["--config.rl.kl.coef=-1"], "rl.kl.coef"),
    (DPO, ["--config.dpo.beta=0"], "dpo.beta=0.0"),
    (DPO, ["--config.dpo.label_smoothing=0.7"], "dpo.label_smoothing=0.7"),
    (DPO, ["--config.sft.steps=-2"], "sft.steps=-2"),
    (ARITHMETIC, ["--config.rl.group_size=1"], "rl.group_size=1"),
    (ARITHMETIC, ["--config.rl.epochs=0"], "rl.epochs=0"),
    (ARITHMETIC, ["--config.sft.max_length=65"], "sft.max_length=65"),
    (TOY, ["--config.optim.learning_rate=0"], "optim.learning_rate=0.0"),
    # Typed None-default fields: a wrong type is one line naming the flag, not a TypeError.
    (ARITHMETIC, ["--config.rl.kl.coef=abc"], "--config.rl.kl.coef='abc': expected a number or none"),
    (RLHF, ["--config.rl.kl.coef=abc"], "--config.rl.kl.coef='abc': expected a number (current value 0.1)"),
    (ARITHMETIC, ["--config.rl.clip=maybe"], "--config.rl.clip='maybe': expected true or false"),
    (ARITHMETIC, ["--config.rl.epochs=1.5"], "--config.rl.epochs='1.5': expected an integer"),
    # What only the experiment can check (its check(config)) is also checked before any write.
    (ARITHMETIC, ["--config.task.max_operand=999"], "sft.max_length=9: the longest problem has 13 tokens"),
    (ARITHMETIC, ["--config.rl.max_new_tokens=2"], "rl.max_new_tokens=2: the longest answer + EOS has 3"),
    (TOY, ["--config.train.batch_size=-4"], "train.batch_size=-4"),
]


@pytest.mark.parametrize("experiment, overrides, culprit", CONFIG_CASES,
                         ids=[" ".join(c[1]) for c in CONFIG_CASES])
@pytest.mark.parametrize("print_config", [False, True], ids=["run", "print-config"])
def test_bad_config_value_fails_before_any_work(experiment, overrides, culprit, print_config, tmp_path, capsys):
    """`rlft run` refuses before writing anything; `--print-config` refuses the same values
    instead of printing them as if valid."""
    workdir = tmp_path / "run"
    flags = ["--print-config"] if print_config else []
    line = cli_error(["run", experiment, "--workdir", str(workdir), *overrides, *flags], capsys)
    assert line.startswith(f"rlft: error: {culprit}"), line
    assert not workdir.exists()  # no run directory, so no checkpoints and no training


def test_empty_workdir_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "--workdir=''" in cli_error(["run", TOY, "--workdir", ""], capsys)
    assert list(tmp_path.iterdir()) == []


# --- damaged files ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from rlft.data.tokenizer import train_tokenizer

    path = str(tmp_path_factory.mktemp("tokenizer"))
    return train_tokenizer([f"the film was {w} and {w}." for w in ("good", "bad", "long")] * 5, 300, path)


@pytest.fixture(scope="module")
def tiny_lm(tiny_tokenizer):
    """(ModelConfig, random params) of a one-layer GPT-2 over the tiny tokenizer, 32 positions."""
    cfg = ModelConfig.gpt2(vocab_size=len(tiny_tokenizer), d_model=32, n_layers=1, n_heads=2, max_positions=32)
    _, params = random_params(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    return cfg, params


@pytest.fixture(scope="module")
def hf_dir(tiny_lm, tiny_tokenizer, tmp_path_factory) -> str:
    """A Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer files)."""
    from rlft.models.hf import save_hf_checkpoint

    path = str(tmp_path_factory.mktemp("hf") / "model")
    save_hf_checkpoint(*tiny_lm, path, tiny_tokenizer)
    return path


@pytest.fixture(scope="module")
def run_dir(tiny_lm, tiny_tokenizer, tmp_path_factory) -> str:
    """The metadata of an rlft run dir (no checkpoints): experiment.json, run_config.json,
    model_config.json, stages.json (pretrain, then a reward stage), tokenizer/, reward_stats.json."""
    from rlft.train.checkpoints import save_model_config
    from rlft.generate.scoring import write_reward_stats
    from rlft.train.stages import record_stage

    path = str(tmp_path_factory.mktemp("run"))
    with open(os.path.join(path, "experiment.json"), "w") as f:
        json.dump({"path": TOY, "preset": "tiny"}, f)
    with open(os.path.join(path, "run_config.json"), "w") as f:
        json.dump(config_lib.load_experiment(TOY)[2].to_dict(), f)
    save_model_config(path, tiny_lm[0])
    tiny_tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    os.makedirs(os.path.join(path, "pretrain"))
    record_stage(path, "pretrain", "lm")
    record_stage(path, "reward", "scalar")
    write_reward_stats(os.path.join(path, "reward"), np.arange(4.0), "test", add_bos=True, add_eos=True,
                       max_length=32)
    return path


def _truncated(path: str) -> bytes:
    data = open(path, "rb").read()
    return data[:len(data) // 2]


# (fixture, file to damage, new content (bytes, or a function of the file's path), load target, culprit)
FILE_CASES = [
    ("run_dir", "stages.json", b"[{\"name\": \"pretrain\"", "", "stages.json: malformed JSON"),
    ("run_dir", "stages.json", b"\xff\xfe\x00garbage", "", "stages.json: not UTF-8"),
    ("run_dir", "stages.json", b"{\"pretrain\": \"lm\"}", "", "stages.json: expected a JSON array"),
    ("run_dir", "stages.json", b"[{\"name\": 3, \"kind\": \"lm\"}]", "", "stages.json: malformed entry"),
    ("run_dir", "model_config.json", b"", "pretrain", "model_config.json: malformed JSON"),
    ("run_dir", "model_config.json", _truncated, "pretrain", "model_config.json: malformed JSON"),
    ("run_dir", "reward/reward_stats.json", b"{\"mean\": 0.5,", "reward", "reward_stats.json: malformed JSON"),
    ("run_dir", "reward/reward_stats.json", b"{\"mean\": \"high\", \"std\": 1}", "reward", "reward_stats.json: mean='high'"),
    ("run_dir", "tokenizer/tokenizer.json", _truncated, "pretrain", "tokenizer.json: malformed JSON"),
    ("run_dir", "tokenizer/tokenizer.json", b"{}", "pretrain", "tokenizer: could not load the tokenizer"),
    ("run_dir", "tokenizer/tokenizer_config.json", b"{\"eos_token\": ", "pretrain", "tokenizer_config.json: malformed JSON"),
    ("hf_dir", "config.json", b"{\"model_type\": \"gpt2\", ", "", "config.json: malformed JSON"),
    ("hf_dir", "config.json", b"[]", "", "config.json: expected a JSON object"),
    ("hf_dir", "config.json", b"{\"model_type\": \"gpt2\", \"n_embd\": 32, \"n_head\": 0}", "", "config.json: not a valid gpt2 config"),
    ("hf_dir", "config.json", b"{\"model_type\": \"gpt2\", \"vocab_size\": 0}", "", "config.json: model.vocab_size=0"),
    ("hf_dir", "model.safetensors", _truncated, "", "model.safetensors: not a readable safetensors file"),
    ("hf_dir", "model.safetensors", b"", "", "model.safetensors: not a readable safetensors file"),
    ("hf_dir", "model.safetensors", None, "", "no model.safetensors or model.safetensors.index.json"),
    ("hf_dir", "model.safetensors.index.json", b"{\"weight_map\": {\"a\": ", "", "model.safetensors.index.json: malformed JSON"),
    ("hf_dir", "model.safetensors.index.json", b"{\"metadata\": {}}", "", "model.safetensors.index.json: no weight_map"),
    ("hf_dir", "model.safetensors.index.json", b"{\"weight_map\": {\"a\": \"model-00002.safetensors\"}}", "",
     "lists shard model-00002.safetensors, which is missing"),
    ("hf_dir", "tokenizer.json", _truncated, "", "tokenizer.json: malformed JSON"),
]


def _damaged_copy(request, tmp_path, fixture, name, content) -> str:
    path = str(tmp_path / fixture)
    shutil.copytree(request.getfixturevalue(fixture), path)
    file = os.path.join(path, name)
    if content is None:
        os.remove(file)
    else:
        data = content(file) if callable(content) else content
        with open(file, "wb") as f:
            f.write(data)
    return path


@pytest.mark.parametrize("fixture, name, content, target, culprit", FILE_CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(FILE_CASES)])
def test_damaged_file_is_one_line_naming_it(fixture, name, content, target, culprit, request, tmp_path, capsys):
    path = os.path.join(_damaged_copy(request, tmp_path, fixture, name, content), target)
    with pytest.raises(RlftError) as e:
        rlft.load(path)
    assert culprit in str(e.value) and "\n" not in str(e.value), str(e.value)
    line = cli_error(["export", path, "--out", str(tmp_path / "out")], capsys)
    assert culprit in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, content, culprit", [
    ("run_config.json", b"{\"seed\": ", "run_config.json: malformed JSON"),
    ("experiment.json", b"[\"toy.py\"]", "experiment.json: expected a JSON object"),
    ("experiment.json", b"{\"preset\": \"tiny\"}", "experiment.json: expected {\"path\""),
    ("experiment.json", None, "no experiment.json"),
])
def test_eval_of_a_damaged_run_dir(name, content, culprit, request, tmp_path, capsys):
    path = _damaged_copy(request, tmp_path, "run_dir", name, content)
    assert culprit in cli_error(["eval", path], capsys)


@pytest.mark.parametrize("argv, culprit", [
    (["export", "/no/such/checkpoint", "--out", "OUT"], "no such file or directory: /no/such/checkpoint"),
    (["eval", "/no/such/run"], "no such run directory: /no/such/run"),
    (["run", "/no/such/experiment.py"], "experiment file not found: /no/such/experiment.py"),
])
def test_missing_paths(argv, culprit, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert culprit in cli_error(argv, capsys)


# --- export targets ---------------------------------------------------------------------------------

def test_export_refuses_a_non_empty_dir_or_a_file(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = cli_error(["export", hf_dir, "--out", str(out)], capsys)
    assert str(out) in line and "not empty" in line and "--overwrite" in line
    assert os.listdir(out) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in cli_error(["export", hf_dir, "--out", str(tmp_path / "file"), "--overwrite"], capsys)
    assert "holds the checkpoint" in cli_error(["export", hf_dir, "--out", os.path.dirname(hf_dir), "--overwrite"], capsys)


def test_export_overwrite_leaves_no_stale_file(hf_dir, tmp_path, capsys):
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    assert main(["export", hf_dir, "--out", str(fresh)]) == 0
    out.mkdir()  # an earlier sharded export, plus a stray file
    for name in ("model.safetensors.index.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors", "notes.txt"):
        (out / name).write_text("{}")
    assert main(["export", hf_dir, "--out", str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == sorted(os.listdir(fresh))
    assert sorted(os.listdir(tmp_path)) == ["fresh", "out"]  # no temporary directory left behind
    exported, original = rlft.load(str(out)).params, rlft.load(hf_dir).params
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(original), strict=True):
        np.testing.assert_array_equal(a, b)


# --- the Python API ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm(hf_dir) -> rlft.Model:
    return rlft.load(hf_dir)


@pytest.fixture(scope="module")
def scorer(tiny_lm, tiny_tokenizer) -> rlft.Model:
    """A scalar model as far as argument checks go (they run before any forward pass)."""
    return rlft.Model(config=tiny_lm[0], params=None, tokenizer=tiny_tokenizer, kind="scalar")


API_CASES = [
    ("generate", ("the film",), {}, "generate(prompts='the film'): expected a list of prompts"),
    ("generate", (b"the film",), {}, "generate(prompts=b'the film')"),
    ("generate", ([b"the film"],), {}, "generate(prompts[0]=b'the film'): bytes"),
    ("generate", (["the film", "bad \udcff byte"],), {}, "generate(prompts[1]='bad \\udcff byte'): not valid Unicode "
     "text (a lone surrogate '\\udcff' at position 4)"),
    ("score", (["fine", "\ud800"],), {}, "score(texts)[1]='\\ud800': not valid Unicode text"),
    ("generate", (["the film", [1, 2]],), {}, "generate(prompts[1]=[1, 2]): prompts mix text and token ids"),
    ("generate", ([[1, 2], "the film"],), {}, "generate(prompts[1]='the film'): prompts mix"),
    ("generate", ([],), {}, "generate(prompts=[]): no prompts"),
    ("generate", ({"a": 1},), {}, "generate(prompts): expected a list"),
    ("generate", (["good", ""],), {}, "generate(prompts[1]=''): empty prompt"),
    ("generate", ([[]],), {}, "generate(prompts[0]): no tokens"),
    ("generate", ([[1.5, 2.0]],), {}, "generate(prompts[0]): expected integer token ids, got floats"),
    ("generate", ([[True, False]],), {}, "generate(prompts[0]): expected integer token ids, got bools"),
    ("generate", ([[1, 100000]],), {}, "generate(prompts[0]): token id 100000 is outside the model's vocabulary"),
    ("generate", ([[-1, 2]],), {}, "generate(prompts[0]): token id -1 is outside"),
    ("generate", ([[1] * 40],), {}, "generate(prompts[0]): 40 tokens exceed the model's max_positions=32"),
    ("generate", ([[1] * 20],), dict(max_new_tokens=20), "generate(max_new_tokens=20): the longest prompt (20 tokens)"),
    ("generate", (["good"],), dict(max_new_tokens=0), "generate(max_new_tokens=0): must be an integer >= 1"),
    ("generate", (["good"],), dict(max_new_tokens=2.0), "generate(max_new_tokens=2.0)"),
    ("generate", (["good"],), dict(temperature=-1.0), "generate(temperature=-1.0): must be a number >= 0"),
    ("generate", (["good"],), dict(temperature=float("nan")), "generate(temperature=nan)"),
    ("generate", (["good"],), dict(top_p=0.0), "generate(top_p=0.0): must be a number in (0, 1]"),
    ("generate", (["good"],), dict(top_p=1.5), "generate(top_p=1.5)"),
    ("generate", (["good"],), dict(top_k=-1), "generate(top_k=-1): must be an integer >= 0"),
    ("generate", (["good"],), dict(seed="x"), "generate(seed='x')"),
    ("logits", ("the film",), {}, "token_ids='the film': expected integer token ids, got str"),
    ("logits", (b"\x01\x02",), {}, "token_ids=b'\\x01\\x02': expected integer token ids, got bytes"),
    ("logits", ([[1.0, 2.0]],), {}, "token_ids: expected integer token ids, got floats"),
    ("logits", ([[1, 2], [3]],), {}, "token_ids: rows of different lengths"),
    ("logits", ([1, 2, 3],), {}, "token_ids: expected [batch, length] token ids, got shape (3,)"),
    ("logits", ([[1, 999]],), {}, "token_ids: token id 999 is outside the model's vocabulary"),
    ("logits", ([[1] * 33],), {}, "token_ids: 33 tokens exceed the model's max_positions=32"),
    ("logits", ([[1, 2]],), dict(attention_mask=[[1]]), "attention_mask: shape (1, 1) != token_ids shape (1, 2)"),
    ("logits", ([[1, 2]],), dict(attention_mask=[[2, 1]]), "attention_mask: expected 0/1 values"),
    ("score", ("a good film",), {}, "score(texts)='a good film': expected a list of strings"),
    ("score", ([b"a good film"],), {}, "score(texts)[0]=b'a good film': expected a str"),
    ("score", (["good"],), dict(prompts="p"), "score(prompts)='p'"),
    ("score", (["good", "bad"],), dict(prompts=["p"]), "score(prompts): 1 prompts for 2 texts"),
    ("score", (["good"],), dict(batch_size=0), "score(batch_size=0): must be an integer >= 1"),
]


@pytest.mark.parametrize("method, args, kwargs, culprit", API_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(API_CASES)])
def test_api_refuses_bad_arguments(method, args, kwargs, culprit, lm, scorer):
    model = scorer if method == "score" else lm
    with pytest.raises(RlftError) as e:
        getattr(model, method)(*args, **kwargs)
    assert str(e.value).startswith(culprit) and "\n" not in str(e.value), str(e.value)


def test_api_accepts_what_the_docstrings_promise(lm):
    """Nested lists with a 0/1 mask (text and array prompts for generate: tests/test_sampling.py)."""
    assert lm.logits([[5, 9, 4]], attention_mask=[[0, 1, 1]]).shape == (1, 3, lm.config.vocab_size)
