"""The `rlft` command: run an experiment, export a checkpoint, sample from a model.

    rlft run EXPERIMENT.py[:PRESET] [--config.a.b=VALUE ...] [--workdir DIR]
    rlft run EXPERIMENT.py[:PRESET] [--config.a.b=VALUE ...] --print-config
    rlft eval RUN_DIR
    rlft export CHECKPOINT --out HF_DIR
    rlft sample CHECKPOINT --prompt TEXT [...]

User mistakes (bad flags, unknown fields, missing files, malformed data) end with one line
`rlft: error: ...` and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from rlft.errors import RlftError
from rlft.host import tune_host_malloc


def _default_workdir(spec: str, preset: str) -> str:
    stem = os.path.splitext(os.path.basename(spec.partition(":")[0]))[0]
    return os.path.join("runs", stem if preset == "default" else f"{stem}-{preset}")


def _resolved_experiment(spec: str, overrides: Sequence[str]):
    """(module, preset, config): the experiment's preset config with the overrides applied, locked."""
    from rlft import config as config_lib

    module, preset, config = config_lib.load_experiment(spec)
    for field, value in config_lib.parse_overrides(overrides):
        config_lib.apply_override(config, field, value)
    config.lock()
    return module, preset, config


def print_config_command(spec: str, overrides: Sequence[str]) -> None:
    """Print the resolved config, one `--config.a.b=VALUE` line per leaf field, sorted; runs nothing.

    The values are those `rlft run` would write to run_config.json; no work directory is created.
    """
    from rlft import config as config_lib

    _, _, config = _resolved_experiment(spec, overrides)
    for field, value in config_lib.flat_fields(config):
        print(config_lib.format_override(field, value))


def run_command(spec: str, overrides: Sequence[str], workdir: str | None, argv: Sequence[str]) -> dict:
    """Load an experiment, apply overrides, record the run metadata, and run it."""
    from rlft import config as config_lib

    module, preset, config = _resolved_experiment(spec, overrides)
    workdir = workdir or _default_workdir(spec, preset)
    config_lib.write_run_metadata(workdir, config, argv, spec.partition(":")[0], preset)
    print(f"rlft: running {spec} in {workdir}", file=sys.stderr)
    return module.run(config, workdir) or {}


def eval_command(run_dir: str) -> dict:
    """Evaluate a finished or partly finished run with its experiment's `evaluate(config, run_dir)`."""
    from rlft import config as config_lib

    module, config = config_lib.load_run_experiment(run_dir)
    if not callable(getattr(module, "evaluate", None)):
        raise RlftError(f"{run_dir}: its experiment ({module.__file__}) defines no evaluate(config, run_dir)")
    return module.evaluate(config, run_dir) or {}


def export_command(checkpoint: str, out: str) -> None:
    """Write a Hugging Face checkpoint directory from anything `rlft.load` takes."""
    import rlft
    from rlft.models.hf import save_hf_checkpoint

    model = rlft.load(checkpoint)
    if model.kind != "lm":
        raise RlftError(f"{checkpoint}: only language models export to Hugging Face format")
    save_hf_checkpoint(model.config, model.params, out, model.tokenizer)
    print(f"rlft: wrote {out}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlft", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run all stages of an experiment")
    run.add_argument("experiment", help="experiments/NAME.py[:PRESET]")
    run.add_argument("--workdir", help="run directory (default: runs/NAME[-PRESET])")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved config as --config.FIELD=VALUE lines and exit without running")
    evaluate = sub.add_parser("eval", help="evaluate a run's policies; writes RUN_DIR/eval/")
    evaluate.add_argument("run_dir", help="a directory made by `rlft run` (finished or not)")
    export = sub.add_parser("export", help="export a checkpoint in Hugging Face format")
    export.add_argument("checkpoint", help="an HF checkpoint dir or an rlft run/checkpoint dir")
    export.add_argument("--out", required=True, help="output directory")
    sub.add_parser("sample", help="sample completions from a checkpoint", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rlft` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    tune_host_malloc()  # before JAX starts its thread pools; RLFT_MALLOC=default opts out
    parser = build_parser()
    try:
        if argv and argv[0] == "sample":
            from rlft.cli_sample import sample_command

            return sample_command(argv[1:])
        args, rest = parser.parse_known_args(argv)
        if args.command == "run" and args.print_config:
            print_config_command(args.experiment, rest)
        elif args.command == "run":
            result = run_command(args.experiment, rest, args.workdir, ["rlft", *argv])
            print(json.dumps(result, indent=2, default=str))
        elif rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        elif args.command == "eval":
            report = eval_command(args.run_dir)
            print(json.dumps({k: v for k, v in report.items() if not isinstance(v, list)}, indent=2, default=str))
        elif args.command == "export":
            export_command(args.checkpoint, args.out)
    except RlftError as e:
        print(f"rlft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlft: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
