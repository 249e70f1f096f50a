"""The user's own data: rows of a local file or a TFDS dataset, their fields, prompts rendered for a
checkpoint's tokenizer (chat templates), and the checkpoint's EOS ids.

Sources (`--config.data.train=SPEC`, `data.eval`; `read_rows(SPEC, flag="data.train")`):

- a local file, its type from the extension: `.jsonl` (one JSON object per line; blank lines are
  skipped), `.json` (an array of objects, or JSON lines), `.csv` (a header row; every cell is read
  as text, "" when empty: "NA" or "None" stay the strings they are), `.parquet`. Hugging Face
  `datasets` reads them (offline: no Hub look-up, its cache in a temporary directory).
- `tfds:NAME[/CONFIG][:VERSION]:SPLIT`, e.g. `tfds:imdb_reviews/plain_text:train` or
  `tfds:my_set:1.0.0:train[:1000]`: a prepared TFDS dataset (array_record), read with
  `tfds.data_source` from `data_dir` (TFDS's default when None), never downloaded. Text (bytes)
  features become str, numpy values Python ones.

Rows are plain dicts. A field named by a flag (`data.prompt_field`, `data.answer_field`,
`data.completion_field`, `data.chosen_field`, `data.rejected_field`) is read with `column`; a row
without it, or with null there (`datasets` fills fields other rows have with None), is an error
naming the flag, the row (1-based, counting rows, not lines) and the fields the row has.

A prompt is a string or a list of chat messages `[{"role": ..., "content": ...}]`. `render_prompt`
turns it into the text the model sees and its token ids: with `data.chat_template=true` through the
tokenizer's chat template (a string becomes one user message; the generation prompt is added; the
template writes its own BOS, so nothing is added when encoding); without, a string is encoded as the
tokenizer does by default (Llama gets its BOS) and messages are refused.

Every user mistake is one RlftError naming the flag and the file: a missing file, an unknown
extension, an empty file, a malformed JSONL line (its line number) or JSON document (line and
column), a row that is not an object, a missing field, a tokenizer without a chat template.
A field may hold different types in different rows (a string prompt here, chat messages there).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from rlft.errors import RlftError
from rlft.files import read_json

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TFDS_PREFIX = "tfds:"
TFDS_SYNTAX = "tfds:NAME[/CONFIG][:VERSION]:SPLIT"
_TFDS_SPEC = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)(?:/(?P<config>[A-Za-z0-9_.-]+))?"
                        r"(?::(?P<version>\d+\.\d+\.\d+))?:(?P<split>\S+)")
GENERATION_CONFIG = "generation_config.json"


class TfdsSpec(NamedTuple):
    """A parsed `tfds:NAME[/CONFIG][:VERSION]:SPLIT` (config and version None when absent)."""

    name: str
    config: str | None
    version: str | None
    split: str

    @property
    def builder(self) -> str:
        """The dataset as TFDS names it: `NAME[/CONFIG][:VERSION]`."""
        return (self.name + (f"/{self.config}" if self.config else "")
                + (f":{self.version}" if self.version else ""))


def parse_tfds_spec(spec: str, flag: str) -> TfdsSpec:
    """`tfds:NAME[/CONFIG][:VERSION]:SPLIT` -> TfdsSpec; RlftError naming `flag` and the syntax.

    SPLIT may use TFDS's slicing (`train[:1000]`, `train[:10%]+validation`); VERSION is x.y.z.
    """
    match = _TFDS_SPEC.fullmatch(spec[len(TFDS_PREFIX):]) if spec.startswith(TFDS_PREFIX) else None
    if match is None:
        raise RlftError(f"{flag}={spec!r}: not a TFDS dataset spec; expected {TFDS_SYNTAX}, "
                        f"e.g. tfds:imdb_reviews/plain_text:train")
    return TfdsSpec(**match.groupdict())


def read_rows(spec: str, flag: str, data_dir: str | None = None) -> list[dict]:
    """All rows of the file or TFDS dataset `spec` (see the module docstring), as a list of dicts.

    `flag` is the config field that named `spec` (e.g. "data.train"): every error names it and the
    file. `data_dir` is TFDS's data directory (unused for files). An empty source is an error.
    """
    spec = os.fspath(spec)
    if spec.startswith(TFDS_PREFIX):
        rows = _tfds_rows(parse_tfds_spec(spec, flag), spec, flag, data_dir)
    else:
        rows = _file_rows(os.path.expanduser(spec), flag)
    if not rows:
        raise RlftError(f"{flag}={spec}: the {'dataset split' if spec.startswith(TFDS_PREFIX) else 'file'} "
                        f"is empty (no rows)")
    return rows


def column(rows: Sequence[Mapping], field: str, flag: str, source: str) -> list:
    """The value of `field` in every row, in order.

    `flag` is the config field that names `field` (e.g. "data.prompt_field"), `source` the data
    (e.g. "data.train=prompts.jsonl"). A row without the field, or with null in it, is an RlftError
    naming both, the row (1-based) and the fields the row has.
    """
    if not field:
        raise RlftError(f"{flag}='': no field named for {source}")
    values = []
    for index, row in enumerate(rows):
        value = row.get(field) if isinstance(row, Mapping) else None
        if value is None:
            has = sorted(k for k, v in row.items() if v is not None) if isinstance(row, Mapping) else []
            raise RlftError(f"{flag}={field!r}: row {index + 1} of {source} has no field {field!r} "
                            f"(its fields: {has}); set --config.{flag}=NAME to the field holding it")
        values.append(value)
    return values


def render_prompt(prompt: str | Sequence[Mapping], tokenizer, chat_template: bool,
                  where: str = "the prompt") -> tuple[str, list[int]]:
    """(the prompt text the model sees, its token ids [length]) for a row's prompt value.

    `prompt` is a string or a list of chat messages {"role": str, "content": str}. With
    `chat_template`, the tokenizer's chat template renders it (a string as one user message) with
    `add_generation_prompt=True`, and the text is encoded without adding special tokens (the
    template writes its own BOS). Without, a string is the text and is encoded with the tokenizer's
    default special tokens (`add_special_tokens=True`: Llama's BOS); a list of messages is refused.
    `where` names the row in errors (e.g. "row 3 of data.train=prompts.jsonl").
    """
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        messages = _messages(prompt, where)
    else:
        raise RlftError(f"{where}: a prompt must be a string or a list of chat messages "
                        f"[{{'role': ..., 'content': ...}}], got {type(prompt).__name__}")
    if not chat_template:
        if not isinstance(prompt, str):
            raise RlftError(f"{where}: the prompt is a list of chat messages, which only a chat template "
                            f"turns into text; set --config.data.chat_template=true")
        return prompt, list(tokenizer.encode(prompt, add_special_tokens=True))
    if not getattr(tokenizer, "chat_template", None):
        raise RlftError(f"data.chat_template=true but the tokenizer at "
                        f"{getattr(tokenizer, 'name_or_path', '') or '(in memory)'} has no chat template "
                        f"(no chat_template in tokenizer_config.json, no chat_template.jinja); set "
                        f"--config.data.chat_template=false to use the prompts as plain text")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja2 errors, a template's raise_exception("roles must alternate")
        reason = " ".join(str(e).split()) or type(e).__name__
        raise RlftError(f"{where}: the tokenizer's chat template (data.chat_template=true) refused the "
                        f"messages: {reason[:300]}") from None
    return text, list(tokenizer.encode(text, add_special_tokens=False))


def eos_token_ids(tokenizer, checkpoint_dir: str | os.PathLike | None = None) -> list[int]:
    """The sorted unique token ids that end a generation: the tokenizer's `eos_token_id` plus the
    `eos_token_id` (an int or a list, as Llama-3's) of CHECKPOINT_DIR/generation_config.json when
    that file exists. A damaged file or a non-integer id is an RlftError naming the file; the list
    is empty when neither names an EOS.
    """
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    path = os.path.join(os.fspath(checkpoint_dir), GENERATION_CONFIG) if checkpoint_dir is not None else None
    if path is not None and os.path.isfile(path):
        value = read_json(path).get("eos_token_id")
        listed = [] if value is None else value if isinstance(value, list) else [value]
        for i in listed:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise RlftError(f"{path}: eos_token_id={value!r} must be a token id or a list of them; "
                                f"the file is damaged")
        ids.update(listed)
    return sorted(ids)


def _messages(prompt: Sequence, where: str) -> list[dict]:
    """The chat messages of a list-valued prompt, checked; keys `datasets` filled with None dropped."""
    messages = []
    for i, m in enumerate(prompt):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RlftError(f"{where}: message {i + 1} of the prompt is not {{'role': str, 'content': str}} "
                            f"(got {str(m)[:100]})")
        messages.append({k: v for k, v in m.items() if v is not None})
    if not messages:
        raise RlftError(f"{where}: the prompt is an empty list of chat messages")
    return messages


def _file_rows(path: str, flag: str) -> list[dict]:
    """The rows of a local file through Hugging Face `datasets` (errors: see the module docstring)."""
    where = f"{flag}={path}"
    extension = os.path.splitext(path)[1].lower()
    if extension not in FORMATS:
        raise RlftError(f"{where}: unknown file type {extension or '(no extension)'!r}; expected one of "
                        f"{', '.join(FORMATS)}, or {TFDS_SYNTAX}")
    if not os.path.isfile(path):
        raise RlftError(f"{where}: {'not a file' if os.path.exists(path) else 'file not found'}")
    try:
        empty = os.path.getsize(path) == 0
    except OSError as e:
        raise RlftError(f"{where}: cannot be read ({e.strerror or e})") from None
    if empty:
        raise RlftError(f"{where}: the file is empty (no rows)")
    builder = FORMATS[extension]
    kwargs = _csv_kwargs(path, where) if builder == "csv" else {}
    with _datasets_offline() as datasets, tempfile.TemporaryDirectory(prefix="rlft-datasets-") as cache:
        try:
            return _load(datasets, builder, path, cache, kwargs)
        except Exception as e:  # pyarrow's, pandas' and datasets' own errors
            error = e
        if "corresponds to no data" in str(error):  # only blank lines, or a CSV header alone
            raise RlftError(f"{where}: the file is empty (no rows)") from None
        if builder == "json" and _find_json_error(path, where, jsonl=extension == ".jsonl"):
            # Every line is a JSON object, but some are blank: datasets (5.2) fails on blank lines
            # once a field holds different types in different rows. Read a copy without them.
            copy = os.path.join(cache, "rows.jsonl")
            with open(path, encoding="utf-8") as f, open(copy, "w", encoding="utf-8") as out:
                out.writelines(line for line in f if line.strip())
            try:
                return _load(datasets, builder, copy, os.path.join(cache, "copy"), kwargs)
            except Exception:
                pass
    if builder == "csv" and "Length of header or names does not match" in _reason(error):
        raise RlftError(f"{where}: line 2 has more cells than the header row (line 1)")
    if builder == "parquet" and _parquet_rows(path) == 0:
        raise RlftError(f"{where}: the file is empty (no rows)")
    raise RlftError(f"{where}: could not be read as {extension[1:].upper()} ({_reason(error)})")


def _load(datasets, builder: str, path: str, cache: str, kwargs: dict) -> list[dict]:
    """`datasets.load_dataset(builder, data_files=path)` as a list of rows, its cache in `cache`; a
    CSV row with more cells than the header is an error (pandas only warns)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Length of header or names does not match")
        table = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache,
                                      keep_in_memory=True, **kwargs)
    return table.to_list()


@contextlib.contextmanager
def _datasets_offline() -> Iterator[Any]:
    """The `datasets` module, set (for the block) to use no network and print no logs or progress bars.

    Its packaged readers need no network, but `load_dataset` would still send a download-count
    request to the Hub (up to 3 s without a network) unless offline mode is on.
    """
    import datasets
    from datasets.utils import logging as dlogging

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS,
             dlogging.get_verbosity(), datasets.are_progress_bars_disabled())
    datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = True, False
    dlogging.set_verbosity(dlogging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = saved[:2]
        dlogging.set_verbosity(saved[2])
        if not saved[3]:
            datasets.enable_progress_bars()


def _csv_kwargs(path: str, where: str) -> dict:
    """`load_dataset("csv")` arguments that read every column as text, empty cells as "", and never
    take the first column for an index (pandas does when the first row has one cell too many)."""
    import datasets

    try:
        with open(path, encoding="utf-8", newline="") as f:
            header = next(csv.reader(f), [])
    except UnicodeDecodeError:
        raise RlftError(f"{where}: not UTF-8 text") from None
    except (OSError, csv.Error) as e:
        raise RlftError(f"{where}: could not be read as CSV ({_reason(e)})") from None
    if not header or len(set(header)) != len(header):
        return {"keep_default_na": False, "index_col": False}  # pandas names (or refuses) the columns
    return {"keep_default_na": False, "index_col": False,
            "features": datasets.Features({name: datasets.Value("string") for name in header})}


def _parquet_rows(path: str) -> int | None:
    """The row count in a Parquet file's footer; None when it cannot be read."""
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path).num_rows
    except Exception:
        return None


_JSON_KINDS = {str: "a string", list: "a list", dict: "an object", bool: "a boolean",
               int: "a number", float: "a number"}


def _find_json_error(path: str, where: str, jsonl: bool) -> bool:
    """Raises an RlftError naming the first problem in a JSON(L) file that `datasets` refused: a
    malformed line (its number) or document (line and column), a row that is not an object, no
    rows at all. Finding none, returns whether the file has blank lines between its JSON lines."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise RlftError(f"{where}: not UTF-8 text") from None
    except OSError:
        return False
    if not jsonl:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as e:
            if "Extra data" not in e.msg:  # else JSON lines in a .json file: checked below
                raise RlftError(f"{where}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
        else:
            for i, row in enumerate(document if isinstance(document, list) else []):
                if not isinstance(row, dict):
                    raise RlftError(f"{where}: row {i + 1} is {_JSON_KINDS.get(type(row), 'null')}, "
                                    f"not a JSON object")
            return False
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RlftError(f"{where}: line {number} is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise RlftError(f"{where}: line {number} is {_JSON_KINDS.get(type(row), 'null')}, not a JSON object")
    if not any(line.strip() for line in lines):
        raise RlftError(f"{where}: the file is empty (no rows)")
    return any(not line.strip() for line in lines)


def _reason(error: BaseException) -> str:
    """The most specific message in an exception's chain (`datasets` wraps the reader's error)."""
    reason, seen = "", set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = " ".join(str(error).split()).split(" Available datasets:")[0]  # TFDS lists them all
        if text and "An error occurred while generating the dataset" not in text:
            reason = f"{type(error).__name__}: {text}"
        error = error.__cause__ or error.__context__
    return reason[:300] or "unknown error"


def _tfds_rows(spec: TfdsSpec, text: str, flag: str, data_dir: str | None) -> list[dict]:
    """Every example of a prepared TFDS split as a dict of Python values (bytes decoded as UTF-8)."""
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(spec.builder, split=spec.split, data_dir=data_dir or None, download=False)
        return [_python(source[i]) for i in range(len(source))]
    except Exception as e:  # DatasetNotFoundError, an unknown split, a dataset not prepared, ...
        raise RlftError(f"{flag}={text}: could not read the TFDS dataset "
                        f"(data_dir={data_dir or 'TFDS default'}; rlft reads prepared datasets and "
                        f"downloads none): {_reason(e)}") from None


def _python(value: Any) -> Any:
    """A TFDS example's value as plain Python: dicts and arrays recursed, bytes decoded as UTF-8."""
    if isinstance(value, Mapping):
        return {k: _python(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _python(value.item()) if value.ndim == 0 else [_python(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value
