"""Experiment reports: WORKDIR/report.json (machine-readable) beside WORKDIR/report.md (for people)."""

from __future__ import annotations

import json
import os

from rlft.distributed import is_primary


def write_report(workdir: str, report: dict, markdown: str) -> None:
    """Write an experiment's results as WORKDIR/report.json and WORKDIR/report.md (process 0 only)."""
    if not is_primary():
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(markdown)
