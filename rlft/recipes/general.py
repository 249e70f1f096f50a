"""What the general experiments (experiments/rl.py, sft.py, reward.py, dpo.py) share: the starting
model (a Hugging Face checkpoint directory or a stage of an rlft run, with its own tokenizer and EOS
ids, on the mesh) and the `data` section that maps a data file's fields to prompts.

`model_config()` is the `model` section: path, remat, scan_layers, dtype.
`load_starting_model(section, mesh)` reads it (`rlft.load`: GPT-2, Llama, Qwen2 checkpoints; a LoRA
stage comes merged onto its base), applies the runtime fields and places the params by the
sharding rules. `save_run_files(workdir, start)` writes WORKDIR/model_config.json and
WORKDIR/tokenizer/ (with a generation_config.json listing the EOS ids), so `rlft.load` and
`rlft export` of the run's stages find the model and its tokenizer.
`data_config()` is the `data` section; `prompt_records(rows, tokenizer, data, flag)` turns rows of a
data file (`rlft.data.records.read_rows`) into prompt records: the row's fields plus "prompt" (the
text the model sees, after the chat template), "ids" and "answer".
"""

from __future__ import annotations

import dataclasses
import os

import sys

import ml_collections
from flax import nnx
from jax.sharding import Mesh

from rlft.errors import RlftError
from rlft.files import write_json
from rlft.models import Decoder, ModelConfig
from rlft.parallel.distributed import barrier, is_primary
from rlft.train.checkpoints import save_model_config
from rlft.train.warm_start import decoder_state


def model_config(path: str = "") -> ml_collections.ConfigDict:
    """The `model` section: path (a Hugging Face checkpoint dir or an rlft stage), remat
    ("none", "full", ...), scan_layers, dtype ("float32" or "bfloat16" compute)."""
    return ml_collections.ConfigDict(dict(path=path, remat="none", scan_layers=False, dtype="float32"))


@dataclasses.dataclass
class StartingModel:
    """A language model to fine-tune: where it came from, its config, graphdef and params (on the
    mesh), tokenizer, the ids generation stops at, and the id that pads rows."""

    path: str
    config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: object
    eos_ids: tuple[int, ...]
    pad_id: int


def load_starting_model(section: ml_collections.ConfigDict, mesh: Mesh, flag: str = "model.path") -> StartingModel:
    """The model `section.path` names, with section.remat / scan_layers / dtype, its params placed
    on `mesh`; an RlftError naming `flag` when it is unset, missing, not a language model or has
    no tokenizer."""
    import rlft
    from rlft.data.records import eos_token_ids

    path = section.path
    if not path:
        raise RlftError(f"{flag} is not set: name a Hugging Face checkpoint directory (config.json, "
                        f"safetensors, tokenizer files) or a stage of an rlft run (e.g. runs/x/sft)")
    if not os.path.isdir(path):
        raise RlftError(f"{flag}={path}: no such directory")
    model = rlft.load(path)
    if model.kind != "lm":
        raise RlftError(f"{flag}={path}: a {model.kind} model, not a language model")
    if model.tokenizer is None:
        raise RlftError(f"{flag}={path}: no tokenizer beside the model (tokenizer.json / tokenizer_config.json)")
    cfg = model.config.replace(remat=section.remat, scan_layers=bool(section.scan_layers), dtype=section.dtype)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    params = decoder_state(cfg, model.params, mesh)
    tok = model.tokenizer
    eos_ids = tuple(eos_token_ids(tok, _tokenizer_dir(path)))
    if not eos_ids:
        raise RlftError(f"{flag}={path}: the tokenizer has no EOS token and no generation_config.json lists one")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]  # pads are masked everywhere
    return StartingModel(path=path, config=cfg, graphdef=graphdef, params=params, tokenizer=tok,
                         eos_ids=eos_ids, pad_id=int(pad_id))


def _tokenizer_dir(path: str) -> str:
    """Where the model at `path` keeps its tokenizer (and generation_config.json): the checkpoint
    directory itself, or RUN/tokenizer for a stage of an rlft run."""
    from rlft.train.warm_start import run_dir_of

    run_dir = run_dir_of(path)
    return os.path.join(run_dir, "tokenizer") if run_dir is not None else path


def save_run_files(workdir: str, start: StartingModel) -> None:
    """WORKDIR/model_config.json and WORKDIR/tokenizer/ (+ generation_config.json with the EOS ids),
    written by process 0; an existing model_config.json must describe the same model."""
    save_model_config(workdir, start.config)
    if is_primary():
        out = os.path.join(workdir, "tokenizer")
        start.tokenizer.save_pretrained(out)
        write_json(os.path.join(out, "generation_config.json"), {"eos_token_id": list(start.eos_ids)})
    barrier(f"tokenizer {workdir}")


def experiment_config(name: str, preset: str, **data_fields) -> ml_collections.ConfigDict:
    """The sections every general experiment has: seed, model (`model_config`), mesh (data
    parallel over every device), data (`data_config(**data_fields)`); an unknown preset (not
    "default" or "tiny") is an RlftError naming experiment `name`."""
    if preset not in ("default", "tiny"):
        raise RlftError(f"{name}: unknown preset {preset!r} (default, tiny)")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = model_config()
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.data = data_config(**data_fields)
    return c


def data_config(**fields) -> ml_collections.ConfigDict:
    """The `data` section: train / eval (a .jsonl, .json, .csv or .parquet file, or
    tfds:NAME:SPLIT read from data_dir, default TFDS's), the field names (prompt_field,
    answer_field, completion_field, chosen_field, rejected_field), chat_template (apply the
    tokenizer's chat template to prompts) and max_prompt_tokens (0: no limit; longer prompts keep
    their end)."""
    section = dict(train="", eval="", data_dir="", prompt_field="prompt", answer_field="answer",
                   completion_field="completion", chosen_field="chosen", rejected_field="rejected",
                   chat_template=False, max_prompt_tokens=0)
    section.update(fields)
    return ml_collections.ConfigDict(section)


def data_rows(data: ml_collections.ConfigDict, which: str) -> list[dict]:
    """The rows of data.train or data.eval (`which`), as `rlft.data.records.read_rows` reads them."""
    from rlft.data.records import read_rows

    return read_rows(data[which], flag=f"data.{which}", data_dir=data.data_dir or None)


def prompt_records(rows: list[dict], tokenizer, data: ml_collections.ConfigDict, flag: str) -> list[dict]:
    """One record per row: the row's fields, "prompt" (the text the model sees: `render_prompt` of
    row[data.prompt_field]), "ids" (its token ids, the last data.max_prompt_tokens of them when
    that is set) and "answer" (row[data.answer_field], when the row has it). flag: "data.train" or
    "data.eval", for messages."""
    from rlft.data.records import column, render_prompt

    records, cut = [], 0
    source = f"{flag}={data.get(flag.split('.')[1])}"
    values = column(rows, data.prompt_field, "data.prompt_field", source)
    for i, (row, value) in enumerate(zip(rows, values)):
        text, ids = render_prompt(value, tokenizer, bool(data.chat_template), f"row {i + 1} of {source}")
        if data.max_prompt_tokens and len(ids) > data.max_prompt_tokens:
            ids, cut = ids[-data.max_prompt_tokens:], cut + 1
        if not ids:
            raise RlftError(f"row {i + 1} of {source}: the prompt has no tokens")
        record = {**row, "prompt": text, "ids": list(ids)}
        if data.answer_field and row.get(data.answer_field) is not None:
            record["answer"] = row[data.answer_field]
        records.append(record)
    if cut:
        print(f"{cut} of {len(rows)} prompts of {source} kept their last data.max_prompt_tokens="
              f"{data.max_prompt_tokens} tokens", file=sys.stderr)
    return records


def end_id(start: StartingModel) -> int:
    """The token that closes a training completion: the tokenizer's EOS (an instruct model's
    end-of-turn, e.g. <|im_end|>), else the first of the generation EOS ids."""
    eos = start.tokenizer.eos_token_id
    return int(eos) if eos is not None else start.eos_ids[0]


def completion_ids(rows: list[dict], field: str, flag: str, source: str, start: StartingModel) -> list[list[int]]:
    """Token ids of row[field] (a string) in every row, closed by `end_id` (no special tokens
    before: the prompt carries them). flag names the field in errors (e.g. "data.completion_field")."""
    from rlft.data.records import column

    out = []
    for i, value in enumerate(column(rows, field, flag, source)):
        if not isinstance(value, str):
            raise RlftError(f"{flag}={field!r}: row {i + 1} of {source} holds {type(value).__name__}, expected text")
        out.append(list(start.tokenizer.encode(value, add_special_tokens=False)) + [end_id(start)])
    return out


def encoded_pairs(rows: list[dict], data: ml_collections.ConfigDict, start: StartingModel,
                  flag: str) -> list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]]:
    """((prompt ids, chosen ids), (prompt ids, rejected ids)) of each row: the prompt as
    `prompt_records` renders it, data.chosen_field / data.rejected_field closed by `end_id`."""
    source = f"{flag}={data.get(flag.split('.')[1])}"
    prompts = prompt_records(rows, start.tokenizer, data, flag)
    chosen = completion_ids(rows, data.chosen_field, "data.chosen_field", source, start)
    rejected = completion_ids(rows, data.rejected_field, "data.rejected_field", source, start)
    return [((p["ids"], c), (p["ids"], r)) for p, c, r in zip(prompts, chosen, rejected)]


def check_paths(config: ml_collections.ConfigDict, experiment: str) -> None:
    """model.path and data.train are set, model.path is a directory (before anything is written)."""
    for flag in ("model.path", "data.train"):
        section, field = flag.split(".")
        if not config[section][field]:
            raise RlftError(f"{flag} is not set (the docstring of experiments/{experiment} shows a command)")
    if not os.path.isdir(config.model.path):
        raise RlftError(f"model.path={config.model.path}: no such directory")
