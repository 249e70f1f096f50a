"""The run directory is a contract: a rerun with another config is refused before any work, or with
--override recorded (safe fields only); model_config.json is never replaced by another model."""

import json
import os

import pytest

from rlft.train.checkpoints import save_model_config
from rlft.cli.main import main
from rlft.errors import RlftError
from rlft.models import ModelConfig, model_config, model_from_section, model_section

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
EXPERIMENT = os.path.join(FIXTURES, "contract_experiment.py")
TOY = os.path.join(FIXTURES, "toy_experiment.py")


def _run(workdir, *args, experiment=EXPERIMENT):
    return main(["run", experiment, "--workdir", str(workdir), *args])


def _snapshot(workdir):
    """{relative path: bytes} of every file in the run dir."""
    return {os.path.relpath(os.path.join(d, f), workdir): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(workdir) for f in files}


@pytest.fixture
def run_dir(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert _run(workdir) == 0
    os.remove(workdir / "result.json")  # reappears only if the experiment runs again
    capsys.readouterr()
    return workdir


def _refused(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("rlft: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_changed_config_is_refused_before_any_work_listing_the_fields(run_dir, capsys):
    before = _snapshot(run_dir)
    assert _run(run_dir, "--config.optim.learning_rate=1e-4", "--config.seed=1") == 2
    err = _refused(capsys)
    assert "optim.learning_rate 0.001 -> 0.0001, seed 0 -> 1" in err and "--override" in err
    assert _snapshot(run_dir) == before  # nothing rewritten, appended or run

    assert _run(run_dir) == 0  # the same config resumes; each invocation is appended
    assert len(open(run_dir / "command.txt").read().splitlines()) == 2
    assert [set(json.loads(line)) for line in open(run_dir / "git.txt")] == [{"experiment", "rlft"}] * 2
    assert (run_dir / "result.json").exists() and not (run_dir / "config_changes.jsonl").exists()


def test_override_records_safe_changes_then_updates_run_config(run_dir, capsys):
    args = ["--config.train.steps=5", "--config.train.save_every=2", "--config.eval.batch_size=4", "--override"]
    assert _run(run_dir, *args) == 0
    entries = [json.loads(line) for line in open(run_dir / "config_changes.jsonl")]
    assert len(entries) == 1 and entries[0]["time"] and entries[0]["argv"][-len(args):] == args
    assert entries[0]["changes"] == {"eval.batch_size": {"old": 8, "new": 4},
                                     "train.save_every": {"old": 1, "new": 2},
                                     "train.steps": {"old": 2, "new": 5}}
    resolved = json.load(open(run_dir / "run_config.json"))
    assert resolved["train"]["steps"] == 5 and resolved["eval"]["batch_size"] == 4
    assert json.load(open(run_dir / "result.json")) == {"steps": 5}
    assert _run(run_dir, *args[:3]) == 0  # the new values are now the run's config
    assert len(open(run_dir / "config_changes.jsonl").readlines()) == 1


@pytest.mark.parametrize("args, unsafe", [
    (["--config.train.steps=5", "--config.optim.learning_rate=1e-4"], "optim.learning_rate 0.001 -> 0.0001"),
    (["--config.train.steps=1"], "train.steps 2 -> 1"),  # fewer steps than the run was made for
    (["--config.seed=3"], "seed 0 -> 3"),
])
def test_override_still_refuses_unsafe_changes(run_dir, capsys, args, unsafe):
    before = _snapshot(run_dir)
    assert _run(run_dir, *args, "--override") == 2
    err = _refused(capsys)
    assert f"--override cannot change {unsafe}: not safe on resume" in err
    assert "train.steps 2 -> 5" not in err  # the safe change is not listed as a problem
    assert _snapshot(run_dir) == before


def test_model_shape_change_is_refused_and_model_config_kept(run_dir, capsys):
    before = _snapshot(run_dir)
    for extra in ([], ["--override"]):
        assert _run(run_dir, "--config.model.d_model=64", *extra) == 2
        assert "model.d_model 32 -> 64" in _refused(capsys)
    assert _snapshot(run_dir) == before

    # The library call refuses too (a run() called without the CLI), naming the fields and the file.
    path = run_dir / "model_config.json"
    with pytest.raises(RlftError, match=r"model_config.json describes another model \(d_ff 128 -> 256, "
                                        r"d_model 32 -> 64, head_dim 8 -> 16\)"):
        save_model_config(run_dir, ModelConfig.gpt2(vocab_size=64, max_positions=64, d_model=64, n_layers=2,
                                                    n_heads=4))
    assert save_model_config(run_dir, ModelConfig.gpt2(vocab_size=64, max_positions=64, d_model=32, n_layers=2,
                                                       n_heads=4)) == path  # the same model: kept
    assert _snapshot(run_dir) == before
    path.write_text("{garbled")
    with pytest.raises(RlftError, match="not valid JSON.*not replaced"):
        save_model_config(run_dir, ModelConfig.gpt2(vocab_size=64))


def test_remat_may_change_on_resume_the_layout_may_not(run_dir, capsys):
    assert _run(run_dir, "--config.model.remat=full") == 2  # a change like any other: needs --override
    assert "model.remat 'none' -> 'full'" in _refused(capsys)
    assert _run(run_dir, "--config.model.remat=full", "--override") == 0
    capsys.readouterr()
    assert json.load(open(run_dir / "model_config.json"))["remat"] == "full"
    entry = json.loads(open(run_dir / "config_changes.jsonl").readline())
    assert entry["changes"] == {"model.remat": {"old": "none", "new": "full"}}
    assert _run(run_dir, "--config.model.remat=full", "--config.model.scan_layers=true", "--override") == 2
    assert "--override cannot change model.scan_layers False -> True" in _refused(capsys)


def test_config_model_name_selects_a_named_model(run_dir, capsys):
    assert _run(run_dir, "--config.model=llama2_7b", "--print-config") == 0
    assert "--config.model.name=llama2_7b" in capsys.readouterr().out
    for flags in (["--print-config"], []):  # print-config refuses what run refuses
        assert _run(run_dir, "--config.model=llama-9b", *flags) == 2
        assert "model.name='llama-9b': must be empty (the experiment's own shape) or one of gpt2" in _refused(capsys)
    section = model_section(d_model=32, n_layers=2, n_heads=4, max_positions=64)
    section.update(name="tiny_llama", remat="dots", scan_layers=True)
    assert model_from_section(section, 300) == model_config("tiny_llama", remat="dots", scan_layers=True)
    with pytest.raises(RlftError, match=r"model.name='tiny_llama': its vocabulary \(512 tokens\) is smaller"):
        model_from_section(section, 100_000)


def test_another_experiment_in_the_run_dir_is_refused(run_dir, capsys):
    assert _run(run_dir, experiment=f"{TOY}:tiny") == 2
    assert "experiment 'contract_experiment.py' -> 'toy_experiment.py'" in _refused(capsys)


def test_print_config_leaves_the_run_dir_alone(run_dir, capsys):
    before = _snapshot(run_dir)
    assert _run(run_dir, "--config.seed=7", "--print-config") == 0
    assert "--config.seed=7" in capsys.readouterr().out
    assert _snapshot(run_dir) == before


def test_fields_new_since_the_run_started_resume_at_their_defaults(run_dir, capsys):
    """A run dir recorded before a field existed resumes without --override while the field is at
    its default (recorded in config_changes.jsonl); a non-default value is a change like any other,
    and `rlft eval`'s view of the run fills the field from the preset."""
    from rlft.config import load_run_experiment

    path = run_dir / "run_config.json"
    old = json.load(open(path))
    del old["model"]["scan_layers"], old["optim"]  # as written by an older rlft / experiment
    path.write_text(json.dumps(old))
    _, config = load_run_experiment(str(run_dir))
    assert config.model.scan_layers is False and config.optim.learning_rate == 1e-3

    before = _snapshot(run_dir)
    assert _run(run_dir, "--config.optim.learning_rate=1e-4") == 2  # absent -> not the default: refused
    assert "optim.learning_rate (absent) -> 0.0001" in _refused(capsys)
    assert _snapshot(run_dir) == before

    assert _run(run_dir) == 0
    assert "fields new since this run started, at their defaults: model.scan_layers=False, " \
           "optim.learning_rate=0.001" in capsys.readouterr().err
    entry = json.loads(open(run_dir / "config_changes.jsonl").readline())
    assert entry["changes"] == {} and entry["new_fields"] == {"model.scan_layers": False, "optim.learning_rate": 0.001}
    assert json.load(open(path))["optim"] == {"learning_rate": 0.001}  # the record is complete again
    assert _run(run_dir) == 0 and len(open(run_dir / "config_changes.jsonl").readlines()) == 1
