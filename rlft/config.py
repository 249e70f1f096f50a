"""Experiments as data: load `experiments/NAME.py[:PRESET]`, apply `--config.a.b=VALUE` overrides.

An experiment module defines `get_config(preset: str) -> ml_collections.ConfigDict`,
`run(config, workdir) -> dict` and `evaluate(config, workdir) -> dict` (what `rlft eval WORKDIR`
calls, on a finished or running run; it writes only under WORKDIR/eval/), and may define
`check(config) -> None`, which raises RlftError for what only the experiment can check; `rlft run`
and `--print-config` call it before anything is written. Overrides are parsed to each field's
declared type (a None field declares its type with `ml_collections.config_dict.placeholder(T)`);
unknown fields are refused with the nearest valid names.
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
import time
from types import ModuleType
from typing import Any, Sequence

import ml_collections

from rlft.errors import RlftError
from rlft.files import read_json, write_text

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
    meta, values = read_json(meta_path), read_json(config_path)
    if not isinstance(meta.get("path"), str) or not isinstance(meta.get("preset", "default"), str):
        raise RlftError(f"{meta_path}: expected {{\"path\": EXPERIMENT_FILE, \"preset\": PRESET}}; "
                        f"the file is damaged")
    module, _, defaults = load_experiment(f"{meta['path']}:{meta.get('preset', 'default')}")
    return module, ml_collections.ConfigDict(with_new_defaults(values, defaults))


def _as_json(config: ml_collections.ConfigDict) -> dict:
    """The config as run_config.json holds it (tuples as lists)."""
    return json.loads(config.to_json_best_effort())


def with_new_defaults(recorded: dict, defaults: ml_collections.ConfigDict) -> dict:
    """A recorded run config with the fields it lacks taken from the experiment's preset `defaults`.

    A run made before a field existed ran with the behaviour its default keeps (rlft adds fields
    that way), so `rlft eval` and a resume read the default where the record is silent.
    """
    def overlay(base: Any, values: Any) -> Any:
        if not (isinstance(base, dict) and isinstance(values, dict)):
            return values
        return {**base, **{k: overlay(base.get(k), v) for k, v in values.items()}}

    return overlay(_as_json(defaults), recorded)


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


_NONE = {"none", "null"}


def declared_type(node: ml_collections.ConfigDict, key: str) -> type:
    """The type a field holds: its value's type, or for a None field the type it was declared with
    (`ml_collections.config_dict.placeholder(T)`); NoneType for an undeclared None."""
    return node.get_type(key)


def _parse_value(text: str, node: ml_collections.ConfigDict, key: str, field: str) -> Any:
    """Parse `text` as the declared type of `node[key]` (a None field: as its placeholder's type).

    A None field declared with `placeholder(T)` parses like a field holding a T
    (`--config.rl.clip=false` is False) or takes "None" (and for non-strings "none"/"null") as None.
    """
    current, kind = node[key], declared_type(node, key)
    if isinstance(current, ml_collections.ConfigDict):
        raise RlftError(f"--config.{field} is a section; set one of its fields: "
                        f"{', '.join(sorted(current.keys()))}")
    nullable = current is None
    if kind is type(None):
        raise RlftError(f"--config.{field}: the experiment declares this field as None without a type; "
                        f"declare it with ml_collections.config_dict.placeholder(TYPE)")
    if nullable and (text == "None" or kind is not str and text.lower() in _NONE):
        return None  # "None" as --print-config writes it; a string field keeps "none" as text
    if kind is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
    elif kind is str:
        return text
    elif kind is int:
        try:
            return int(text)
        except ValueError:
            pass
    elif kind is float:
        try:
            return float(text)
        except ValueError:
            pass
    else:  # tuple, list: a Python literal
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(value, kind):
            return value
        if issubclass(kind, (tuple, list)) and isinstance(value, (tuple, list)):
            return kind(value)
    expected = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, kind.__name__)
    unset = " or none (the default)" if nullable and kind is not str else ""
    raise RlftError(f"--config.{field}={text!r}: expected {expected}{unset} "
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
    if isinstance(node[parts[-1]], ml_collections.ConfigDict) and "name" in node[parts[-1]]:
        node, parts, field = node[parts[-1]], [*parts, "name"], f"{field}.name"  # --config.model=NAME
    value = _parse_value(text, node, parts[-1], field)
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


# ---------------------------------------------------------------------------------------------
# The run directory contract: WORKDIR/run_config.json is written once; running WORKDIR again with
# another config is refused, or with --override recorded, and only for changes safe on resume.

RUN_CONFIG_FILE = "run_config.json"
CONFIG_CHANGES_FILE = "config_changes.jsonl"

# What `rlft run --override` may change in an existing run directory, by leaf name, or by a section
# name anywhere on the field's path. Everything else (learning rates, seeds, data, tokenizer, model
# shape, init_from, ...) is fixed when the run starts: a run dir holds one configuration.
SAFE_ON_RESUME: dict[str, str] = {
    "steps": "only upwards: training continues to the new total (its LR schedule stretches to it)",
    "save_every": "checkpoint cadence",
    "keep": "how many checkpoints are kept",
    "eval.*": "any field of an `eval` section, at any depth: evaluation reads it, training never does",
    "model.remat": "rematerialisation policy: the same parameters and values, another memory/compute trade",
}
_SAFE_SUMMARY = f"{', '.join(SAFE_ON_RESUME)}; steps only upwards"


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()  # the value of a field one of two configs lacks


def changed_fields(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """[(dotted field, old value, new value)] where two nested JSON-like dicts differ, sorted.

    A field only one of them has is ABSENT in the other.
    """
    before, after = (dict(flat_fields(ml_collections.ConfigDict(d))) for d in (old, new))
    fields = sorted(before.keys() | after.keys())
    return [(f, before.get(f, ABSENT), after.get(f, ABSENT)) for f in fields
            if before.get(f, ABSENT) != after.get(f, ABSENT)]


def format_changes(changes: Sequence[tuple[str, Any, Any]]) -> str:
    """"lr 0.001 -> 0.0001, seed 0 -> 1": the changes of `changed_fields` on one line."""
    return ", ".join(f"{field} {old!r} -> {new!r}" for field, old, new in changes)


def safe_on_resume(field: str, old: Any, new: Any) -> bool:
    """True if `field` may change from `old` to `new` in an existing run dir (`SAFE_ON_RESUME`)."""
    *sections, leaf = field.split(".")
    if "eval" in sections:
        return True
    if old is ABSENT or new is ABSENT:
        return False
    if leaf == "steps":
        return all(isinstance(v, int) and not isinstance(v, bool) for v in (old, new)) and new >= old
    return leaf in ("save_every", "keep") or field == "model.remat"


def config_changes(workdir: str, config: ml_collections.ConfigDict, experiment_path: str,
                   override: bool = False, defaults: ml_collections.ConfigDict | None = None
                   ) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(changes, new fields) of `config` against WORKDIR/run_config.json (both [] for a new run dir).

    New fields are those the record lacks and `config` holds at the experiment's preset `defaults`
    (fields added to rlft or the experiment after the run started): accepted without --override.
    Raises RlftError listing the differing fields unless `override` and every one is safe on
    resume (`safe_on_resume`); with `override`, the unsafe ones are named. Another experiment file
    than the one recorded in experiment.json counts as the (unsafe) field `experiment`.
    """
    path = os.path.join(workdir, RUN_CONFIG_FILE)
    if not os.path.exists(path):
        return [], []
    recorded, new = read_json(path), _as_json(config)
    changes = changed_fields(recorded, new)
    default_of = {} if defaults is None else dict(flat_fields(ml_collections.ConfigDict(_as_json(defaults))))
    added = [(field, old, value) for field, old, value in changes
             if old is ABSENT and default_of.get(field, ABSENT) == value]
    changes = [change for change in changes if change not in added]
    if os.path.isfile(os.path.join(workdir, EXPERIMENT_FILE)):
        was = os.path.basename(str(read_json(os.path.join(workdir, EXPERIMENT_FILE)).get("path")))
        if was != os.path.basename(experiment_path):
            changes.insert(0, ("experiment", was, os.path.basename(experiment_path)))
    safe = _SAFE_SUMMARY
    if changes and not override:
        raise RlftError(f"{workdir} was run with another config: {format_changes(changes)}. Run it with "
                        f"its own config ({path}), use a new --workdir, or pass --override to change "
                        f"fields that are safe on resume ({safe})")
    unsafe = [change for change in changes if not safe_on_resume(*change)]
    if unsafe:
        raise RlftError(f"{workdir}: --override cannot change {format_changes(unsafe)}: not safe on resume "
                        f"(safe: {safe}); use a new --workdir")
    return changes, added


def write_run_metadata(workdir: str, config: ml_collections.ConfigDict, argv: Sequence[str],
                       experiment_path: str, preset: str = "default", override: bool = False,
                       defaults: ml_collections.ConfigDict | None = None) -> list:
    """Checks `config` against the run directory (`config_changes`), then records this invocation.

    run_config.json (the resolved config; not config.json, which means a Hugging Face checkpoint)
    and experiment.json (module and preset, for `rlft eval`) are written by the first run. An
    accepted --override change, and fields new since the run started (at their `defaults`), are
    appended to config_changes.jsonl (time, argv, old and new values; "new_fields") before
    run_config.json takes the new values. command.txt and git.txt get one line per
    invocation (the command; the commits of the experiment and of rlft), so resumes under other
    code are visible. Returns the changes recorded. With several processes every one checks, before
    any writes, and process 0 writes.
    """
    from rlft.parallel.distributed import barrier, is_primary  # imports JAX: not for --print-config

    changes, added = config_changes(workdir, config, experiment_path, override, defaults)
    barrier("rlft_run_metadata_checked")
    if not is_primary():
        return changes
    os.makedirs(workdir, exist_ok=True)
    config_path = os.path.join(workdir, RUN_CONFIG_FILE)
    if added:
        print(f"rlft: {workdir}: fields new since this run started, at their defaults: "
              f"{', '.join(f'{field}={new!r}' for field, _, new in added)}", file=sys.stderr)
    if changes or added:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": list(argv),
                 "changes": {field: {k: v for k, v in (("old", old), ("new", new)) if v is not ABSENT}
                             for field, old, new in changes}}
        if added:
            entry["new_fields"] = {field: new for field, _, new in added}
        with open(os.path.join(workdir, CONFIG_CHANGES_FILE), "a") as f:
            f.write(json.dumps(entry) + "\n")
    if changes or added or not os.path.exists(config_path):
        write_text(config_path, config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    if not os.path.exists(os.path.join(workdir, EXPERIMENT_FILE)):
        write_text(os.path.join(workdir, EXPERIMENT_FILE),
                      json.dumps({"path": os.path.abspath(experiment_path), "preset": preset}))
    with open(os.path.join(workdir, "command.txt"), "a") as f:
        f.write(shlex.join(argv) + "\n")
    with open(os.path.join(workdir, "git.txt"), "a") as f:
        f.write(json.dumps({"experiment": git_commit(experiment_path), "rlft": git_commit(__file__)}) + "\n")
    return changes
