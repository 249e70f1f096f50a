"""`--config.init_from=RUN_DIR` of the sentiment experiments: which runs are accepted, and a refused
one costs nothing (issue 19, item 2).

Sources are faked (experiment.json, run_config.json, model_config.json, tokenizer/, stage
directories, no checkpoints): the checks read files only and come before any training or data
loading, so these cases are fast and need no data. The accepted path with real checkpoints is
tests/experiments/test_sentiment_dpo.py and test_sentiment_rlhf.py.
"""

import json
import os

import pytest

from rlft import config as config_lib
from rlft.cli.main import main
from rlft.errors import RlftError
from rlft.models import model_from_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTIMENT = ("sentiment_reward", "sentiment_dpo", "sentiment_rlhf")  # the experiments with init_from


def spec(name: str, preset: str = "tiny") -> str:
    return os.path.join(ROOT, f"experiments/{name}.py:{preset}")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from rlft.data.tokenizer import train_tokenizer

    path = str(tmp_path_factory.mktemp("bpe"))
    return train_tokenizer([f"the film was {w} and {w}." for w in ("good", "bad", "long")] * 5, 300, path)


def fake_run(path, name: str, tokenizer, overrides=(), stages=(("pretrain", "lm"),)) -> str:
    """The metadata of a run of experiments/NAME.py:tiny with `overrides` (no checkpoints)."""
    from rlft.train.checkpoints import save_model_config
    from rlft.train.stages import record_stage

    path = str(path)
    _, _, config = config_lib.load_experiment(spec(name))
    for field, value in overrides:
        config_lib.apply_override(config, field, value)
    os.makedirs(path)
    with open(os.path.join(path, "experiment.json"), "w") as f:
        json.dump({"path": os.path.join(ROOT, f"experiments/{name}.py"), "preset": "tiny"}, f)
    with open(os.path.join(path, "run_config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    save_model_config(path, model_from_section(config.model, len(tokenizer)))
    tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    for stage, kind in stages:
        os.makedirs(os.path.join(path, stage))
        record_stage(path, stage, kind)
    return path


@pytest.fixture(scope="module")
def arithmetic_run(tmp_path_factory):
    """A run of arithmetic_grpo.py: its character tokenizer, model config and sft/rl stages."""
    from rlft.data.arithmetic import build_tokenizer

    root = tmp_path_factory.mktemp("arith")
    tokenizer = build_tokenizer(str(root / "tok"))
    return fake_run(root / "arith", "arithmetic_grpo", tokenizer, stages=(("sft", "lm"), ("rl", "lm")))


@pytest.fixture(scope="module")
def reward_run(bpe, tmp_path_factory):
    """A sentiment_reward tiny run (this tiny model and tokenizer): pretrain and reward stages."""
    return fake_run(tmp_path_factory.mktemp("r") / "reward", "sentiment_reward", bpe,
                    stages=(("pretrain", "lm"), ("reward", "scalar")))


@pytest.fixture(scope="module")
def wide_run(bpe, tmp_path_factory):
    """A sentiment_reward run of another model shape (d_model 128, 4 layers)."""
    return fake_run(tmp_path_factory.mktemp("w") / "wide", "sentiment_reward", bpe,
                    overrides=[("model.d_model", "128"), ("model.n_layers", "4")])


@pytest.fixture(scope="module")
def rlhf_run(bpe, tmp_path_factory):
    return fake_run(tmp_path_factory.mktemp("h") / "rlhf", "sentiment_rlhf", bpe,
                    stages=(("pretrain", "lm"), ("sft", "lm"), ("reward", "scalar")))


def listing(path) -> dict:
    """{relative path: bytes} of every file below `path`."""
    out = {}
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def refused(name: str, source: str, tmp_path, capsys, *overrides) -> str:
    """The one error line of `rlft run NAME:tiny --config.init_from=SOURCE`; checks that no work
    directory was made and the source did not change, and that the experiment's `check(config)`
    (which `rlft run` calls before writing anything) gives the same error."""
    workdir = tmp_path / f"run{len(os.listdir(tmp_path))}"  # a new one for each call
    before = listing(source)
    capsys.readouterr()
    assert main(["run", spec(name), "--workdir", str(workdir), f"--config.init_from={source}", *overrides]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlft: error: "), lines
    assert not workdir.exists()  # refused by check(config) before `rlft run` writes anything
    assert listing(source) == before
    module, _, config = config_lib.load_experiment(spec(name))
    for field, value in config_lib.parse_overrides([f"--config.init_from={source}", *overrides]):
        config_lib.apply_override(config, field, value)
    with pytest.raises(RlftError) as e:
        module.check(config)
    assert lines[0] == f"rlft: error: {e.value}"
    return lines[0]


@pytest.mark.parametrize("name", SENTIMENT)
def test_a_run_of_another_experiment_is_refused_before_anything_is_copied(name, arithmetic_run, tmp_path, capsys):
    line = refused(name, arithmetic_run, tmp_path, capsys)
    assert line == (f"rlft: error: init_from={arithmetic_run}: a run of arithmetic_grpo.py, not of a sentiment "
                    f"experiment (sentiment_classify.py, sentiment_reward.py, sentiment_dpo.py, "
                    f"sentiment_rlhf.py); {name}.py cannot start from it")


@pytest.mark.parametrize("name", SENTIMENT)
def test_a_run_of_another_model_shape_is_refused_naming_the_fields(name, wide_run, tmp_path, capsys):
    line = refused(name, wide_run, tmp_path, capsys)
    assert line == (f"rlft: error: init_from={wide_run}: its model (d_model=128, n_layers=4) differs from this "
                    f"run's model (d_model=64, n_layers=2): model.d_model 128 -> 64, model.n_layers 4 -> 2; "
                    f"run with its values (--config.model.d_model=128 --config.model.n_layers=4) or start "
                    f"from another run")


def test_another_tokenizer_is_refused(reward_run, tmp_path, capsys):
    line = refused("sentiment_dpo", reward_run, tmp_path, capsys, "--config.tokenizer.vocab_size=1024")
    assert "its tokenizer (vocab_size=512) differs from this run's tokenizer (vocab_size=1024): " \
           "tokenizer.vocab_size 512 -> 1024" in line


def test_init_stage_must_be_a_language_model_stage_of_the_source(reward_run, tmp_path, capsys):
    line = refused("sentiment_dpo", reward_run, tmp_path, capsys, "--config.init_stage=reward")
    assert line == (f"rlft: error: init_stage='reward': a scalar stage of {reward_run}, not a language model "
                    f"(its language-model stages: pretrain)")
    line = refused("sentiment_reward", reward_run, tmp_path, capsys, "--config.init_stage=sft")
    assert line == (f"rlft: error: init_from={reward_run}: no stage directory 'sft' there (set init_stage to "
                    f"one of its language-model stages: pretrain)")


def test_rlhf_adopts_only_the_shared_stage_of_another_sentiment_experiment(reward_run, tmp_path, capsys):
    line = refused("sentiment_rlhf", reward_run, tmp_path, capsys)
    assert line == (f"rlft: error: init_from={reward_run}: a run of sentiment_reward.py, whose stages ['reward'] "
                    f"were trained for that experiment; sentiment_rlhf.py shares only its 'pretrain' stage "
                    f"(--config.init_stages=\"('pretrain',)\")")


def test_a_directory_that_is_no_run_is_refused_before_the_run_directory_is_written(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    workdir = tmp_path / "run"
    capsys.readouterr()
    assert main(["run", spec("sentiment_dpo"), "--workdir", str(workdir),
                 f"--config.init_from={tmp_path / 'empty'}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"rlft: error: init_from={str(tmp_path / 'empty')!r}: must be empty (start from scratch) or a run "
        f"directory made by `rlft run` (with experiment.json and run_config.json)")
    assert not workdir.exists()


@pytest.mark.parametrize("name, source, overrides", [
    ("sentiment_reward", "reward_run", []),
    ("sentiment_dpo", "reward_run", []),
    ("sentiment_dpo", "rlhf_run", ["--config.init_stage=sft"]),  # any LM stage of any sentiment run
    ("sentiment_rlhf", "rlhf_run", []),
    ("sentiment_rlhf", "reward_run", ["--config.init_stages=('pretrain',)"]),
    ("sentiment_rlhf", "wide_run", ["--config.model.d_model=128", "--config.model.n_layers=4",
                                    "--config.model.remat=full"]),  # remat is not a shape
])
def test_a_compatible_source_is_accepted(name, source, overrides, request, tmp_path):
    source = request.getfixturevalue(source)
    before = listing(tmp_path)
    module, _, config = config_lib.load_experiment(spec(name))
    for field, value in config_lib.parse_overrides([f"--config.init_from={source}", *overrides]):
        config_lib.apply_override(config, field, value)
    module.check(config)
    assert listing(tmp_path) == before


def test_a_record_without_new_model_fields_reads_them_at_their_defaults(reward_run, tmp_path):
    """A source made before model.scan_layers/model.name existed is not another model."""
    import shutil

    old = str(tmp_path / "old")
    shutil.copytree(reward_run, old)
    with open(os.path.join(old, "run_config.json")) as f:
        recorded = json.load(f)
    for field in ("scan_layers", "name", "remat"):
        del recorded["model"][field]
    with open(os.path.join(old, "run_config.json"), "w") as f:
        json.dump(recorded, f)
    module, _, config = config_lib.load_experiment(spec("sentiment_dpo"))
    config.init_from = old
    module.check(config)
