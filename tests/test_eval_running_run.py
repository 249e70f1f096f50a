"""`rlft eval RUN_DIR` of a run that is still training.

Eval takes no lock (the run holds it), lists only committed checkpoints (Orbax writes a step into
`<step>.orbax-checkpoint-tmp-*` and renames it when complete), writes nothing outside RUN_DIR/eval/,
and skips a Gao-curve step the run deleted (it keeps its last `keep`) after eval listed it.
"""

import json
import os
import shutil
from typing import Any

import flax.struct
import numpy as np
import pytest
from flax import nnx

from rlft.cli import run_lock
from rlft.train.checkpoints import Checkpointer, checkpoint_steps, save_model_config
from rlft.cli.main import main
from rlft.models import Decoder, ModelConfig
from tests.pairs_util import random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(ROOT, "tests", "fixtures", "eval_experiment.py")
# Orbax's name for a step being saved (orbax/checkpoint/_src/path/temporary_paths.py), renamed to
# `2` once every file is written.
UNCOMMITTED = "2.orbax-checkpoint-tmp-1700000000000000"


@flax.struct.dataclass
class State:
    params: Any
    step: Any


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> str:
    """A run dir of tests/fixtures/eval_experiment.py: tokenizer, model config, sft step 1, rl steps 1 and 2."""
    from rlft import config as config_lib
    from rlft.data.tokenizer import train_tokenizer

    path = str(tmp_path_factory.mktemp("finished") / "run")
    tok = train_tokenizer([f"the film was {w} and {w}." for w in ("good", "bad", "long")] * 5, 300,
                          os.path.join(path, "tokenizer"))
    cfg = ModelConfig.gpt2(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2, max_positions=32)
    save_model_config(path, cfg)
    with open(os.path.join(path, "experiment.json"), "w") as f:
        json.dump({"path": EXPERIMENT, "preset": "default"}, f)
    with open(os.path.join(path, "run_config.json"), "w") as f:
        json.dump(config_lib.load_experiment(EXPERIMENT)[2].to_dict(), f)
    for stage, steps in (("sft", (1,)), ("rl", (1, 2))):
        with Checkpointer(os.path.join(path, stage, "checkpoints"), async_save=False) as ckpt:
            for step in steps:
                _, params = random_params(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), seed=step)
                assert ckpt.save(step, State(params=params, step=np.int32(step)), {"data_position": step},
                                 force=True)
    return path


@pytest.fixture
def running_run(finished_run, tmp_path) -> str:
    """The run as seen while it saves rl step 2: the step's directory still has Orbax's temporary
    name and is incomplete (no commit record, a truncated file)."""
    path = str(tmp_path / "run")
    shutil.copytree(finished_run, path)
    checkpoints = os.path.join(path, "rl", "checkpoints")
    os.rename(os.path.join(checkpoints, "2"), os.path.join(checkpoints, UNCOMMITTED))
    os.remove(os.path.join(checkpoints, UNCOMMITTED, "_CHECKPOINT_METADATA"))
    with open(os.path.join(checkpoints, UNCOMMITTED, "params", "_METADATA"), "r+b") as f:
        f.truncate(10)
    return path


def snapshot(path: str) -> dict[str, bytes]:
    """relative path -> bytes of every file under `path`."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


def changed_files(before: dict, after: dict) -> set[str]:
    return {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}


def test_eval_of_a_running_run_reads_committed_steps_and_writes_only_eval(running_run, capsys):
    assert checkpoint_steps(os.path.join(running_run, "rl")) == [1]  # the listing eval uses
    with run_lock.acquire(running_run, ["rlft", "run", EXPERIMENT]):  # the run holds its directory
        before = snapshot(running_run)
        assert main(["eval", running_run]) == 0  # no lock taken, so not refused
        after = snapshot(running_run)
    changed = changed_files(before, after)
    assert changed and all(p.startswith("eval" + os.sep) for p in changed), sorted(changed)
    assert {"report.json", "report.md", "samples.json", "gao.png", "policies.png"} <= set(os.listdir(
        os.path.join(running_run, "eval")))
    assert not [p for p in changed if ".tmp-" in p]  # no temporary file left in eval/
    report = json.load(open(os.path.join(running_run, "eval", "report.json")))
    assert report["policies"] == ["sft", "rl"]
    assert [p["step"] for p in report["gao"]] == [0, 1]  # not the uncommitted step 2


def test_eval_skips_a_gao_step_the_running_run_deleted(finished_run, tmp_path, monkeypatch, capsys):
    """The run deletes its oldest checkpoint (keep) between eval's listing and eval's read of it."""
    import rlft.eval.compare as compare

    path = str(tmp_path / "run")
    shutil.copytree(finished_run, path)
    step_1 = os.path.join(path, "rl", "checkpoints", "1")
    read = compare.decoder_state

    def deleted_before_read(cfg, source, mesh):
        if isinstance(source, str) and os.path.abspath(source) == step_1:
            shutil.rmtree(step_1)
        return read(cfg, source, mesh)

    monkeypatch.setattr(compare, "decoder_state", deleted_before_read)
    capsys.readouterr()
    assert main(["eval", path]) == 0
    assert "rl step 1 was deleted by the running run while being read; skipped" in capsys.readouterr().err
    report = json.load(open(os.path.join(path, "eval", "report.json")))
    assert [p["step"] for p in report["gao"]] == [0, 2]
