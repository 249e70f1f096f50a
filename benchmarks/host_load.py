"""How busy the rest of the machine was while a benchmark ran: one meter for every benchmark.

Other processes' CPU = the machine's busy time from /proc/stat minus this process's and its
waited-for children's CPU time (a peer subprocess counts as ours). Figures taken while other
processes used more than ~0.25 cores are not comparable: trl's and PyTorch's OpenMP threads
collapse when a core is taken, XLA's less so.
"""

from __future__ import annotations

import os
import resource
import time

QUIET_CORES = 0.25  # a measurement is "quiet" when other processes used less CPU than this


class LoadMeter:
    """Wall seconds of a call and the cores other processes used meanwhile."""

    hz = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _busy_s() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / LoadMeter.hz  # user nice system idle iowait irq softirq steal

    @staticmethod
    def _ours_s() -> float:
        total = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            total += usage.ru_utime + usage.ru_stime
        return total

    def measure(self, fn):
        """(fn's return value, wall seconds, other processes' cores or nan)."""
        busy0, ours0, start = self._busy_s(), self._ours_s(), time.perf_counter()
        value = fn()
        wall = time.perf_counter() - start
        busy1, ours1 = self._busy_s(), self._ours_s()
        if busy0 is None or busy1 is None:
            return value, wall, float("nan")
        return value, wall, max(busy1 - busy0 - (ours1 - ours0), 0.0) / wall
