"""`rlft sweep`: an ablation grid × seeds of one experiment, resumable, with a mean ± std report.

    rlft sweep EXPERIMENT.py[:PRESET] --grid rl.algorithm=grpo,rloo,gspo --grid rl.kl.placement=reward,loss \\
        --seeds 3 [--seed-list 0,5,9] [--preset tiny] [--workdir runs/sweep1] [--config.a.b=VALUE ...] \\
        [--metric NAME] [--emit commands|slurm]
    rlft sweep runs/sweep1 --report [--metric NAME]     # the report again (also written at the end of a sweep)

The runs. Every combination of the `--grid KEY=V1,V2,...` values (the first --grid varies slowest)
is run once per seed (`--seeds N`: 0 .. N-1, or `--seed-list 0,5,9`; neither: the experiment's own
seed), seed innermost. A run is an ordinary `rlft run` work directory under the sweep's, named from
its grid point and seed, e.g. `rl.algorithm=grpo,rl.kl.placement=loss,seed=1`: characters other than
letters, digits and `._=,+-` become `_`, and a name so changed (or longer than 120 characters) ends in
8 hex digits of a hash of the exact overrides, so two runs never share a directory. Its config is the
preset with the fixed `--config.*` overrides, then the grid point's, then `--config.seed=S`. Every
value goes through `rlft run`'s own parsing and checks (`rlft.config.apply_override`,
`validate_config`, the experiment's `check`): each grid value, the fixed overrides and every run are
checked before anything runs or is written, and a refused one is one `rlft: error:` line naming
the flag. WORKDIR/sweep.json (the manifest) lists every run: its name, directory, grid point, seed,
overrides and command. Another experiment, preset or fixed overrides for an existing sweep
directory is refused; another grid or seed list replaces the run list (runs on disk are kept).

Running. One `python -m rlft run` subprocess per run, sequentially: a subprocess gives each run a
fresh JAX runtime (no compiled programs, device buffers or global flags carried from one run to the
next), and a crash, an out-of-memory kill or a stuck run's SIGKILL ends that run, not the sweep. Its
output goes to WORKDIR/logs/NAME.log (appended). A run is finished when RUN/eval/report.json exists
and RUN/sweep.done does: the sweep writes that marker when `rlft run` exits 0, which happens only
after every stage and the experiment's evaluate finished (an emitted command writes it the same
way), so a report written by `rlft eval` of a half-trained run does not count. A sweep run again
skips finished runs and runs the others: `rlft run` on an existing directory resumes it. A run that
fails (non-zero exit) is recorded in WORKDIR/sweep_status.json with its error line (its last
`rlft: error:` line, else its last line) and the sweep goes on; the sweep then exits 1. Ctrl-C and
SIGTERM reach the running run, which saves and exits 130 / 143 (SIGTERM is forwarded to it); the
sweep then stops, writes the report and exits with that status; running it again resumes.

Emitting (`--emit`) runs nothing: it writes sweep.json and WORKDIR/commands.txt, one line per run
not yet finished, `rlft run EXP --workdir RUN --config... && touch RUN/sweep.done` (also printed
with `--emit commands`), and with `--emit slurm` WORKDIR/sweep.sbatch, a SLURM array script: task I
runs line I+1 of commands.txt in the directory the sweep was emitted from (`rlft` there is
`${PYTHON:-python} -m rlft`, and the batch shell forwards SIGTERM to it, so a run preempted near its
time limit saves). Submit it with `sbatch WORKDIR/sweep.sbatch`, then `rlft sweep WORKDIR --report`.

The report (WORKDIR/report.md, report.json, report.png). The metrics are the numeric top-level
fields of each finished run's eval/report.json (booleans and `seed` left out). Per grid point and
metric: the per-seed values, n (the seeds that have the metric), their mean and their sample
standard deviation (ddof=1; null with fewer than 2 seeds). Points are sorted by the primary metric's
mean, highest first (points without it last): `--metric NAME`, else the experiment's module-level
`PRIMARY_METRIC`, else the first metric alphabetically. report.png is a bar chart of the primary
metric with ± std error bars per grid point. Runs that are not finished are listed with their state
(failed with its error line, unfinished, not started), never hidden.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

from rlft.errors import RlftError
from rlft.files import read_json, write_json, write_text

MANIFEST = "sweep.json"
STATUS = "sweep_status.json"
DONE = "sweep.done"  # in a run directory: `rlft run` exited 0 there
RUN_REPORT = os.path.join("eval", "report.json")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_MAX_NAME = 120


class _Parser(argparse.ArgumentParser):
    """argparse that raises RlftError instead of exiting, so the CLI prints one clean line."""

    def error(self, message: str):
        raise RlftError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlft sweep", description="Run an ablation grid × seeds of an experiment and "
                                                    "report each grid point's mean ± std over seeds.")
    parser.add_argument("target", help="EXPERIMENT.py[:PRESET] to sweep, or a sweep directory with --report")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a config field and its values (repeatable: the runs are the product)")
    parser.add_argument("--seeds", type=int, help="seeds 0 .. N-1, set through --config.seed")
    parser.add_argument("--seed-list", help="explicit seeds, e.g. 0,5,9")
    parser.add_argument("--preset", help="the experiment's preset (same as EXPERIMENT.py:PRESET)")
    parser.add_argument("--workdir", help="the sweep directory (default: runs/sweep-NAME[-PRESET])")
    parser.add_argument("--metric", help="the report's primary metric (default: the experiment's "
                                         "PRIMARY_METRIC, else the first alphabetically)")
    parser.add_argument("--emit", choices=("commands", "slurm"),
                        help="write commands.txt (and sweep.sbatch) for a cluster instead of running")
    parser.add_argument("--report", action="store_true", help="TARGET is a sweep directory: write its report again")
    return parser


# ---------------------------------------------------------------------------------------------
# Flags -> runs


def split_values(text: str) -> list[str]:
    """"a,b,(1, 2)" -> ["a", "b", "(1, 2)"]: commas inside brackets or quotes do not split."""
    values, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    return [*values, text[start:]]


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """[(key, [value texts])] from --grid KEY=V1,V2 flags, in the order given."""
    grid = []
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip().removeprefix("--config.").removeprefix("config.")
        if not eq or not key:
            raise RlftError(f"--grid {item}: expected KEY=V1,V2,... (e.g. --grid rl.algorithm=grpo,rloo)")
        if key == "seed":
            raise RlftError(f"--grid {item}: set seeds with --seeds N or --seed-list S1,S2,...")
        if key in (k for k, _ in grid):
            raise RlftError(f"--grid {item}: {key} is already a --grid key; give all its values in one flag")
        values = split_values(text)
        if any(not v for v in values):
            raise RlftError(f"--grid {item}: an empty value")
        if len(set(values)) != len(values):
            raise RlftError(f"--grid {item}: a value is repeated")
        grid.append((key, values))
    return grid


def parse_seeds(seeds: int | None, seed_list: str | None) -> list[int] | None:
    """The seeds to run (None: the experiment's own seed)."""
    if seeds is not None and seed_list is not None:
        raise RlftError("--seeds and --seed-list: give one of them")
    if seeds is not None:
        if seeds < 1:
            raise RlftError(f"--seeds={seeds}: must be >= 1")
        return list(range(seeds))
    if seed_list is None:
        return None
    try:
        out = [int(s) for s in seed_list.split(",")]
    except ValueError:
        raise RlftError(f"--seed-list={seed_list}: expected integers separated by commas, e.g. 0,5,9") from None
    if len(set(out)) != len(out):
        raise RlftError(f"--seed-list={seed_list}: a seed is repeated")
    return out


def run_name(point: Sequence[tuple[str, str]], seed: int) -> str:
    """`rl.algorithm=grpo,rl.kl.placement=loss,seed=1`, made filesystem-safe (module docstring)."""
    text = ",".join([*(f"{k}={v}" for k, v in point), f"seed={seed}"])
    name = _UNSAFE.sub("_", text)
    if name != text or len(name) > _MAX_NAME:
        name = f"{name[:_MAX_NAME - 9]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return name


def point_label(point: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items()) or "(no grid)"


def _override(key: str, text: str) -> str:
    return f"--config.{key}={text}"


def _command(spec: str, run_dir: str, overrides: Sequence[str]) -> str:
    """The shell line of one run: `rlft run` then the finished marker."""
    from rlft.config import format_override

    flags = [format_override(*o[len("--config."):].split("=", 1)) for o in overrides]
    return (f"rlft run {shlex.quote(spec)} --workdir {shlex.quote(run_dir)} {' '.join(flags)}".rstrip()
            + f" && touch {shlex.quote(os.path.join(run_dir, DONE))}")


def _checked(spec: str, overrides: Sequence[str], flag: str, checks: bool = True):
    """`rlft run`'s resolution of the overrides (parse, then with `checks` validate and the
    experiment's check); an RlftError names `flag`."""
    from rlft.cli.main import _resolved_experiment

    try:
        return _resolved_experiment(spec, overrides, checks)
    except RlftError as e:
        raise RlftError(f"{flag}: {e}") from None


def plan_sweep(opts: argparse.Namespace, fixed: Sequence[str]) -> dict:
    """The manifest: every run checked as `rlft run` checks it, before anything is written."""
    from rlft import config as config_lib

    path, _, preset = opts.target.partition(":")
    if opts.preset and preset and opts.preset != preset:
        raise RlftError(f"--preset {opts.preset}: the experiment names preset {preset!r}")
    preset = opts.preset or preset or "default"
    spec = f"{path}:{preset}"
    grid, seeds = parse_grid(opts.grid), parse_seeds(opts.seeds, opts.seed_list)
    fixed_keys = [key for key, _ in config_lib.parse_overrides(fixed)]
    for key, values in grid:
        if key in fixed_keys:
            raise RlftError(f"--grid {key}=...: also set by --config.{key}; give it in one place")
    if "seed" in fixed_keys and seeds is not None:
        raise RlftError("--config.seed: the seeds come from --seeds / --seed-list; give them in one place")
    config_lib.load_experiment(spec)  # a missing file or a broken module: its own error line
    module, _, base = _checked(spec, fixed, " ".join(fixed) or spec)
    for key, values in grid:  # alone, each value must parse; with one key it must also pass the checks
        for value in values:
            # with several keys the cross-field checks see the whole grid point (below): a=1 may need b=2
            _checked(spec, [*fixed, _override(key, value)], f"--grid {key}={','.join(values)} (value {value!r})",
                     checks=len(grid) == 1)
    if seeds is None:
        seeds = [base.get("seed")] if isinstance(base.get("seed"), int) else None
        if seeds is None:
            raise RlftError(f"{path}: its config has no integer `seed` field; a sweep sets --config.seed")
    for seed in seeds:
        _checked(spec, [*fixed, _override("seed", str(seed))], f"--seeds/--seed-list (seed {seed})")
    stem = os.path.splitext(os.path.basename(path))[0]
    workdir = opts.workdir or os.path.join("runs", f"sweep-{stem}" + ("" if preset == "default" else f"-{preset}"))
    if not workdir.strip():
        raise RlftError(f"--workdir={workdir!r}: must be a directory path")
    runs, names = [], set()
    for values in itertools.product(*(values for _, values in grid)):
        point = list(zip((key for key, _ in grid), values))
        for seed in seeds:
            overrides = [*fixed, *(_override(k, v) for k, v in point), _override("seed", str(seed))]
            name = run_name(point, seed)
            if len(grid) > 1 or len(seeds) > 1:
                _checked(spec, overrides, f"run {name}")
            assert name not in names, name
            names.add(name)
            run_dir = os.path.join(workdir, name)
            runs.append({"name": name, "workdir": run_dir, "point": dict(point), "seed": seed,
                         "overrides": overrides, "command": _command(spec, run_dir, overrides)})
    primary = opts.metric or getattr(module, "PRIMARY_METRIC", None)
    return {"experiment": os.path.abspath(path), "spec": spec, "preset": preset, "fixed": list(fixed),
            "grid": [[k, v] for k, v in grid], "seeds": seeds, "primary_metric": primary,
            "cwd": os.getcwd(), "workdir": workdir, "runs": runs}


def _write_manifest(workdir: str, manifest: dict) -> None:
    path = os.path.join(workdir, MANIFEST)
    if os.path.isfile(path):
        old = read_json(path)
        for field in ("experiment", "preset", "fixed"):
            if old.get(field) != manifest[field]:
                raise RlftError(f"{workdir} is a sweep with another {field} ({old.get(field)!r}, now "
                                f"{manifest[field]!r}); use a new --workdir")
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    write_json(path, manifest)


def is_finished(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, RUN_REPORT)) and os.path.isfile(os.path.join(run_dir, DONE))


# ---------------------------------------------------------------------------------------------
# Running


def _error_line(log_path: str, offset: int) -> str:
    """The run's `rlft: error:` line (its last), else its last non-empty line, from this invocation's log."""
    with open(log_path, errors="replace") as f:
        f.seek(offset)
        lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("rlft: error:")]
    return (errors or lines or ["(no output)"])[-1]


def _run_all(manifest: dict) -> int:
    """Run every unfinished run of the manifest in order; returns the sweep's exit status."""
    workdir, runs = manifest["workdir"], manifest["runs"]
    status_path = os.path.join(workdir, STATUS)
    status = read_json(status_path) if os.path.isfile(status_path) else {}
    current: dict[str, Any] = {"proc": None, "signal": None}

    def forward(signum, _frame):  # SIGTERM: the running run saves and exits 143; then the sweep stops
        current["signal"] = signum
        if current["proc"] is not None:
            current["proc"].send_signal(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, forward) if main_thread else None
    failed, stop = 0, 0
    try:
        for i, run in enumerate(runs):
            name, run_dir = run["name"], run["workdir"]
            where = f"rlft sweep: [{i + 1}/{len(runs)}] {name}"
            if is_finished(run_dir):
                print(f"{where}: finished before, skipped", file=sys.stderr)
                continue
            log_path = os.path.join(workdir, "logs", f"{name}.log")
            print(f"{where}: {'resuming' if os.path.isdir(run_dir) else 'running'} (log: {log_path})",
                  file=sys.stderr)
            argv = [sys.executable, "-m", "rlft", "run", manifest["spec"], "--workdir", run_dir, *run["overrides"]]
            clock = time.time()
            with open(log_path, "a") as log:
                offset = log.tell()
                log.write(f"$ {shlex.join(argv)}\n")
                log.flush()
                current["proc"] = proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                          stdin=subprocess.DEVNULL)
                try:
                    code = proc.wait()
                except KeyboardInterrupt:  # the run got the same SIGINT: let it save
                    code = proc.wait()
                    current["signal"] = signal.SIGINT
                finally:
                    current["proc"] = None
            entry = {"exit_status": code, "seconds": round(time.time() - clock, 1),
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            if code == 0:
                write_json(os.path.join(run_dir, DONE), entry)
                entry["status"] = "finished"
                print(f"{where}: finished in {entry['seconds']:.0f} s", file=sys.stderr)
            elif current["signal"] is not None or code in (130, 143):
                entry.update(status="interrupted", error=_error_line(log_path, offset))
                stop = code if code in (130, 143) else 128 + int(current["signal"] or signal.SIGTERM)
            else:
                failed += 1
                entry.update(status="failed", error=_error_line(log_path, offset))
                print(f"{where}: failed (exit status {code}): {entry['error']}", file=sys.stderr)
            status[name] = entry
            write_json(status_path, status)
            if stop:
                print(f"{where}: interrupted (exit status {code}); run the same sweep again to resume",
                      file=sys.stderr)
                break
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    report = write_sweep_report(workdir)
    print(f"rlft sweep: {_counts(report)} -> {os.path.join(workdir, 'report.md')}", file=sys.stderr)
    return stop or (1 if failed else 0)


# ---------------------------------------------------------------------------------------------
# Emitting


_SBATCH = """#!/usr/bin/env bash
# rlft sweep {workdir}: one SLURM array task per run not finished when this was written ({count} runs).
# Task I runs line I+1 of {commands}; then `rlft sweep {workdir} --report`.
#
# usage: sbatch {script}
# One process per run with this node's GPUs (edit the resources below; a run over several nodes:
# launch/slurm.sbatch). The sweep directory must be on a file system every node sees.
#SBATCH --job-name=rlft-sweep
#SBATCH --array=0-{last}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output={logs}/slurm-%A_%a.out
#SBATCH --signal=B:TERM@300
set -uo pipefail
# --signal above: SIGTERM to this shell 5 minutes before the time limit; forwarded to the run, which
# saves and exits 143. Submitting the script again resumes (a finished run only re-evaluates).
cd {cwd}
rlft() {{
  "${{PYTHON:-python}}" -m rlft "$@" &
  local pid=$! status=0
  trap 'kill -TERM "$pid" 2>/dev/null' TERM
  wait "$pid" || status=$?
  while kill -0 "$pid" 2>/dev/null; do status=0; wait "$pid" || status=$?; done  # a TERM cut the wait short
  trap - TERM
  return "$status"
}}
line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {commands})
if [ -z "$line" ]; then echo "rlft sweep: no command for task $SLURM_ARRAY_TASK_ID in {commands}" >&2; exit 2; fi
echo "+ $line" >&2
eval "$line"
"""


def _emit(manifest: dict, kind: str) -> int:
    workdir = manifest["workdir"]
    todo = [run for run in manifest["runs"] if not is_finished(run["workdir"])]
    commands = os.path.join(workdir, "commands.txt")
    write_text(commands, "".join(run["command"] + "\n" for run in todo))
    done = len(manifest["runs"]) - len(todo)
    skipped = f" ({done} finished runs left out)" if done else ""
    if kind == "commands":
        for run in todo:
            print(run["command"])
        print(f"rlft sweep: wrote {commands}: {len(todo)} runs{skipped}", file=sys.stderr)
        return 0
    script = os.path.join(workdir, "sweep.sbatch")
    if not todo:
        print(f"rlft sweep: every run of {workdir} is finished; no {script} written", file=sys.stderr)
        return 0
    q = shlex.quote
    write_text(script, _SBATCH.format(workdir=workdir, count=len(todo), last=len(todo) - 1, script=q(script),
                                      commands=q(os.path.abspath(commands)), cwd=q(manifest["cwd"]),
                                      logs=os.path.abspath(os.path.join(workdir, "logs"))))
    os.chmod(script, 0o755)
    print(f"rlft sweep: wrote {script} ({len(todo)} array tasks{skipped}): sbatch {script}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# The report


def _metrics(report: Any) -> dict[str, float]:
    """The numeric top-level fields of a run's report (booleans and `seed` left out)."""
    if not isinstance(report, dict):
        return {}
    return {k: float(v) for k, v in report.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seed"}


def _stats(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample std with ddof=1 or None with fewer than 2 values)."""
    import numpy as np

    if not values:
        return None, None
    array = np.asarray(values, np.float64)
    return float(array.mean()), (float(array.std(ddof=1)) if len(values) >= 2 else None)


def build_report(workdir: str, metric: str | None = None) -> dict:
    """report.json's content from the manifest, the runs' eval/report.json and sweep_status.json."""
    manifest = read_json(os.path.join(workdir, MANIFEST))
    status_path = os.path.join(workdir, STATUS)
    status = read_json(status_path) if os.path.isfile(status_path) else {}
    runs, points = [], {}
    for run in manifest["runs"]:
        run_dir, record = run["workdir"], status.get(run["name"], {})
        entry = {"name": run["name"], "point": run["point"], "seed": run["seed"], "workdir": run_dir}
        if is_finished(run_dir):
            try:
                entry.update(state="finished", metrics=_metrics(read_json(os.path.join(run_dir, RUN_REPORT))))
            except RlftError as e:
                entry.update(state="failed", error=f"{RUN_REPORT}: {e}")
        elif record.get("status") in ("failed", "interrupted"):
            entry.update(state=record["status"], error=record.get("error"), exit_status=record.get("exit_status"))
        else:
            entry.update(state="unfinished" if os.path.isdir(run_dir) else "not started")
        runs.append(entry)
        points.setdefault(point_label(run["point"]), {"point": run["point"], "runs": []})["runs"].append(entry)
    names = sorted({m for run in runs for m in run.get("metrics", {})})
    primary = metric or manifest.get("primary_metric") or (names[0] if names else None)
    rows = []
    for label, group in points.items():
        finished = [run for run in group["runs"] if run["state"] == "finished"]
        stats = {}
        for name in names:
            values = {str(run["seed"]): run["metrics"][name] for run in finished if name in run["metrics"]}
            mean, std = _stats(list(values.values()))
            stats[name] = {"mean": mean, "std": std, "n": len(values), "values": values}
        rows.append({"label": label, "point": group["point"], "n": len(finished),
                     "seeds": [run["seed"] for run in group["runs"]], "metrics": stats})
    order = {row["label"]: i for i, row in enumerate(rows)}
    key = lambda row: (row["metrics"].get(primary, {}).get("mean") is None,  # noqa: E731
                       -(row["metrics"].get(primary, {}).get("mean") or 0.0), order[row["label"]])
    rows.sort(key=key)
    counts = {state: sum(run["state"] == state for run in runs)
              for state in ("finished", "failed", "interrupted", "unfinished", "not started")}
    return {"experiment": manifest["experiment"], "preset": manifest["preset"], "grid": manifest["grid"],
            "seeds": manifest["seeds"], "fixed": manifest["fixed"], "primary_metric": primary,
            "metrics": names, "std": "sample standard deviation over seeds (ddof=1); null with fewer than 2",
            "counts": {k: v for k, v in counts.items() if v}, "points": rows,
            "not_finished": [{k: v for k, v in run.items() if k != "metrics"}
                             for run in runs if run["state"] != "finished"]}


def _counts(report: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in report["counts"].items()) or "no runs"


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _cell(stat: dict | None) -> str:
    if not stat or stat["mean"] is None:
        return "—"
    return _number(stat["mean"]) + ("" if stat["std"] is None else f" ± {_number(stat['std'])}")


def _markdown(report: dict, has_plot: bool) -> str:
    primary, names = report["primary_metric"], report["metrics"]
    columns = ([primary] if primary in names else []) + [m for m in names if m != primary]
    grid = " × ".join(f"{k} ∈ {{{', '.join(v)}}}" for k, v in report["grid"]) or "no grid"
    counts = _counts(report)
    lines = [f"# Sweep: {os.path.basename(report['experiment'])}:{report['preset']}", "",
             f"{grid}; seeds {report['seeds']}" + (f"; fixed: {' '.join(report['fixed'])}" if report["fixed"] else "")
             + f". Runs: {counts}.", "",
             f"Sorted by **{primary}** (mean over seeds, highest first). Cells: mean ± sample std over seeds "
             "(ddof=1; a single seed shows its value alone); n = finished seeds.", "",
             "| grid point | n | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for row in report["points"]:
        lines.append(f"| {row['label']} | {row['n']} | "
                     + " | ".join(_cell(row["metrics"].get(m)) for m in columns) + " |")
    if has_plot:
        lines += ["", f"![{primary} per grid point](report.png)"]
    lines += ["", "## Per-seed values", "", "| grid point | seed | " + " | ".join(columns) + " |",
              "|---|---|" + "---|" * len(columns)]
    for row in report["points"]:
        for seed in row["seeds"]:
            cells = [row["metrics"][m]["values"].get(str(seed)) for m in columns]
            if any(c is not None for c in cells):
                lines.append(f"| {row['label']} | {seed} | " + " | ".join(_number(c) for c in cells) + " |")
    lines += ["", "## Missing or failed runs", ""]
    if report["not_finished"]:
        lines += ["| run | state | error |", "|---|---|---|"]
        lines += [f"| {run['name']} | {run['state']} | {str(run.get('error') or '').replace('|', '/')} |"
                  for run in report["not_finished"]]
    else:
        lines.append("None: every run finished.")
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: str) -> bool:
    """A bar chart of the primary metric's mean with ± std error bars per grid point; False if no values."""
    primary = report["primary_metric"]
    rows = [row for row in report["points"] if row["metrics"].get(primary, {}).get("mean") is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt

    stats = [row["metrics"][primary] for row in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 4.2), dpi=110)
    ax.bar(range(len(rows)), [s["mean"] for s in stats], yerr=[s["std"] or 0.0 for s in stats],
           capsize=4, color="tab:blue", alpha=0.8)
    for i, s in enumerate(stats):
        ax.plot([i] * len(s["values"]), list(s["values"].values()), "k.", markersize=4)
    ax.set_xticks(range(len(rows)), [row["label"].replace(",", "\n") for row in rows], fontsize=7)
    ax.set_ylabel(primary)
    ax.set_title(f"{primary}: mean ± std over seeds (dots: seeds)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_sweep_report(workdir: str, metric: str | None = None) -> dict:
    """Write WORKDIR/report.json, report.md and report.png; returns the report."""
    if not os.path.isfile(os.path.join(workdir, MANIFEST)):
        raise RlftError(f"{workdir}: no {MANIFEST}; not a directory made by `rlft sweep`")
    report = build_report(workdir, metric)
    if metric and metric not in report["metrics"] and report["metrics"]:
        raise RlftError(f"--metric {metric}: not a metric of the runs' reports (they have: "
                        f"{', '.join(report['metrics'])})")
    png = os.path.join(workdir, "report.png")
    has_plot = _plot(report, png)
    if not has_plot and os.path.exists(png):
        os.remove(png)  # a plot of an earlier report would no longer match it
    write_json(os.path.join(workdir, "report.json"), report)
    write_text(os.path.join(workdir, "report.md"), _markdown(report, has_plot))
    return report


# ---------------------------------------------------------------------------------------------


def sweep_command(args: Sequence[str]) -> int:
    """Run `rlft sweep` with the arguments after `sweep`; returns the exit status."""
    from rlft import config as config_lib

    opts, rest = _parser().parse_known_args(list(args))
    if opts.report:
        given = [flag for flag, value in (("--grid", opts.grid), ("--seeds", opts.seeds), ("--seed-list", opts.seed_list),
                                          ("--preset", opts.preset), ("--workdir", opts.workdir),
                                          ("--emit", opts.emit), ("--config.*", rest)) if value]
        if given:
            raise RlftError(f"--report reads an existing sweep directory; {', '.join(given)} do not apply")
        report = write_sweep_report(opts.target, opts.metric)
        print(f"rlft sweep: {_counts(report)} -> {os.path.join(opts.target, 'report.md')}", file=sys.stderr)
        return 0
    if os.path.isdir(opts.target):
        raise RlftError(f"{opts.target} is a directory: give an EXPERIMENT.py to sweep, or --report for a "
                        f"sweep directory's report")
    fixed = [_override(key, value) for key, value in config_lib.parse_overrides(rest)]
    manifest = plan_sweep(opts, fixed)
    _write_manifest(manifest["workdir"], manifest)
    if opts.emit:
        return _emit(manifest, opts.emit)
    return _run_all(manifest)
