"""Experiment configs: presets, typed overrides, clear errors, run metadata."""

import json
import os
import subprocess
import sys

import pytest

from rlft import config as config_lib
from rlft.cli import main
from rlft.errors import RlftError

TOY = os.path.join(os.path.dirname(__file__), "fixtures", "toy_experiment.py")


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
    with pytest.raises(RlftError, match=r"--config.train.steps='many': expected int \(current value 100\)"):
        _config("--config.train.steps=many")
    with pytest.raises(RlftError, match=r"--config.train.full_sequence_loss='maybe': expected bool"):
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
    (["run", TOY, "--config.train.steps=x"], "rlft: error: --config.train.steps='x': expected int"),
    (["run", "experiments/missing.py"], "rlft: error: experiment file not found: experiments/missing.py"),
    (["run", TOY, "--lr=3"], "rlft: error: unrecognised argument '--lr=3'"),
])
def test_cli_errors_are_one_clear_line(args, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlft", *args, "--workdir", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
