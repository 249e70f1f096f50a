"""Virtual environments for the peers that rlft's benchmarks run beside it.

Each peer lives in its own environment under the user cache, created on first use and reused
afterwards: ``$XDG_CACHE_HOME/rlft/bench/<name>`` (``~/.cache/rlft/bench/<name>`` by default).
A marker file written after a successful install records what was installed; an environment
without it (an interrupted install) or with a different package list is rebuilt.

torch is pinned to exactly ``torch==2.13.0``, installed first and repeated on the command line
that installs the peer: that version resolves to the CPU wheel kept on local disk, where any other
specification would pull a multi-GB CUDA build.

    python benchmarks/peers/envs.py              # create (or check) every environment
    python benchmarks/peers/envs.py trl-1.12     # one of them
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

TORCH = "torch==2.13.0"

# name -> packages installed after TORCH (which is repeated in the same command as a pin)
ENVIRONMENTS: dict[str, list[str]] = {
    "trl-1.16": ["trl==1.16.0"],  # GRPOTrainer, RLOOTrainer
    "trl-1.12": ["trl==1.12.0"],  # the last trl with trl.experimental.ppo.PPOTrainer
}

MARKER = ".rlft-bench-installed"


def cache_root() -> Path:
    """Directory holding every benchmark environment."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rlft" / "bench"


def env_dir(name: str) -> Path:
    """Directory of the environment called ``name``."""
    return cache_root() / name


def env_python(name: str) -> Path:
    """The Python interpreter of the environment called ``name``."""
    return env_dir(name) / "bin" / "python"


def _spec(name: str) -> dict:
    return {"python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "packages": [TORCH, *ENVIRONMENTS[name]]}


def is_ready(name: str) -> bool:
    """True when ``name`` finished installing with the packages listed in ENVIRONMENTS."""
    marker = env_dir(name) / MARKER
    if not marker.is_file() or not env_python(name).exists():
        return False
    try:
        return json.loads(marker.read_text()).get("spec") == _spec(name)
    except (OSError, ValueError):
        return False


def ensure_env(name: str, log=print) -> Path:
    """Create the environment ``name`` unless a finished install is there; return its Python.

    The install runs with this interpreter's ``python -m venv`` and the environment's own pip,
    torch first, then the peer with torch pinned again on the same command line.
    """
    if name not in ENVIRONMENTS:
        raise KeyError(f"unknown benchmark environment {name!r}; known: {sorted(ENVIRONMENTS)}")
    if is_ready(name):
        return env_python(name)
    target = env_dir(name)
    if target.exists():  # an unfinished or outdated install: start again
        log(f"[envs] removing incomplete environment {target}")
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"[envs] creating {target} ({' '.join(_spec(name)['packages'])}); this takes a few minutes once")
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
    py = str(env_python(name))
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, TORCH, *ENVIRONMENTS[name]], check=True)
    versions = subprocess.run(
        [py, "-c", "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
                   "('torch', 'transformers', 'trl', 'datasets', 'accelerate', 'tokenizers')}))"],
        check=True, capture_output=True, text=True).stdout.strip()
    (target / MARKER).write_text(json.dumps({"spec": _spec(name), "versions": json.loads(versions)}, indent=1))
    log(f"[envs] {name} ready: {versions}")
    return env_python(name)


def installed_versions(name: str) -> dict:
    """Package versions recorded by the finished install of ``name`` ({} if not installed)."""
    try:
        return json.loads((env_dir(name) / MARKER).read_text()).get("versions", {})
    except (OSError, ValueError):
        return {}


if __name__ == "__main__":
    for env in sys.argv[1:] or list(ENVIRONMENTS):
        print(env, ensure_env(env))
