"""The tuned glibc allocator: freed buffers are reused without page faults; RLFT_MALLOC opts out."""

import os
import subprocess
import sys

import pytest

# Allocates, frees and re-allocates 256 MiB, as XLA:CPU does with each step's temporaries, and
# prints the minor page faults of the second allocation.
_PROBE = """
import ctypes, resource, sys
from rlft.host import tune_host_malloc
applied = tune_host_malloc()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20
def touch():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    return p
libc.free(ctypes.c_void_p(touch()))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
libc.free(ctypes.c_void_p(touch()))
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_allocation_faults(env_value: str | None) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "RLFT_MALLOC"}
    if env_value is not None:
        env["RLFT_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_allocator_reuses_pages_and_opt_out_leaves_glibc_alone():
    applied, faults = _second_allocation_faults(None)
    assert applied and faults < 1000, faults  # the freed pages stayed mapped and are reused
    applied, faults = _second_allocation_faults("default")
    assert not applied and faults > 30000, faults  # glibc's mmap/munmap: every page faults again


def test_rlft_command_tunes_before_running(monkeypatch):
    import rlft.cli.main

    calls = []
    monkeypatch.setattr(rlft.cli.main, "tune_host_malloc", lambda: calls.append(True))
    assert rlft.cli.main.main(["export", "/nonexistent/checkpoint", "--out", "/tmp/x"]) == 2
    assert calls == [True]
