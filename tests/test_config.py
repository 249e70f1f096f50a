"""Experiment configs: presets, typed overrides, clear errors, run metadata."""

import json
import os
import subprocess
import sys

import pytest

from rlft import config as config_lib
from rlft.cli.main import main
from rlft.errors import RlftError

TOY = os.path.join(os.path.dirname(__file__), "fixtures", "toy_experiment.py")
ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(*overrides, preset=""):
    _, _, config = config_lib.load_experiment(TOY + (f":{preset}" if preset else ""))
    for field, value in config_lib.parse_overrides(list(overrides)):
        config_lib.apply_override(config, field, value)
    return config


def test_presets_and_typed_overrides():
    assert _config(preset="tiny").train.steps == 2
    config = _config("--config.optim.learning_rate=3e-4", "--config.train.steps", "7",
                     "--config.train.full_sequence_loss=true", "--config.mesh.shape=(2,2,2)",
                     "--config.init_from=runs/sft", "--config.optim.schedule=constant",
                     "--config.optim.warmup_steps=0")
    assert config.optim.learning_rate == 3e-4 and config.train.steps == 7
    assert config.train.full_sequence_loss is True and config.mesh.shape == (2, 2, 2)
    assert config.init_from == "runs/sft" and config.optim.schedule == "constant"
    assert _config("--config.optim.learning_rate=1").optim.learning_rate == 1.0  # int -> float is fine


def test_unknown_field_names_field_and_nearest():
    with pytest.raises(RlftError) as e:
        _config("--config.optim.learning_rat=0.1")
    assert str(e.value).startswith("unknown config field 'optim.learning_rat' in section 'optim'; "
                                   "did you mean 'optim.learning_rate'?")
    with pytest.raises(RlftError, match=r"unknown config field 'trian.steps'; did you mean 'train'"):
        _config("--config.trian.steps=3")


def test_wrong_type_names_field_and_expected_type():
    with pytest.raises(RlftError, match=r"--config.train.steps='many': expected an integer \(current value 100\)"):
        _config("--config.train.steps=many")
    with pytest.raises(RlftError, match=r"--config.train.full_sequence_loss='maybe': expected true or false"):
        _config("--config.train.full_sequence_loss=maybe")
    with pytest.raises(RlftError, match=r"--config.optim is a section; set one of its fields"):
        _config("--config.optim=1")


def test_missing_experiment_file():
    with pytest.raises(RlftError, match=r"experiment file not found: experiments/nope.py"):
        config_lib.load_experiment("experiments/nope.py")


def test_run_writes_resolved_config_command_and_commit(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    assert main(["run", f"{TOY}:tiny", "--workdir", workdir, "--config.optim.learning_rate=0.5"]) == 0
    resolved = json.load(open(os.path.join(workdir, "run_config.json")))
    assert resolved["optim"]["learning_rate"] == 0.5 and resolved["train"]["steps"] == 2
    assert "--config.optim.learning_rate=0.5" in open(os.path.join(workdir, "command.txt")).read()
    git = json.load(open(os.path.join(workdir, "git.txt")))
    assert set(git) == {"experiment", "rlft"}
    assert json.load(open(os.path.join(workdir, "result.json"))) == {"steps": 2}


@pytest.mark.parametrize("args, message", [
    (["run", TOY, "--config.train.stepz=1"], "rlft: error: unknown config field 'train.stepz' in section 'train'; did you mean 'train.steps'?"),
    (["run", TOY, "--config.train.steps=x"], "rlft: error: --config.train.steps='x': expected an integer"),
    (["run", "experiments/missing.py"], "rlft: error: experiment file not found: experiments/missing.py"),
    (["run", TOY, "--lr=3"], "rlft: error: unrecognised argument '--lr=3'"),
])
def test_cli_errors_are_one_clear_line(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlft", *args, "--workdir", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_print_config_lists_every_field_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default work directory would be runs/toy_experiment-tiny here
    toy = os.path.abspath(TOY)
    workdir = tmp_path / "explicit"
    assert main(["run", f"{toy}:tiny", "--config.optim.learning_rate=0.5", "--config.mesh.shape=(2,2,2)",
                 "--workdir", str(workdir), "--print-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "--config.init_from=None",
        "--config.mesh.shape='(2, 2, 2)'",
        "--config.optim.learning_rate=0.5",  # the override
        "--config.optim.schedule=cosine",
        "--config.optim.warmup_steps=10",
        "--config.seed=0",
        "--config.train.batch_size=32",
        "--config.train.full_sequence_loss=false",
        "--config.train.steps=2",  # the preset
    ]
    assert not workdir.exists() and list(tmp_path.iterdir()) == []  # no workdir, nothing ran
    # Each printed line is a valid override that reproduces the value (shell quoting removed).
    import shlex
    args = [token for line in lines for token in shlex.split(line)]
    assert _config(*args).to_dict() == _config("--config.optim.learning_rate=0.5", "--config.mesh.shape=(2,2,2)",
                                               preset="tiny").to_dict()
    assert config_lib.flat_fields(_config())[:2] == [("init_from", None), ("mesh.shape", (-1, 1, 1))]

    assert main(["run", toy, "--config.train.stepz=1", "--print-config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("rlft: error: unknown config field 'train.stepz' in section 'train'; "
                                   "did you mean 'train.steps'?")
    assert list(tmp_path.iterdir()) == []


def test_printed_overrides_are_one_line_and_round_trip_through_bash():
    import ml_collections

    values = dict(plain="cosine", empty="", newline="Write a review:\n", tab="a\tb", quote="it's",
                  both="say \"hi\", it's $HOME!", control="\x01\u2028", accent="café ☕",
                  names=("movie_reviews",), none=None, flag=True, rate=1e-5, count=-3, shape=(2, 2, 2))
    config = ml_collections.ConfigDict({"s": values})
    lines = [config_lib.format_override(field, value) for field, value in config_lib.flat_fields(config)]
    assert all("\n" not in line for line in lines)
    assert "--config.s.newline=$'Write a review:\\n'" in lines
    assert "--config.s.names=\"('movie_reviews',)\"" in lines
    words = subprocess.run(["bash", "-c", "printf '%s\\0' " + " ".join(lines)], capture_output=True,
                           text=True, check=True).stdout.split("\0")[:-1]
    # typed empty fields: "", (), 0, 0.0, False, and None declared as a string field
    from ml_collections.config_dict import placeholder
    restored = ml_collections.ConfigDict({"s": {k: placeholder(str) if v is None else type(v)()
                                                for k, v in values.items()}})
    for field, value in config_lib.parse_overrides(words):
        config_lib.apply_override(restored, field, value)
    assert restored.s.to_dict() == values


# --- None-default fields ("the algorithm's default") parse to their declared type ------------------

EXPERIMENT_FILES = sorted(os.path.join(ROOT_DIR, "experiments", name)
                          for name in os.listdir(os.path.join(ROOT_DIR, "experiments")) if name.endswith(".py"))
BOOL_SPELLINGS = [("false", False), ("False", False), ("0", False), ("no", False),
                  ("true", True), ("True", True), ("1", True), ("yes", True)]


def _none_fields(spec: str) -> list[tuple[str, type]]:
    _, _, config = config_lib.load_experiment(spec)
    out = []
    for field, value in config_lib.flat_fields(config):
        if value is None:
            *path, key = field.split(".")
            node = config
            for part in path:
                node = node[part]
            out.append((field, config_lib.declared_type(node, key)))
    return out


def _overridden(spec: str, field: str, text: str):
    _, _, config = config_lib.load_experiment(spec)
    config_lib.apply_override(config, field, text)
    node = config
    for part in field.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("spec", [f"{path}:{preset}" for path in EXPERIMENT_FILES for preset in ("default", "tiny")],
                         ids=lambda spec: os.path.basename(spec))
def test_every_none_default_field_parses_to_its_declared_type(spec):
    """Both spellings of every boolean, and numbers, become values of the declared type; "None"
    (what --print-config writes) restores the default; anything else is one error naming the flag."""
    for field, kind in _none_fields(spec):
        assert kind is not type(None), f"{spec}: {field} defaults to None without a declared type"
        assert _overridden(spec, field, "None") is None
        if kind is bool:
            for text, value in BOOL_SPELLINGS:
                assert _overridden(spec, field, text) is value, (field, text)
        elif kind is int:
            assert _overridden(spec, field, "3") == 3 and type(_overridden(spec, field, "3")) is int
            with pytest.raises(RlftError, match=rf"--config.{field}='2.5': expected an integer"):
                _overridden(spec, field, "2.5")
        elif kind is float:
            for text, value in (("0", 0.0), ("0.25", 0.25), ("1e-3", 1e-3)):
                parsed = _overridden(spec, field, text)
                assert parsed == value and type(parsed) is float, (field, text)
            with pytest.raises(RlftError, match=rf"--config.{field}='abc': expected a number"):
                _overridden(spec, field, "abc")
        else:
            assert kind is str, (field, kind)
            assert _overridden(spec, field, "false") == "false"  # a name, kept as text
        if kind is bool:
            with pytest.raises(RlftError, match=rf"--config.{field}='maybe': expected true or false"):
                _overridden(spec, field, "maybe")


RL_SPECS = [f"{path}:tiny" for path in EXPERIMENT_FILES if any(f.startswith("rl.") for f, _ in _none_fields(path))]


@pytest.mark.parametrize("spec", RL_SPECS, ids=lambda spec: os.path.basename(spec))
@pytest.mark.parametrize("algorithm", ["ppo", "reinforce"])
def test_boolean_flags_reach_the_step_as_set(spec, algorithm):
    """`--config.rl.clip=false` turns PPO's clipping off (it once became the string 'false', which
    is truthy); `=true` turns REINFORCE's on; both spellings, every boolean rl field."""
    from rlft.rl.config import resolve_pg_config

    for field in ("clip", "whiten_advantages"):
        for text, value in BOOL_SPELLINGS:
            _, _, config = config_lib.load_experiment(spec)
            for name, override in (("rl.algorithm", algorithm), (f"rl.{field}", text)):
                config_lib.apply_override(config, name, override)
            if algorithm == "ppo":
                config.rl.critic = "separate"
            assert getattr(resolve_pg_config(config.rl, eos_id=1), field) is value, (field, text)


def test_numeric_flags_reach_the_step_as_set():
    from rlft.rl.config import resolve_pg_config

    _, _, config = config_lib.load_experiment(RL_SPECS[0])
    for field, text in (("rl.kl.coef", "0"), ("rl.epochs", "3")):
        config_lib.apply_override(config, field, text)
    pg = resolve_pg_config(config.rl, eos_id=1)
    assert pg.kl_coef == 0.0 and pg.epochs == 3 and not pg.uses_reference


def test_untyped_none_field_is_refused_by_name():
    import ml_collections

    config = ml_collections.ConfigDict({"a": {"b": None}})
    with pytest.raises(RlftError, match=r"--config.a.b: the experiment declares this field as None without a type"):
        config_lib.apply_override(config, "a.b", "false")


def test_non_boolean_in_a_boolean_rl_field_is_refused():
    """The Python API path: a section built without type safety, a string in a boolean field."""
    import ml_collections
    from rlft.rl.config import resolve_pg_config, rl_stage_config

    section = rl_stage_config(steps=1, prompts_per_step=2, group_size=2, learning_rate=1e-3, max_new_tokens=4)
    section = ml_collections.ConfigDict(section.to_dict(), type_safe=False)
    section.grpo_scale_by_std = "false"
    with pytest.raises(RlftError, match=r"rl.grpo_scale_by_std='false': must be true or false"):
        resolve_pg_config(section, eos_id=1)
