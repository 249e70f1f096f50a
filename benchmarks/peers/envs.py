"""Virtual environments for the peers that rlft's benchmarks run beside it.

Each peer lives in its own environment under the user cache, created on first use and reused
afterwards: ``$XDG_CACHE_HOME/rlft/bench/<name>`` (``~/.cache/rlft/bench/<name>`` by default).
A marker file written after a successful install records what was installed; an environment
without it (an interrupted install) or with a different package list is rebuilt.

The torch peers (trl) pin torch to exactly ``torch==2.13.0``, installed first and repeated on the
command line that installs the peer: that version resolves to the CPU wheel kept on local disk,
where any other specification would pull a multi-GB CUDA build. An environment that does not take
torch (Tunix, a JAX library) never names torch at all, so nothing in it can ask for another build.

    python benchmarks/peers/envs.py              # create (or check) every environment
    python benchmarks/peers/envs.py trl-1.12     # one of them
    python benchmarks/peers/envs.py tunix-0.1.7
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TORCH = "torch==2.13.0"

TRL_VERSIONS = ("torch", "transformers", "trl", "datasets", "accelerate", "tokenizers")
TUNIX_VERSIONS = ("google-tunix", "jax", "jaxlib", "flax", "optax", "qwix", "grain", "orbax-checkpoint",
                  "transformers", "tokenizers", "numpy")


@dataclass(frozen=True)
class PeerEnv:
    """What one environment installs.

    packages: the peer's pip requirements; torch: whether TORCH is installed first and repeated as a
    pin beside ``packages`` (only environments that need torch take it); versions: the distributions
    whose installed versions the marker records (and peers report).
    """

    packages: tuple[str, ...]
    torch: bool
    versions: tuple[str, ...]

    def requirements(self) -> list[str]:
        """Everything pip is asked for, torch pin first where the environment takes it."""
        return [TORCH, *self.packages] if self.torch else list(self.packages)


ENVIRONMENTS: dict[str, PeerEnv] = {
    # GRPOTrainer, RLOOTrainer
    "trl-1.16": PeerEnv(("trl==1.16.0",), torch=True, versions=TRL_VERSIONS),
    # the last trl with trl.experimental.ppo.PPOTrainer
    "trl-1.12": PeerEnv(("trl==1.12.0",), torch=True, versions=TRL_VERSIONS),
    # Tunix's GRPOLearner, at the versions the anchors measured (../shared/anchors/README.md);
    # tokenizers and transformers are what workload.py imports (Tunix depends on transformers too)
    "tunix-0.1.7": PeerEnv(("google-tunix==0.1.7", "jax==0.10.2", "jaxlib==0.10.2", "flax==0.12.8",
                            "qwix==0.1.8", "tokenizers", "transformers"), torch=False, versions=TUNIX_VERSIONS),
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
    """What the marker must record for an install of ``name`` to count as finished and current."""
    return {"python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "packages": ENVIRONMENTS[name].requirements()}


def is_ready(name: str) -> bool:
    """True when ``name`` finished installing with the packages listed in ENVIRONMENTS."""
    marker = env_dir(name) / MARKER
    if not marker.is_file() or not env_python(name).exists():
        return False
    try:
        return json.loads(marker.read_text()).get("spec") == _spec(name)
    except (OSError, ValueError):
        return False


def _pip_install(python: str, name: str) -> None:
    """Install ``name``'s packages with the environment's own pip (torch first, where it takes torch)."""
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
    spec = ENVIRONMENTS[name]
    if spec.torch:  # alone first, so the resolver below only ever sees the local CPU wheel
        subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, *spec.requirements()], check=True)


def _installed(python: str, distributions: tuple[str, ...]) -> dict:
    """{distribution: version} inside the environment (None for one that is not installed)."""
    script = ("import importlib.metadata as m, json, sys\n"
              "def v(p):\n"
              "    try:\n        return m.version(p)\n"
              "    except m.PackageNotFoundError:\n        return None\n"
              "print(json.dumps({p: v(p) for p in sys.argv[1:]}))")
    out = subprocess.run([python, "-c", script, *distributions], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip())


def ensure_env(name: str, log=print) -> Path:
    """Create the environment ``name`` unless a finished install is there; return its Python.

    The install runs with this interpreter's ``python -m venv`` and the environment's own pip; a
    torch environment gets torch first, then the peer with torch pinned again on the same command line.
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
    _pip_install(py, name)
    versions = _installed(py, ENVIRONMENTS[name].versions)
    (target / MARKER).write_text(json.dumps({"spec": _spec(name), "versions": versions}, indent=1))
    log(f"[envs] {name} ready: {json.dumps(versions)}")
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
