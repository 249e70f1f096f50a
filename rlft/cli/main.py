"""The `rlft` command: run an experiment, export a checkpoint, sample from a model.

    rlft run EXPERIMENT.py[:PRESET] [--config.a.b=VALUE ...] [--workdir DIR] [--override]
    rlft run EXPERIMENT.py[:PRESET] [--config.a.b=VALUE ...] --print-config
    rlft eval RUN_DIR
    rlft export CHECKPOINT --out HF_DIR [--overwrite]
    rlft sample CHECKPOINT --prompt TEXT [...]
    rlft plan --model NAME [--devices N] [--mesh fsdp=N ...] [--step sft|rl|ppo] [...]
    rlft sweep EXPERIMENT.py[:PRESET] --grid a.b=X,Y [--seeds N] [--workdir DIR] [--emit commands|slurm]

User mistakes (bad flags, unknown fields, missing files, malformed data) end with one line
`rlft: error: ...` and exit status 2, never a traceback. Ctrl-C saves and exits 130; SIGTERM finishes
the current step, saves it and exits 143 (`rlft.train.loop.train`).
"""

from __future__ import annotations

import argparse
import errno
import inspect
import json
import os
import signal
import sys
import threading
from typing import Sequence

from rlft.errors import Preempted, RlftError
from rlft.host import tune_host_malloc
from rlft.cli.plan import add_plan_parser, plan_command, request_host_devices


def _default_workdir(spec: str, preset: str) -> str:
    stem = os.path.splitext(os.path.basename(spec.partition(":")[0]))[0]
    return os.path.join("runs", stem if preset == "default" else f"{stem}-{preset}")


def _resolved_experiment(spec: str, overrides: Sequence[str], checks: bool = True):
    """(module, preset, config): the experiment's preset config with the overrides applied, locked,
    and checked: every field's range (`rlft.cli.validate`), then what only the experiment knows (its
    optional `check(config)`, e.g. that prompts fit the model). Runs before anything is written,
    so a refused command leaves no run directory behind and its corrected form is a new run.
    checks=False: only that the overrides name known fields with values of their types."""
    from rlft import config as config_lib
    from rlft.cli.validate import validate_config

    module, preset, config = config_lib.load_experiment(spec)
    for field, value in config_lib.parse_overrides(overrides):
        config_lib.apply_override(config, field, value)
    config.lock()
    if checks:
        validate_config(config)
        if callable(getattr(module, "check", None)):
            module.check(config)
    return module, preset, config


def print_config_command(spec: str, overrides: Sequence[str]) -> None:
    """Print the resolved config, one `--config.a.b=VALUE` line per leaf field, sorted; runs nothing.

    The values are those `rlft run` would write to run_config.json, checked as `rlft run` checks
    them (a value it would refuse is refused here too); no work directory is created.
    """
    from rlft import config as config_lib

    _, _, config = _resolved_experiment(spec, overrides)
    for field, value in config_lib.flat_fields(config):
        print(config_lib.format_override(field, value))


def run_command(spec: str, overrides: Sequence[str], workdir: str | None, argv: Sequence[str],
                override: bool = False) -> dict:
    """Load an experiment, apply overrides, record the run metadata, and run it.

    An existing WORKDIR keeps the config it was made with: a different one is refused before any
    work, unless `override` and every change is safe on resume (`rlft.config.config_changes`).
    WORKDIR is locked for the whole run (`rlft.cli.run_lock`): a second `rlft run` there is refused
    before it reads or writes anything in it.
    """
    from rlft import config as config_lib
    from rlft.files import naming
    from rlft.cli.run_lock import lock_run_dir

    if workdir is not None and not workdir.strip():
        raise RlftError(f"--workdir={workdir!r}: must be a directory path (omit it for runs/NAME[-PRESET])")
    module, preset, config = _resolved_experiment(spec, overrides)  # checked before anything is written
    workdir = workdir or _default_workdir(spec, preset)
    with lock_run_dir(workdir, argv):  # before run_config.json is checked or written; held until the end
        try:
            config_lib.write_run_metadata(workdir, config, argv, spec.partition(":")[0], preset, override,
                                          defaults=module.get_config(preset))
        except OSError as e:  # e.g. a full disk when an appended line is flushed: name the directory
            if (named := naming(e, workdir)) is not e:
                raise named from e
            raise
        print(f"rlft: running {spec} in {workdir}", file=sys.stderr)
        return module.run(config, workdir) or {}


def eval_command(run_dir: str) -> dict:
    """Evaluate a finished or partly finished run with its experiment's `evaluate(config, run_dir)`."""
    from rlft import config as config_lib

    module, config = config_lib.load_run_experiment(run_dir)
    evaluate = getattr(module, "evaluate", None)
    try:
        inspect.signature(evaluate).bind(config, run_dir)
    except (TypeError, ValueError):  # not a function, or not evaluate(config, workdir)
        raise RlftError(f"{run_dir}: its experiment ({module.__file__}) defines no evaluate(config, workdir) "
                        f"(the experiment contract: rlft.config)") from None
    return evaluate(config, run_dir) or {}


def export_command(checkpoint: str, out: str, overwrite: bool = False, adapters_only: bool = False) -> None:
    """Write a Hugging Face checkpoint directory from anything `rlft.load` takes.

    A non-empty OUT is refused unless `overwrite`; then it is replaced as a whole (no file of an
    earlier export survives). OUT may not hold the checkpoint being exported. A LoRA stage exports
    merged, or with `adapters_only` as a PEFT adapter directory.
    """
    import rlft
    from rlft.models.hf import check_export_dir, save_hf_checkpoint

    check_export_dir(out, overwrite, "--overwrite")  # before the (slow) load
    source, target = os.path.realpath(checkpoint), os.path.realpath(out)
    if overwrite and (source == target or source.startswith(target + os.sep)):
        raise RlftError(f"--out {out}: holds the checkpoint being exported ({checkpoint}); choose another directory")
    if adapters_only:
        return _export_adapters(checkpoint, out, overwrite)
    model = rlft.load(checkpoint)
    if model.kind != "lm":
        raise RlftError(f"{checkpoint}: only language models export to Hugging Face format")
    save_hf_checkpoint(model.config, model.params, out, model.tokenizer, overwrite=overwrite)
    print(f"rlft: wrote {out}", file=sys.stderr)


def _export_adapters(checkpoint: str, out: str, overwrite: bool) -> None:
    """`rlft export --adapters-only`: a LoRA stage's adapters as a PEFT adapter directory."""
    from rlft.train.warm_start import run_dir_of
    from rlft.train.checkpoints import load_model_config, load_params
    from rlft.models.hf import save_peft_adapters
    from rlft.models.lora import read_lora_record

    run_dir = run_dir_of(checkpoint)
    stage = None if run_dir is None else os.path.relpath(os.path.abspath(checkpoint), run_dir).split(os.sep)[0]
    record = None if stage in (None, ".") else read_lora_record(os.path.join(run_dir, stage))
    if record is None:
        raise RlftError(f"{checkpoint}: --adapters-only needs a LoRA stage (STAGE/lora.json); this is not one")
    lora, base = record
    values, _ = load_params(checkpoint)
    save_peft_adapters(load_model_config(run_dir), values, lora, out, base=base, overwrite=overwrite)
    print(f"rlft: wrote {out} (LoRA adapters, PEFT format)", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlft", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run all stages of an experiment")
    run.add_argument("experiment", help="experiments/NAME.py[:PRESET]")
    run.add_argument("--workdir", help="run directory (default: runs/NAME[-PRESET])")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved config as --config.FIELD=VALUE lines and exit without running")
    run.add_argument("--override", action="store_true",
                     help="run an existing --workdir with changed fields that are safe on resume (more steps, "
                          "save_every, keep, eval.*); recorded in WORKDIR/config_changes.jsonl")
    group = run.add_argument_group("multi-process (launch/README.md)")
    group.add_argument("--coordinator", help="HOST:PORT of process 0 (with --num-processes and --process-id; "
                                             "or RLFT_COORDINATOR, RLFT_NUM_PROCESSES, RLFT_PROCESS_ID)")
    group.add_argument("--num-processes", type=int, help="how many processes the run has")
    group.add_argument("--process-id", type=int, help="this process's index, 0 .. N-1")
    group.add_argument("--distributed", action="store_true",
                       help="let JAX detect the cluster (SLURM, TPU pod, Open MPI; or RLFT_DISTRIBUTED=detect); "
                            "a SLURM step with several tasks is detected without it")
    evaluate = sub.add_parser("eval", help="evaluate a run's policies; writes RUN_DIR/eval/")
    evaluate.add_argument("run_dir", help="a directory made by `rlft run` (finished or not)")
    export = sub.add_parser("export", help="export a checkpoint in Hugging Face format")
    export.add_argument("checkpoint", help="an HF checkpoint dir or an rlft run/checkpoint dir")
    export.add_argument("--out", required=True, help="output directory (absent or empty)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out as a whole (no file of an earlier export survives)")
    export.add_argument("--adapters-only", action="store_true",
                        help="a LoRA stage's adapters alone, as a PEFT adapter directory (Llama/Qwen2); "
                             "default: the merged model")
    sub.add_parser("sample", help="sample completions from a checkpoint", add_help=False)
    sub.add_parser("sweep", help="an ablation grid x seeds of an experiment, with a mean ± std report "
                                 "(rlft/cli/sweep.py)", add_help=False)
    add_plan_parser(sub)
    return parser


# File-system errors reported as one line naming the path and what to do, instead of a traceback.
FS_ERRORS = {
    errno.ENOSPC: "free space or choose another {where}",
    errno.EDQUOT: "free space within the quota or choose another {where}",
    errno.EFBIG: "the file-size limit (ulimit -f) was reached: raise it or choose another {where}",
    errno.EROFS: "choose a writable {where}",
    errno.EACCES: "check its permissions or choose another {where}",
    errno.EPERM: "check its permissions or choose another {where}",
    errno.ENOTDIR: "a component of the path is a file, not a directory: choose another {where}",
    errno.EEXIST: "a file is in the way: remove it or choose another {where}",
    errno.EISDIR: "a directory is in the way: remove it or choose another {where}",
    errno.ENAMETOOLONG: "choose a shorter {where}",
}


def fs_error_line(error: OSError, command: str | None) -> str:
    """`PATH: No space left on device (free space or choose another --workdir)` for an FS_ERRORS error."""
    where = {"run": "--workdir", "export": "--out"}.get(command or "", "path")
    reason = error.strerror or os.strerror(error.errno)
    path = f"{error.filename}: " if error.filename is not None else ""
    return f"{path}{reason} ({FS_ERRORS[error.errno].format(where=where)})"


def _ignore_sigxfsz() -> None:
    """A write past the file-size limit (RLIMIT_FSIZE) fails with EFBIG, reported as one line,
    instead of SIGXFSZ killing the process mid-write."""
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rlft` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    tune_host_malloc()  # before JAX starts its thread pools; RLFT_MALLOC=default opts out
    _ignore_sigxfsz()
    args = None
    parser = build_parser()
    try:
        if argv and argv[0] == "sample":
            from rlft.cli.sample import sample_command

            return sample_command(argv[1:])
        if argv and argv[0] == "sweep":
            from rlft.cli.sweep import sweep_command

            return sweep_command(argv[1:])
        args, rest = parser.parse_known_args(argv)
        if args.command == "run" and args.print_config:
            print_config_command(args.experiment, rest)
        elif args.command == "run":
            from rlft.parallel import distributed

            distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.distributed)
            result = run_command(args.experiment, rest, args.workdir, ["rlft", *argv], args.override)
            if distributed.is_primary():
                print(json.dumps(result, indent=2, default=str))
        elif rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        elif args.command == "eval":
            report = eval_command(args.run_dir)
            print(json.dumps({k: v for k, v in report.items() if not isinstance(v, list)}, indent=2, default=str))
        elif args.command == "export":
            export_command(args.checkpoint, args.out, args.overwrite, args.adapters_only)
        elif args.command == "plan":
            request_host_devices(args.devices)  # before anything starts JAX
            plan_command(args)
    except RlftError as e:
        print(f"rlft: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in FS_ERRORS:
            raise
        print(f"rlft: error: {fs_error_line(e, getattr(args, 'command', None))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlft: interrupted", file=sys.stderr)
        return 130
    except Preempted as e:  # SIGTERM: the stage saved its last completed step
        print(f"rlft: {e}", file=sys.stderr)
        return 143  # 128 + SIGTERM, what a shell reports for a process the signal killed
    return 0


if __name__ == "__main__":
    sys.exit(main())
