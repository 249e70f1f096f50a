"""File-system faults at the start of `rlft run` and in `rlft export`: one line, nothing half-written.

A work directory that is a file or under one, a read-only file system, no permission, a full disk,
a quota, the file-size limit: `rlft` exits 2 with one `rlft: error: PATH: REASON (what to do)` line,
and leaves no partial run_config.json or export behind that a later command would take as valid.
The tests run as root, where permissions do not stop writes, so the faults are injected into
os.mkdir / os.open / open for paths under the test's directory, except the file-size limit, which
is real (RLIMIT_FSIZE in a subprocess: `rlft` ignores SIGXFSZ so the write fails with EFBIG).
"""

import builtins
import errno
import os
import subprocess
import sys

import pytest
from flax import nnx

from rlft.cli.main import main
from rlft.models import Decoder, ModelConfig
from tests.pairs_util import random_params
from tests.test_bad_inputs import cli_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "tests", "fixtures", "toy_experiment.py")
REAL_OPEN, REAL_MKDIR, REAL_OS_OPEN = builtins.open, os.mkdir, os.open


def fault(code: int, filename=None) -> OSError:
    return OSError(code, os.strerror(code), *([] if filename is None else [filename]))


class FailingWrites:
    """A file opened for writing whose write() stores half the data, then fails like a full disk
    (the OSError of write() and close() names no file)."""

    def __init__(self, file, code: int):
        self._file, self._code = file, code

    def write(self, data):
        self._file.write(data[: len(data) // 2])
        self._file.flush()
        raise fault(self._code)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def under(path, root) -> bool:
    return os.path.abspath(os.fspath(path)).startswith(os.path.abspath(root) + os.sep)


def no_mkdir(monkeypatch, root, code):
    """os.mkdir (hence os.makedirs) of a directory under `root` fails with `code`."""
    def mkdir(path, *args, **kwargs):
        if under(path, root):
            raise fault(code, path)
        return REAL_MKDIR(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


def no_create(monkeypatch, root, code):
    """os.open for writing of a file under `root` fails with `code` (a read-only file system)."""
    def os_open(path, flags, *args, **kwargs):
        if under(path, root) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise fault(code, path)
        return REAL_OS_OPEN(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)


def failing_writes(monkeypatch, root, code, name):
    """Writes to a file under `root` whose name starts with `name` store half their data, then fail."""
    def open_(file, mode="r", *args, **kwargs):
        opened = REAL_OPEN(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and under(file, root) and set(mode) & set("wax") \
                and os.path.basename(os.fspath(file)).startswith(name):
            return FailingWrites(opened, code)
        return opened

    monkeypatch.setattr(builtins, "open", open_)


# --- rlft run ------------------------------------------------------------------------------------

# (case, fault injector (monkeypatch, workdir) or None, a run before the fault?, expected line after "rlft: error: ")
RUN_CASES = [
    ("read-only new workdir", lambda mp, w: no_mkdir(mp, os.path.dirname(w), errno.EROFS), False,
     "{w}: Read-only file system (choose a writable --workdir)"),
    ("no permission for a new workdir", lambda mp, w: no_mkdir(mp, os.path.dirname(w), errno.EACCES), False,
     "{w}: Permission denied (check its permissions or choose another --workdir)"),
    ("read-only existing run dir", lambda mp, w: no_create(mp, w, errno.EROFS), True,
     "{w}/.rlft.lock: Read-only file system (choose a writable --workdir)"),
    ("full disk at run_config.json", lambda mp, w: failing_writes(mp, w, errno.ENOSPC, "run_config.json"), False,
     "{w}/run_config.json: No space left on device (free space or choose another --workdir)"),
    ("quota at run_config.json", lambda mp, w: failing_writes(mp, w, errno.EDQUOT, "run_config.json"), False,
     "{w}/run_config.json: Disk quota exceeded (free space within the quota or choose another --workdir)"),
    ("file-size limit at run_config.json", lambda mp, w: failing_writes(mp, w, errno.EFBIG, "run_config.json"),
     False, "{w}/run_config.json: File too large (the file-size limit (ulimit -f) was reached: raise it or "
            "choose another --workdir)"),
    ("full disk at command.txt", lambda mp, w: failing_writes(mp, w, errno.ENOSPC, "command.txt"), True,
     "{w}: No space left on device (free space or choose another --workdir)"),
]


@pytest.mark.parametrize("case, inject, run_first, expected", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_run_on_a_faulty_file_system_is_one_line(case, inject, run_first, expected, tmp_path, monkeypatch, capsys):
    workdir = str(tmp_path / "run")
    if run_first:
        assert main(["run", TOY, "--workdir", workdir]) == 0
    before = sorted(os.listdir(workdir)) if run_first else None
    inject(monkeypatch, workdir)
    line = cli_error(["run", TOY, "--workdir", workdir], capsys)
    assert line == "rlft: error: " + expected.format(w=workdir)
    monkeypatch.undo()
    if run_first:
        assert sorted(os.listdir(workdir)) == before
    elif os.path.isdir(workdir):  # nothing a resume would take for a run's record
        assert sorted(os.listdir(workdir)) == [".rlft.lock"], os.listdir(workdir)
    assert main(["run", TOY, "--workdir", workdir]) == 0  # and once the fault is gone, the run works


def test_a_workdir_that_is_a_file_or_under_one(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    line = cli_error(["run", TOY, "--workdir", str(file)], capsys)
    assert line == f"rlft: error: --workdir {file}: exists and is not a directory; choose another --workdir"
    line = cli_error(["run", TOY, "--workdir", str(file / "run")], capsys)
    assert line == (f"rlft: error: {file / 'run'}: Not a directory (a component of the path is a file, not a "
                    f"directory: choose another --workdir)")
    assert file.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


# --- rlft export ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    """A tiny Hugging Face checkpoint directory (one-layer GPT-2, ~40 KB of weights, a tokenizer)."""
    from rlft.data.tokenizer import train_tokenizer
    from rlft.models.hf import save_hf_checkpoint

    tok = train_tokenizer([f"the film was {w} and {w}." for w in ("good", "bad", "long")] * 5, 300,
                          str(tmp_path_factory.mktemp("tokenizer")))
    cfg = ModelConfig.gpt2(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2, max_positions=32)
    _, params = random_params(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    path = str(tmp_path_factory.mktemp("hf") / "model")
    save_hf_checkpoint(cfg, params, path, tok)
    return path


def full_disk_in_safetensors(monkeypatch):
    """safetensors' save_file writes part of the file, then fails as it does on a full disk."""
    import safetensors.numpy
    from safetensors import SafetensorError

    def save_file(tensors, filename, metadata=None):
        with REAL_OPEN(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.numpy, "save_file", save_file)


def test_export_to_a_full_disk_leaves_nothing_half_written(hf_dir, tmp_path, monkeypatch, capsys):
    out, old = tmp_path / "out", tmp_path / "old"
    assert main(["export", hf_dir, "--out", str(old)]) == 0  # an earlier export, to be replaced
    files = {name: (old / name).read_bytes() for name in os.listdir(old)}
    full_disk_in_safetensors(monkeypatch)
    line = cli_error(["export", hf_dir, "--out", str(out)], capsys)
    assert line == f"rlft: error: {out}: No space left on device (free space or choose another --out)"
    line = cli_error(["export", hf_dir, "--out", str(old), "--overwrite"], capsys)
    assert line == f"rlft: error: {old}: No space left on device (free space or choose another --out)"
    assert {name: (old / name).read_bytes() for name in os.listdir(old)} == files  # the old export intact
    assert sorted(os.listdir(tmp_path)) == ["old"]  # no `out`, no temporary sibling


def test_export_to_a_read_only_file_system(hf_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    no_mkdir(monkeypatch, tmp_path, errno.EROFS)
    line = cli_error(["export", hf_dir, "--out", str(out)], capsys)
    assert line == f"rlft: error: {out}: Read-only file system (choose a writable --out)"
    assert os.listdir(tmp_path) == []


# Sets a file-size limit below the weights' size, then runs `rlft export` (argv[1:]) in this process.
LIMITED = """
import resource, sys
from rlft.cli.main import main
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.exit(main(sys.argv[1:]))
"""


def test_export_past_the_file_size_limit_is_one_line(hf_dir, tmp_path):
    """A real RLIMIT_FSIZE: without `rlft` ignoring SIGXFSZ the signal would kill the export mid-file."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # no cache writes
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = subprocess.run([sys.executable, "-c", LIMITED, "export", hf_dir, "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().splitlines() == [
        f"rlft: error: {out}: File too large (the file-size limit (ulimit -f) was reached: raise it or choose "
        f"another --out)"], proc.stderr
    assert os.listdir(tmp_path) == []
