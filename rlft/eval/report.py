"""Experiment reports: report.json (machine-readable) beside report.md (for people), in WORKDIR/eval/."""

from __future__ import annotations

import json
import os

from rlft.parallel.distributed import is_primary
from rlft.files import write_text


def write_report(directory: str, report: dict, markdown: str) -> None:
    """Write an experiment's results as DIRECTORY/report.json and DIRECTORY/report.md (process 0
    only; each file atomically). Experiments' `evaluate` writes them to WORKDIR/eval/."""
    if not is_primary():
        return
    os.makedirs(directory, exist_ok=True)
    write_text(os.path.join(directory, "report.json"), json.dumps(report, indent=2))
    write_text(os.path.join(directory, "report.md"), markdown)
