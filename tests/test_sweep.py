"""`rlft sweep`: grid × seeds as ordinary run directories, resumable, failures listed, emitted
commands / SLURM array script, and the mean ± std report (tests/fixtures/sweep_experiment.py trains
nothing: score = x + seed²/4, loss = 10 - x - seed; x < 0 fails)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rlft.cli.main import main
from rlft.cli.sweep import DONE, parse_grid, run_name, split_values
from rlft.errors import RlftError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
EXPERIMENT = os.path.join(FIXTURES, "sweep_experiment.py")


def _invocations(run_dir):
    path = os.path.join(run_dir, "invocations.txt")
    return len(open(path).read().splitlines()) if os.path.exists(path) else 0


def test_grid_parsing_and_run_names():
    assert split_values("a,b,(1, 2),'x,y'") == ["a", "b", "(1, 2)", "'x,y'"]
    assert parse_grid(["rl.algorithm=grpo,rloo", "--config.rl.kl.placement=reward,loss"]) == [
        ("rl.algorithm", ["grpo", "rloo"]), ("rl.kl.placement", ["reward", "loss"])]
    for bad, words in (("rl.algorithm", "KEY=V1,V2"), ("seed=1,2", "--seeds"), ("a=1,,2", "empty value"),
                       ("a=1,1", "repeated")):
        with pytest.raises(RlftError, match=words):
            parse_grid([bad])
    with pytest.raises(RlftError, match="already a --grid key"):
        parse_grid(["a=1", "a=2"])
    assert run_name([("rl.algorithm", "grpo"), ("rl.kl.placement", "loss")], 1) == \
        "rl.algorithm=grpo,rl.kl.placement=loss,seed=1"
    a, b = run_name([("data.train", "x/y z")], 0), run_name([("data.train", "x_y_z")], 0)
    assert "/" not in a and " " not in a and a != b and a.startswith("data.train=x_y_z,seed=0-")
    assert len(run_name([("k", "v" * 500)], 0)) <= 120


@pytest.mark.parametrize("args, words", [
    (["--grid", "x=1.0,abc"], "--grid x=1.0,abc (value 'abc'): --config.x='abc': expected a number"),
    (["--grid", "nope=1,2"], "--grid nope=1,2 (value '1'): unknown config field 'nope'"),
    (["--config.y=1"], "unknown config field 'y'"),
    (["--seeds", "0"], "--seeds=0: must be >= 1"),
    (["--seeds", "2", "--seed-list", "0,1"], "give one of them"),
    (["--grid", "x=1.0", "--config.x=2.0"], "give it in one place"),
    (["--grid", "mode=a,strict"], "--grid mode=a,strict (value 'strict'): mode='strict' needs x >= 2"),
    (["--grid", "x=1.0,2.0", "--grid", "mode=strict"], "run x=1.0,mode=strict,seed=0: mode='strict' needs x >= 2"),
    (["--bogus"], "unrecognised argument '--bogus'"),
])
def test_bad_flags_are_one_error_line_before_anything_runs(tmp_path, capsys, args, words):
    workdir = tmp_path / "sweep"
    assert main(["sweep", EXPERIMENT, "--workdir", str(workdir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlft: error: ") and len(err.strip().splitlines()) == 1 and words in err, err
    assert not workdir.exists()


def test_sweep_runs_skips_finished_resumes_unfinished_and_lists_failures(tmp_path, capsys):
    workdir = tmp_path / "sweep"
    args = ["sweep", EXPERIMENT, "--grid", "x=1.0,-1.0", "--seed-list", "0,3", "--workdir", str(workdir)]
    assert main(args) == 1  # a failing grid point: the others still ran, the status says so
    manifest = json.load(open(workdir / "sweep.json"))
    names = [run["name"] for run in manifest["runs"]]
    assert names == ["x=1.0,seed=0", "x=1.0,seed=3", "x=-1.0,seed=0", "x=-1.0,seed=3"]
    assert manifest["runs"][1]["overrides"] == ["--config.x=1.0", "--config.seed=3"]
    assert manifest["primary_metric"] == "score"
    for name in names:  # ordinary rlft run directories
        assert json.load(open(workdir / name / "run_config.json"))["seed"] == int(name[-1])
    assert json.load(open(workdir / "x=1.0,seed=3" / "eval" / "report.json"))["score"] == 1.0 + 9 / 4
    report = json.load(open(workdir / "report.json"))
    assert report["counts"] == {"finished": 2, "failed": 2}
    failed = {run["name"]: run for run in report["not_finished"]}
    assert set(failed) == {"x=-1.0,seed=0", "x=-1.0,seed=3"}
    assert failed["x=-1.0,seed=0"]["error"] == \
        "rlft: error: x=-1.0: negative on purpose (a failing grid point)"
    md = (workdir / "report.md").read_text()
    assert "## Missing or failed runs" in md and "| x=-1.0,seed=3 | failed | rlft: error: x=-1.0" in md
    assert (workdir / "report.png").stat().st_size > 0

    # Again: finished runs are skipped, an unfinished one (no marker) resumes, failed ones run again.
    os.remove(workdir / "x=1.0,seed=3" / DONE)
    kept = workdir / "x=1.0,seed=0" / "eval" / "report.json"
    mtime = kept.stat().st_mtime_ns
    assert main(args) == 1
    assert [_invocations(workdir / n) for n in names] == [1, 2, 2, 2]
    assert kept.stat().st_mtime_ns == mtime
    assert (workdir / "x=1.0,seed=3" / DONE).exists()
    assert len(open(workdir / "x=1.0,seed=3" / "command.txt").read().splitlines()) == 2  # resumed in place
    err = capsys.readouterr().err
    assert "x=1.0,seed=0: finished before, skipped" in err and "x=1.0,seed=3: resuming" in err

    # Another experiment set-up for the same sweep directory is refused before anything runs.
    assert main([*args, "--config.mode=b"]) == 2
    assert "use a new --workdir" in capsys.readouterr().err


def test_cross_field_checks_see_the_whole_grid_point(tmp_path, capsys):
    """mode=strict is refused alone (x defaults to 1) but valid beside x=2 from another --grid key."""
    workdir = tmp_path / "sweep"
    assert main(["sweep", EXPERIMENT, "--grid", "x=2.0", "--grid", "mode=a,strict", "--workdir", str(workdir),
                 "--emit", "commands"]) == 0
    commands = (workdir / "commands.txt").read_text().splitlines()
    assert len(commands) == 2 and "--config.x=2.0 --config.mode=strict" in commands[1]


def test_emit_commands_and_slurm_run_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["sweep", EXPERIMENT, "--preset", "default", "--grid", "x=1.0,2.0", "--grid", "mode=a,b c",
            "--seeds", "2", "--config.steps=3", "--workdir", "sw"]
    assert main([*args, "--emit", "commands"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == (tmp_path / "sw" / "commands.txt").read_text().splitlines() and len(lines) == 8
    run_dir = os.path.join("sw", "x=2.0,mode=a,seed=1")
    assert lines[5] == (f"rlft run {EXPERIMENT}:default --workdir {run_dir} --config.steps=3 --config.x=2.0 "
                        f"--config.mode=a --config.seed=1 && touch {run_dir}/{DONE}")
    assert "--config.mode='b c'" in lines[3] and not any(p.is_dir() and p.name != "logs"
                                                          for p in (tmp_path / "sw").iterdir())

    assert main([*args, "--emit", "slurm"]) == 0
    script = (tmp_path / "sw" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-7" in script and 'SLURM_ARRAY_TASK_ID + 1' in script
    assert str(tmp_path / "sw" / "commands.txt") in script
    # The array task runs its line (here with bash, as sbatch would) and marks the run finished.
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "5", "PYTHON": sys.executable}
    subprocess.run(["bash", "sw/sweep.sbatch"], env=env, check=True, capture_output=True)
    assert (tmp_path / run_dir / DONE).exists() and _invocations(tmp_path / run_dir) == 1
    assert json.load(open(tmp_path / run_dir / "run_config.json"))["steps"] == 3
    assert main([*args, "--emit", "commands"]) == 0  # a finished run is left out of the next emit
    assert len(capsys.readouterr().out.splitlines()) == 7


def test_report_mean_std_against_numpy_and_regenerated(tmp_path, capsys):
    workdir = tmp_path / "sweep"
    assert main(["sweep", EXPERIMENT, "--grid", "mode=a,b", "--seeds", "3", "--workdir", str(workdir),
                 "--emit", "commands"]) == 0
    manifest = json.load(open(workdir / "sweep.json"))
    rng = np.random.default_rng(0)
    values = {}
    for run in manifest["runs"]:
        if run["name"] == "mode=b,seed=2":
            continue  # never ran: listed as not started
        values[run["name"]] = v = rng.normal(size=2)
        os.makedirs(os.path.join(run["workdir"], "eval"))
        with open(os.path.join(run["workdir"], "eval", "report.json"), "w") as f:
            json.dump({"acc": v[0], "other": v[1], "flag": True, "seed": run["seed"], "name": "x"}, f)
        open(os.path.join(run["workdir"], DONE), "w").close()
    assert main(["sweep", str(workdir), "--report"]) == 0
    report = json.load(open(workdir / "report.json"))
    assert report["metrics"] == ["acc", "other"] and report["primary_metric"] == "score"  # the experiment's
    assert main(["sweep", str(workdir), "--report", "--metric", "acc"]) == 0
    report = json.load(open(workdir / "report.json"))
    rows = {row["label"]: row for row in report["points"]}
    for label, n in (("mode=a", 3), ("mode=b", 2)):
        for i, metric in enumerate(("acc", "other")):
            expect = np.array([values[f"{label},seed={s}"][i] for s in range(n)])
            stat = rows[label]["metrics"][metric]
            assert stat["n"] == n and stat["mean"] == pytest.approx(expect.mean())
            assert stat["std"] == pytest.approx(expect.std(ddof=1))
            assert stat["values"] == {str(s): pytest.approx(expect[s]) for s in range(n)}
    means = [row["metrics"]["acc"]["mean"] for row in report["points"]]
    assert means == sorted(means, reverse=True)
    assert [run["name"] for run in report["not_finished"]] == ["mode=b,seed=2"]
    assert report["not_finished"][0]["state"] == "not started"
    md = (workdir / "report.md").read_text()
    stat = rows["mode=a"]["metrics"]["acc"]
    assert f"| mode=a | 3 | {stat['mean']:.4g} ± {stat['std']:.4g} |" in md and "| mode=b,seed=2 | not started |" in md

    before = (workdir / "report.json").read_text()
    for name in ("report.json", "report.md", "report.png"):
        os.remove(workdir / name)
    assert main(["sweep", str(workdir), "--report", "--metric", "acc"]) == 0
    assert (workdir / "report.json").read_text() == before and (workdir / "report.png").exists()
    assert main(["sweep", str(workdir), "--report", "--metric", "nope"]) == 2
    assert "--metric nope: not a metric" in capsys.readouterr().err
