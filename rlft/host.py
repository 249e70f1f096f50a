"""Host-process settings applied before JAX starts: glibc's allocator tuned for XLA:CPU, and the
number of simulated CPU devices.

XLA:CPU allocates each execution's temporaries (235 MiB for the tiny SFT step, 1.5 GiB for GPT-2
small) with posix_memalign on a worker thread; glibc serves allocations that large with a fresh
mmap and returns them with munmap, so every step page-faults all of its temporary memory again
(61k faults per tiny step, 430k per GPT-2 small step; SFT measured 10-26% slower for it, see
benchmarks/README.md). One arena, no mmap and no trimming make later steps reuse the same pages;
the cost is that the process keeps its peak heap until it exits.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPT_OUT_ENV = "RLFT_MALLOC"  # RLFT_MALLOC=default leaves glibc's allocator as the process started it


def tune_host_malloc() -> bool:
    """Keep freed memory in glibc's heap for reuse; True if applied (Linux glibc only).

    Call before JAX creates its thread pools (the `rlft` command does, unless RLFT_MALLOC=default).
    A trim threshold of -1 is SIZE_MAX to glibc.
    """
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT_ENV) == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_max, m_arena_max = -1, -2, -4, -8
    return all(libc.mallopt(option, value) == 1 for option, value in (
        (m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, -1), (m_top_pad, 64 << 20)))


def force_host_devices(argv: list[str], default: int = 2) -> int:
    """Read `--host-devices N` from argv (else `default`) and ask XLA:CPU for N devices.

    Must run before JAX starts: the CPU device count is fixed then. Returns N.
    """
    count = default
    for i, arg in enumerate(argv):
        if arg.startswith("--host-devices"):
            count = int(arg.split("=", 1)[1] if "=" in arg else argv[i + 1])
    flag = f"--xla_force_host_platform_device_count={count}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    return count
