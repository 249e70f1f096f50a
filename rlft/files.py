"""Reading small metadata files (JSON) so that a missing or damaged file is a one-line RlftError.

JSON files rlft reads back (run_config.json, experiment.json, stages.json, reward_stats.json, a
Hugging Face config.json or safetensors index, tokenizer files) go through `read_json`, which
names the file and what is wrong with it instead of raising a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

from rlft.errors import RlftError

_KINDS = {dict: "object", list: "array"}


def read_json(path: str | os.PathLike, expect: type | None = dict) -> Any:
    """The parsed content of the JSON file `path`; RlftError naming the file if it is missing,
    unreadable, not UTF-8, not valid JSON, or (with `expect`) not a JSON object/array."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RlftError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise RlftError(f"{path}: malformed JSON ({e}); the file is damaged or truncated") from None
    except UnicodeDecodeError:
        raise RlftError(f"{path}: not UTF-8 text; the file is damaged") from None
    except OSError as e:
        raise RlftError(f"{path}: cannot be read ({e.strerror or e})") from None
    if expect is not None and not isinstance(value, expect):
        kind = _KINDS.get(expect, expect.__name__)
        raise RlftError(f"{path}: expected a JSON {kind}, found {type(value).__name__}; the file is damaged")
    return value


def naming(error: OSError, path: str | os.PathLike, *unhelpful: str) -> OSError:
    """`error` as an OSError naming `path` when it names no file, or only one of `unhelpful` (a
    temporary file): a write or close on a full disk names none. Unchanged otherwise."""
    if error.errno is None or error.filename not in (None, *unhelpful):
        return error
    return OSError(error.errno, error.strerror or os.strerror(error.errno), os.fspath(path))


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside `path` (same extension) to write to; renamed over `path` when the
    block ends, so a kill at any moment leaves the old file or the new one, never a truncated one.

    On any error the temporary file is removed, `path` stays as it was, and an OSError that names
    no file or only the temporary one is raised naming `path`.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}{os.path.splitext(path)[1]}"  # the extension kept (matplotlib reads it)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and (named := naming(e, path, tmp)) is not e:
            raise named from e  # write() and close() name no file, open() the temporary one
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (`replaced_atomically`); a failed write (a full disk, the
    file-size limit, a read-only file system) leaves `path` as it was and raises an OSError naming it."""
    with replaced_atomically(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Write `value` as indented JSON to `path` atomically (`write_text`)."""
    write_text(path, json.dumps(value, indent=2))
