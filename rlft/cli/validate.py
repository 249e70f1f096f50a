"""Check an experiment's resolved config before any work starts: one rule per field name.

`validate_config(config)` walks every section and checks each leaf whose name has a rule in
`RULES` (a section-qualified key such as "mesh.data" wins over the bare name), then the relations
between fields (d_model a multiple of n_heads, max_length within model.max_positions, accum_steps
dividing batch_size), then the validators the sections already have: `resolve_pg_config` for RL
sections, `check_dpo_args` for DPO sections and `LoraConfig` for `lora` sections. Fields without a rule are fine; a field with a
rule and a bad value is an RlftError naming its dotted path, the value and what is allowed, e.g.
`pretrain.steps=-1: must be an integer >= 0 (0 skips the stage)`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import ml_collections

from rlft.errors import RlftError
from rlft.models.config import NAMED_CONFIGS, REMAT_POLICIES, model_config


@dataclasses.dataclass(frozen=True)
class Rule:
    """A field's check and the words that describe the values it allows."""

    ok: Callable[[Any], bool]
    allowed: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _known_model(name: Any) -> bool:
    try:
        model_config(str(name))
    except RlftError:
        return False
    return True


def _int(low: int, note: str = "") -> Rule:
    return Rule(lambda v: _is_int(v) and v >= low, f"an integer >= {low}{note}")


def _number(low: float = -math.inf, high: float = math.inf, *, open_low: bool = False,
            note: str = "") -> Rule:
    def ok(v):
        return _is_number(v) and (v > low if open_low else v >= low) and v <= high

    if low == -math.inf:
        return Rule(ok, f"a finite number{note}")
    bound = f"> {low}" if open_low else f">= {low}"
    return Rule(ok, f"a finite number {bound}{f' and <= {high}' if high < math.inf else ''}{note}")


def _or_none(rule: Rule, note: str) -> Rule:
    return Rule(lambda v: v is None or rule.ok(v), f"{rule.allowed} or None ({note})")


def _is_run_dir(path: str) -> bool:
    """A directory with the files the first `rlft run` writes there (experiment.json, run_config.json)."""
    from rlft.config import EXPERIMENT_FILE, RUN_CONFIG_FILE

    return all(os.path.isfile(os.path.join(path, name)) for name in (EXPERIMENT_FILE, RUN_CONFIG_FILE))


_AT_LEAST_ONE = ("batch_size", "accum_steps", "save_every", "max_nonfinite_steps", "max_new_tokens",
                 "prompts_per_step", "group_size", "minibatches", "max_length", "d_model", "n_layers",
                 "n_heads", "max_positions", "vocab_size", "prompt_words")
_COUNTS = ("max_pairs", "max_test_examples", "max_test_pairs", "max_test_sentences",
           "max_reference_sentences", "num_prompts", "gao_prompts", "heldout_sentences", "judge_pairs",
           "judge_sentences")
_MESH_AXIS = Rule(lambda v: _is_int(v) and (v == -1 or v >= 1), "-1 (the remaining devices) or an integer >= 1")

RULES: dict[str, Rule] = {
    **{name: _int(1) for name in _AT_LEAST_ONE},
    **{name: _int(0) for name in _COUNTS},
    **{name: _or_none(_int(1), "None = derived from the other fields") for name in ("n_kv_heads", "d_ff", "head_dim")},
    "steps": _int(0, " (0 skips the stage)"),
    "epochs": _or_none(_int(1), "None = the algorithm's default"),
    "keep": _or_none(_int(1), "None = keep every checkpoint"),
    "warmup_steps": _int(0),
    "seed": _int(0),
    "learning_rate": _number(0, open_low=True),
    "critic_learning_rate": _or_none(_number(0, open_low=True), "None = the policy's learning rate"),
    "weight_decay": _number(0),
    "clip_norm": _or_none(_number(0), "0 or None = no clipping"),
    "temperature": _number(0, note=" (0 = greedy)"),
    "top_k": _int(0, " (0 = off)"),
    "top_p": _number(0, 1, open_low=True, note=" (1 = off)"),
    "margin": _number(),
    "center_weight": _number(0),
    "head_init_std": _number(0),
    "min_abs_rating": _number(0),
    "min_gap": _number(0, open_low=True),
    "pairs_per_sentence": _number(0, open_low=True),
    # Which runs an experiment can start from is its own rule (its `check(config)`, e.g.
    # rlft.recipes.sentiment.check_base_source); this one only needs a run directory.
    "init_from": Rule(lambda v: not v or (isinstance(v, str) and _is_run_dir(v)),
                      "empty (start from scratch) or a run directory made by `rlft run` "
                      "(with experiment.json and run_config.json)"),
    "mesh.data": _MESH_AXIS,
    "mesh.fsdp": _MESH_AXIS,
    "mesh.tensor": _MESH_AXIS,
    "mesh.rollout": Rule(lambda v: _is_number(v) and v >= 0 and (v < 1 or float(v).is_integer()),
                         "a device count >= 0 or a fraction in (0, 1) of the devices (left to the RL sampler; "
                         "0 = it shares the training devices)"),
    "tokenizer.vocab_size": _int(258, " (byte-level BPE: 256 bytes, EOS and pad)"),
    "lora.rank": _int(0, " (0 = full fine-tuning)"),
    "model.remat": Rule(lambda v: v in REMAT_POLICIES, f"one of {', '.join(REMAT_POLICIES)}"),
    "model.scan_layers": Rule(lambda v: isinstance(v, bool), "true or false"),
    "model.name": Rule(lambda v: v == "" or _known_model(v), f"empty (the experiment's own shape) or one "
                       f"of {', '.join(NAMED_CONFIGS)}"),
    "lora.alpha": _number(0, open_low=True),
}


def _sections(config: ml_collections.ConfigDict, prefix: str = ""):
    """(dotted path or "", section) for `config` and every section below it."""
    yield prefix, config
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _sections(value, f"{prefix}{key}.")


def _check_fields(path: str, section: ml_collections.ConfigDict) -> None:
    """Each leaf of `section` against its rule (section-qualified name first)."""
    qualified = path.rstrip(".").rsplit(".", 1)[-1]
    for key, value in section.items():
        if isinstance(value, ml_collections.ConfigDict):
            continue
        rule = RULES.get(f"{qualified}.{key}") or RULES.get(key)
        if rule is not None and not rule.ok(value):
            raise RlftError(f"{path}{key}={value!r}: must be {rule.allowed}")


def _check_relations(path: str, s: ml_collections.ConfigDict, max_positions: int | None) -> None:
    """Relations between the fields of one section (their own rules already hold)."""
    if "d_model" in s and "n_heads" in s and s.get("head_dim") is None and s.d_model % s.n_heads:
        raise RlftError(f"{path}d_model={s.d_model}: must be a multiple of {path}n_heads={s.n_heads}")
    if s.get("n_kv_heads") is not None and "n_heads" in s and s.n_heads % s.n_kv_heads:
        raise RlftError(f"{path}n_kv_heads={s.n_kv_heads}: must divide {path}n_heads={s.n_heads}")
    if "accum_steps" in s and "batch_size" in s and "prompts_per_step" not in s and s.batch_size % s.accum_steps:
        raise RlftError(f"{path}accum_steps={s.accum_steps}: must divide {path}batch_size={s.batch_size}")
    if max_positions is not None and path != "model.":
        if "max_length" in s and s.max_length > max_positions:
            raise RlftError(f"{path}max_length={s.max_length}: must be <= model.max_positions={max_positions}")
        if "max_new_tokens" in s and s.max_new_tokens >= max_positions:
            raise RlftError(f"{path}max_new_tokens={s.max_new_tokens}: must be < model.max_positions="
                            f"{max_positions} (a prompt needs at least one position)")


def _check_section(path: str, s: ml_collections.ConfigDict) -> None:
    """The validators an RL or DPO section already has."""
    if "algorithm" in s and "prompts_per_step" in s:
        from rlft.rl.config import resolve_pg_config

        resolve_pg_config(s, eos_id=0, prefix=path.rstrip("."))
    if path.endswith("lora."):
        from rlft.models.lora import LoraConfig

        LoraConfig.from_section(s, what=path.rstrip("."))
    if {"beta", "label_smoothing", "loss_type"} <= set(s.keys()):
        from rlft.objectives.dpo import check_dpo_args

        check_dpo_args(s.beta, s.label_smoothing, s.loss_type)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise RlftError naming the first field of `config` (any experiment's) with a nonsensical value.

    Run by `rlft run` after the overrides are applied, before the run directory is written, so a
    bad value costs nothing. Fields without a rule in `RULES` are not checked.
    """
    sections = list(_sections(config))
    for path, section in sections:
        _check_fields(path, section)
    model = config.get("model")
    max_positions = model.get("max_positions") if isinstance(model, ml_collections.ConfigDict) else None
    for path, section in sections:
        _check_relations(path, section, max_positions)
        _check_section(path, section)
