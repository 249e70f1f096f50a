"""Experiments as data: load `experiments/NAME.py[:PRESET]`, apply `--config.a.b=VALUE` overrides.

An experiment module defines `get_config(preset: str) -> ml_collections.ConfigDict` and
`run(config, workdir) -> dict`. Overrides are type-checked against the preset's values; unknown
fields are refused with the nearest valid names.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from types import ModuleType
from typing import Any, Sequence

import ml_collections

from rlft.errors import RlftError

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


EXPERIMENT_FILE = "experiment.json"


def load_run_experiment(run_dir: str) -> tuple[ModuleType, ml_collections.ConfigDict]:
    """(module, config) of the experiment that made `run_dir`, with the config it ran with."""
    meta_path, config_path = os.path.join(run_dir, EXPERIMENT_FILE), os.path.join(run_dir, "run_config.json")
    if not os.path.isdir(run_dir):
        raise RlftError(f"no such run directory: {run_dir}")
    for path in (meta_path, config_path):
        if not os.path.isfile(path):
            raise RlftError(f"{run_dir}: no {os.path.basename(path)}; not a directory made by `rlft run`")
    try:
        meta, values = json.load(open(meta_path)), json.load(open(config_path))
    except json.JSONDecodeError as e:
        raise RlftError(f"{run_dir}: malformed {EXPERIMENT_FILE} or run_config.json ({e})") from None
    module, _, _ = load_experiment(f"{meta['path']}:{meta.get('preset', 'default')}")
    return module, ml_collections.ConfigDict(values)


def load_experiment(spec: str) -> tuple[ModuleType, str, ml_collections.ConfigDict]:
    """(module, preset, config) for "path/to/experiment.py[:PRESET]" (preset defaults to "default")."""
    path, _, preset = spec.partition(":")
    preset = preset or "default"
    if not os.path.isfile(path):
        raise RlftError(f"experiment file not found: {path}")
    name = "rlft_experiment_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    for attr in ("get_config", "run"):
        if not callable(getattr(module, attr, None)):
            raise RlftError(f"{path}: an experiment module must define {attr}()")
    config = module.get_config(preset)
    if not isinstance(config, ml_collections.ConfigDict):
        raise RlftError(f"{path}: get_config({preset!r}) must return an ml_collections.ConfigDict")
    return module, preset, config


def _parse_value(text: str, current: Any, field: str) -> Any:
    """Parse `text` as the type of the field's current value."""
    if isinstance(current, ml_collections.ConfigDict):
        raise RlftError(f"--config.{field} is a section; set one of its fields: "
                        f"{', '.join(sorted(current.keys()))}")
    if isinstance(current, bool):
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
    elif isinstance(current, str):
        return text
    elif isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            pass
    elif isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            pass
    else:  # None, tuple, list: a Python literal (or a bare string when the field is None)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if current is None or isinstance(value, type(current)):
            return value
        if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
            return type(current)(value)
    raise RlftError(f"--config.{field}={text!r}: expected {type(current).__name__} "
                    f"(current value {current!r})")


def _unknown_field(config: ml_collections.ConfigDict, field: str, parts: Sequence[str], i: int) -> RlftError:
    section = ".".join(parts[:i])
    keys = sorted(config.keys())
    near = difflib.get_close_matches(parts[i], keys, n=3, cutoff=0.5)
    where = f" in section '{section}'" if section else ""
    hint = f"; did you mean {', '.join(repr('.'.join([*parts[:i], k])) for k in near)}?" if near else ""
    return RlftError(f"unknown config field '{field}'{where}{hint} (valid: {', '.join(keys)})")


def apply_override(config: ml_collections.ConfigDict, field: str, text: str) -> None:
    """Set `config.<field>` from the string `text`, checking the field exists and the type fits."""
    parts = field.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(child, ml_collections.ConfigDict):
            raise _unknown_field(node, field, parts, i)
        node = child
    if parts[-1] not in node:
        raise _unknown_field(node, field, parts, len(parts) - 1)
    value = _parse_value(text, node[parts[-1]], field)
    try:
        node[parts[-1]] = value
    except TypeError as e:
        raise RlftError(f"--config.{field}={text!r}: {e}") from None


def parse_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    """[("a.b", "VALUE"), ...] from ["--config.a.b=VALUE", "--config.c", "VALUE", ...]."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise RlftError(f"unrecognised argument {arg!r}; overrides look like --config.FIELD=VALUE")
        key, eq, value = arg[len("--config."):].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise RlftError(f"{arg}: missing value")
            value, i = args[i + 1], i + 1
        pairs.append((key, value))
        i += 1
    return pairs


def flat_fields(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
    """[("a.b", value), ...]: every leaf field of `config` (nested sections walked recursively).

    Sorted by the dotted path compared section by section, so each section's fields stay together.
    A leaf is any value that is not a ConfigDict (None, tuples and lists included); an empty
    section has no leaves and does not appear. These are exactly the fields `--config.a.b=VALUE`
    can set.
    """
    def walk(node: ml_collections.ConfigDict, prefix: tuple[str, ...]):
        for key, value in node.items():
            path = (*prefix, str(key))
            if isinstance(value, ml_collections.ConfigDict):
                yield from walk(value, path)
            else:
                yield path, value

    return [(".".join(path), value) for path, value in sorted(walk(config, ()), key=lambda item: item[0])]


def format_override(field: str, value: Any) -> str:
    """"--config.FIELD=VALUE" that `parse_overrides` + `apply_override` turn back into `value`.

    Strings are written as they are, bools as true/false, everything else as its Python repr
    (None, numbers, tuples); the value is shell-quoted where needed, e.g.
    --config.mesh.shape='(-1, 1, 1)', so a printed line can be pasted into a bash command. A value
    with a newline or another control character is written in bash's $'...' form, so the result
    is always one line.
    """
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = repr(value)
    return f"--config.{field}={_shell_quote(text)}"


_ANSI_C_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _ansi_c_code(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _shell_quote(text: str) -> str:
    """`text` as one bash word on one line: bare when safe, else '...', "..." or $'...' (control chars)."""
    if not text.isprintable():
        return "$'" + "".join(_ANSI_C_ESCAPES.get(c) or (c if c.isprintable() else _ansi_c_code(c))
                              for c in text) + "'"
    if "'" in text and not any(c in text for c in '"\\$`!'):
        return f'"{text}"'
    return shlex.quote(text)


def git_commit(path: str) -> str:
    """The git commit (with "+dirty" when modified) of the repo containing `path`, or "unknown"."""
    cwd = os.path.dirname(os.path.abspath(path))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def write_run_metadata(workdir: str, config: ml_collections.ConfigDict, argv: Sequence[str],
                       experiment_path: str, preset: str = "default") -> None:
    """Write run_config.json (resolved; not config.json, which means a Hugging Face checkpoint),
    experiment.json (the module and preset, for `rlft eval`), command.txt and git.txt into the work
    directory."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "run_config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    with open(os.path.join(workdir, "command.txt"), "w") as f:
        f.write(" ".join(argv) + "\n")
    with open(os.path.join(workdir, EXPERIMENT_FILE), "w") as f:
        json.dump({"path": os.path.abspath(experiment_path), "preset": preset}, f)
    with open(os.path.join(workdir, "git.txt"), "w") as f:
        f.write(json.dumps({"experiment": git_commit(experiment_path), "rlft": git_commit(__file__)}) + "\n")
