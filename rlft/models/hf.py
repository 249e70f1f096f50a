"""Hugging Face checkpoints in and out: config.json + *.safetensors (+ tokenizer) <-> rlft Decoder.

Supported architectures: GPT-2 (GPT2LMHeadModel), Llama (LlamaForCausalLM) and Qwen2
(Qwen2ForCausalLM), and their sequence-classification reward models with one label
(GPT2/Llama/Qwen2ForSequenceClassification, imported as a ScalarModel by
`load_hf_scalar_checkpoint`). Weights are read with safetensors' numpy loader (sharded checkpoints
through `model.safetensors.index.json`), so no PyTorch is needed to import or export. Either parameter
layout works: importing into a `scan_layers` config stacks the per-layer tensors (`fill_params`),
exporting one unstacks them (`unstack_layers`).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from typing import Callable

import numpy as np
from flax import nnx

from rlft.errors import RlftError
from rlft.files import read_json
from rlft.models.config import ModelConfig
from rlft.models.decoder import Decoder
from rlft.models.heads import ScalarModel
from rlft.models.params import dotted_names, fill_params, flatten_params, unstack_layers

SUPPORTED = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SEQUENCE_CLASSIFICATION = "ForSequenceClassification"  # the architectures suffix of a reward model


def is_hf_checkpoint(path: str) -> bool:
    """A directory with a Hugging Face config.json (and not an rlft run directory)."""
    return os.path.isfile(os.path.join(path, "config.json"))


def is_hf_scalar_checkpoint(path: str) -> bool:
    """A Hugging Face sequence-classification checkpoint: config.json's "architectures" names a
    ...ForSequenceClassification model (a reward model, imported as a ScalarModel by
    `load_hf_scalar_checkpoint`). False for a directory without config.json."""
    if not is_hf_checkpoint(path):
        return False
    architectures = read_json(os.path.join(path, "config.json")).get("architectures")
    return isinstance(architectures, list) and any(
        isinstance(a, str) and a.endswith(SEQUENCE_CLASSIFICATION) for a in architectures)


def model_config_from_hf(path: str) -> ModelConfig:
    """Translate `path/config.json` into a ModelConfig; unsupported options are clear errors."""
    import transformers

    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise RlftError(f"{path}: no config.json; expected a Hugging Face checkpoint directory")
    model_type = read_json(config_file).get("model_type")
    if model_type not in SUPPORTED:
        raise RlftError(f"{config_file}: model_type {model_type!r} is not supported; "
                        f"rlft imports {', '.join(sorted(SUPPORTED))}")
    try:
        return _model_config(transformers.AutoConfig.from_pretrained(path), model_type, config_file)
    except RlftError as e:  # ModelConfig's own checks: say which file holds the bad value
        if str(e).startswith(config_file):
            raise
        raise RlftError(f"{config_file}: {e}") from None
    except (ValueError, TypeError, KeyError, AttributeError, OSError, ZeroDivisionError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise RlftError(f"{config_file}: not a valid {model_type} config ({reason})") from None


def _model_config(hf, model_type: str, config_file: str) -> ModelConfig:
    """The ModelConfig of a transformers config object of a supported `model_type`."""
    if model_type == "gpt2":
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if getattr(hf, flag, False):
                raise RlftError(f"{config_file}: GPT-2 option {flag}=true is not supported")
        if not getattr(hf, "scale_attn_weights", True):
            raise RlftError(f"{config_file}: GPT-2 option scale_attn_weights=false is not supported")
        return ModelConfig.gpt2(vocab_size=hf.vocab_size, d_model=hf.n_embd, n_layers=hf.n_layer,
                                n_heads=hf.n_head, max_positions=hf.n_positions, d_ff=hf.n_inner,
                                norm_eps=hf.layer_norm_epsilon, activation=hf.activation_function)
    if getattr(hf, "use_sliding_window", False):
        raise RlftError(f"{config_file}: sliding-window attention is not supported")
    if hf.hidden_act != "silu":
        raise RlftError(f"{config_file}: hidden_act={hf.hidden_act!r} is not supported (expected silu)")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    scaling = None
    if rope_type == "llama3":
        scaling = ("llama3", float(rope["factor"]), float(rope["low_freq_factor"]),
                   float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
    elif rope_type != "default":
        raise RlftError(f"{config_file}: rope_type {rope_type!r} is not supported (default, llama3)")
    common = dict(vocab_size=hf.vocab_size, d_model=hf.hidden_size, n_layers=hf.num_hidden_layers,
                  n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads,
                  d_ff=hf.intermediate_size, max_positions=hf.max_position_embeddings,
                  head_dim=getattr(hf, "head_dim", None), norm_eps=hf.rms_norm_eps,
                  rope_theta=float(rope.get("rope_theta", 10000.0)), rope_scaling=scaling,
                  tie_embeddings=bool(hf.tie_word_embeddings))
    if model_type == "llama":
        return ModelConfig.llama(attention_bias=hf.attention_bias, mlp_bias=hf.mlp_bias, **common)
    return ModelConfig.qwen2(**common)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory: model.safetensors or a sharded index."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise RlftError(f"{index}: no weight_map of tensor name -> shard file; the file is damaged")
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        found = sorted(os.listdir(path))
        raise RlftError(f"{path}: no model.safetensors or model.safetensors.index.json "
                        f"(found {found}); save the checkpoint with safe_serialization=True")
    tensors = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise RlftError(f"{index}: lists shard {name}, which is missing")
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise RlftError(f"{file}: not a readable safetensors file ({e}); it is damaged or "
                            f"truncated") from None
    return tensors


def _hf_layout(cfg: ModelConfig) -> list[tuple[str, str, Callable, Callable]]:
    """(our name, HF name, HF->ours, ours->HF) for every tensor but GPT-2's fused q/k/v."""
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    same = (lambda x: x, lambda x: x)
    if cfg.family == "gpt2":
        rows = [("embed", "transformer.wte.weight", *same),
                ("pos_embed", "transformer.wpe.weight", *same),
                ("final_norm.scale", "transformer.ln_f.weight", *same),
                ("final_norm.bias", "transformer.ln_f.bias", *same)]
        for i in range(cfg.n_layers):
            p, q = f"layers.{i}.", f"transformer.h.{i}."
            rows += [(p + "attn_norm.scale", q + "ln_1.weight", *same),
                     (p + "attn_norm.bias", q + "ln_1.bias", *same),
                     (p + "attn.o", q + "attn.c_proj.weight",
                      lambda x: x.reshape(h, hd, d), lambda x: x.reshape(h * hd, d)),
                     (p + "attn.o_bias", q + "attn.c_proj.bias", *same),
                     (p + "mlp_norm.scale", q + "ln_2.weight", *same),
                     (p + "mlp_norm.bias", q + "ln_2.bias", *same),
                     (p + "mlp.up", q + "mlp.c_fc.weight", *same),
                     (p + "mlp.up_bias", q + "mlp.c_fc.bias", *same),
                     (p + "mlp.down", q + "mlp.c_proj.weight", *same),
                     (p + "mlp.down_bias", q + "mlp.c_proj.bias", *same)]
        return rows
    # Llama / Qwen2: torch Linear weights are [out, in]; ours are [in, *out].
    def linear(*out_shape):
        return (lambda x: x.T.reshape(x.shape[1], *out_shape),
                lambda x: x.reshape(x.shape[0], -1).T)

    rows = [("embed", "model.embed_tokens.weight", *same),
            ("final_norm.scale", "model.norm.weight", *same)]
    if not cfg.tie_embeddings:
        rows.append(("lm_head", "lm_head.weight", lambda x: x.T, lambda x: x.T))
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        rows += [(p + "attn_norm.scale", q + "input_layernorm.weight", *same),
                 (p + "mlp_norm.scale", q + "post_attention_layernorm.weight", *same),
                 (p + "attn.q", q + "self_attn.q_proj.weight", *linear(h, hd)),
                 (p + "attn.k", q + "self_attn.k_proj.weight", *linear(kv, hd)),
                 (p + "attn.v", q + "self_attn.v_proj.weight", *linear(kv, hd)),
                 (p + "attn.o", q + "self_attn.o_proj.weight",
                  lambda x: x.T.reshape(h, hd, d), lambda x: x.reshape(h * hd, d).T),
                 (p + "mlp.gate", q + "mlp.gate_proj.weight", *linear(cfg.d_ff)),
                 (p + "mlp.up", q + "mlp.up_proj.weight", *linear(cfg.d_ff)),
                 (p + "mlp.down", q + "mlp.down_proj.weight", *linear(d))]
        if cfg.qkv_bias:
            rows += [(p + f"attn.{n}_bias", q + f"self_attn.{n}_proj.bias",
                      lambda x, n=n: x.reshape(h if n == "q" else kv, hd), lambda x: x.reshape(-1))
                     for n in "qkv"]
        if cfg.out_bias:
            rows.append((p + "attn.o_bias", q + "self_attn.o_proj.bias", *same))
        if cfg.mlp_bias:
            rows += [(p + f"mlp.{n}_bias", q + f"mlp.{n}_proj.bias", *same) for n in ("gate", "up", "down")]
    return rows


def params_from_hf_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray], source: str) -> nnx.State:
    """Map HF tensor names/layouts onto a Decoder state (float32), in `cfg`'s layer layout."""
    ours: dict[str, np.ndarray] = {}
    used = set()
    for name, hf_name, to_ours, _ in _hf_layout(cfg):
        if hf_name not in tensors:
            raise RlftError(f"{source}: tensor {hf_name} is missing")
        ours[name] = to_ours(np.asarray(tensors[hf_name], np.float32))
        used.add(hf_name)
    if cfg.family == "gpt2":
        h, hd = cfg.n_heads, cfg.head_dim
        for i in range(cfg.n_layers):
            w = tensors[f"transformer.h.{i}.attn.c_attn.weight"].astype(np.float32)
            b = tensors[f"transformer.h.{i}.attn.c_attn.bias"].astype(np.float32)
            for n, wi, bi in zip("qkv", np.split(w, 3, axis=1), np.split(b, 3)):
                ours[f"layers.{i}.attn.{n}"] = wi.reshape(-1, h, hd)
                ours[f"layers.{i}.attn.{n}_bias"] = bi.reshape(h, hd)
            used |= {f"transformer.h.{i}.attn.c_attn.weight", f"transformer.h.{i}.attn.c_attn.bias"}
    # Tied checkpoints may still store lm_head.weight; old GPT-2 files carry attention-mask buffers.
    ignorable = ("lm_head.weight", ".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
    unused = [k for k in tensors if k not in used and not k.endswith(ignorable)]
    if unused:
        raise RlftError(f"{source}: tensors not understood by rlft's {cfg.family} model: {unused[:5]}")
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    return fill_params(abstract, ours, source)


def hf_tensors_from_params(cfg: ModelConfig, params: nnx.State) -> dict[str, np.ndarray]:
    """The inverse of `params_from_hf_tensors`: HF names and layouts, float32 numpy (either layout)."""
    flat = unstack_layers({k: np.asarray(v, np.float32) for k, v in flatten_params(params).items()})
    out = {hf_name: np.ascontiguousarray(to_hf(flat[name])) for name, hf_name, _, to_hf in _hf_layout(cfg)}
    if cfg.family == "gpt2":
        for i in range(cfg.n_layers):
            p = f"layers.{i}.attn."
            out[f"transformer.h.{i}.attn.c_attn.weight"] = np.concatenate(
                [flat[p + n].reshape(cfg.d_model, -1) for n in "qkv"], axis=1)
            out[f"transformer.h.{i}.attn.c_attn.bias"] = np.concatenate(
                [flat[p + n + "_bias"].reshape(-1) for n in "qkv"])
    return out


def hf_config(cfg: ModelConfig, tokenizer=None):
    """A transformers config object describing `cfg` (token ids taken from the tokenizer)."""
    import transformers

    ids = {}
    if tokenizer is not None:
        ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                   else tokenizer.eos_token_id)
    if cfg.family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_positions, n_embd=cfg.d_model,
            n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
            activation_function=cfg.activation, layer_norm_epsilon=cfg.norm_eps,
            tie_word_embeddings=True, architectures=[SUPPORTED["gpt2"]], **ids)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        _, factor, low, high, old = cfg.rope_scaling
        rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                    original_max_position_embeddings=old)
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                  max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps,
                  rope_parameters=rope, tie_word_embeddings=cfg.tie_embeddings,
                  architectures=[SUPPORTED[cfg.family]], **ids)
    if cfg.family == "llama":
        return transformers.LlamaConfig(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, **common)
    return transformers.Qwen2Config(**common)


def check_export_dir(out_dir: str, overwrite: bool, flag: str = "overwrite=True") -> None:
    """RlftError unless `out_dir` can take an export: absent or an empty directory, or `overwrite`."""
    if not out_dir:
        raise RlftError("export: the output directory is an empty path")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise RlftError(f"{out_dir}: exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise RlftError(f"{out_dir}: directory is not empty ({len(os.listdir(out_dir))} entries); "
                        f"pass {flag} to replace it")


def save_hf_checkpoint(cfg: ModelConfig, params: nnx.State, out_dir: str, tokenizer=None,
                       overwrite: bool = False) -> None:
    """Write config.json, model.safetensors and the tokenizer so `transformers` loads `out_dir`.

    A non-empty `out_dir` is refused unless `overwrite`. The files are written into a fresh
    sibling directory that then replaces `out_dir`, so no file of an earlier export (an old
    model.safetensors.index.json or shard) survives, and a failed export leaves `out_dir` as it was.
    """
    from safetensors.numpy import save_file

    def fill(fresh: str) -> None:
        hf_config(cfg, tokenizer).save_pretrained(fresh)
        save_file(hf_tensors_from_params(cfg, params), os.path.join(fresh, "model.safetensors"),
                  metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(fresh)

    _write_dir(out_dir, overwrite, fill)


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors and tokenizers report an I/O error


def _export_os_error(error: Exception, out_dir: str) -> OSError | None:
    """A write error of an export as an OSError naming `out_dir` (what the user named, not the temporary
    sibling): an OSError, or a safetensors/tokenizers error carrying "(os error N)"; None otherwise."""
    if isinstance(error, OSError):
        code, reason = error.errno, error.strerror
    elif match := _RUST_OS_ERROR.search(str(error)):
        code, reason = int(match.group(1)), None
    else:
        return None
    if code is None:
        return None
    return OSError(code, reason or os.strerror(code), out_dir)


def _write_dir(out_dir: str, overwrite: bool, fill: Callable[[str], None]) -> None:
    """Run fill(fresh) on a fresh sibling directory, then swap it in for `out_dir` (see check_export_dir).

    A failure (a full disk, the file-size limit, a read-only file system) removes the sibling and
    leaves `out_dir` as it was; it is raised as an OSError naming `out_dir`.
    """
    check_export_dir(out_dir, overwrite)
    parent, name = os.path.split(os.path.abspath(out_dir))
    fresh = os.path.join(parent, f".{name}.tmp-{secrets.token_hex(4)}")
    try:
        os.makedirs(parent, exist_ok=True)
        os.mkdir(fresh)
        try:
            fill(fresh)
            if os.path.lexists(out_dir):
                os.rename(out_dir, fresh + ".old")
                try:
                    os.rename(fresh, out_dir)
                except OSError:
                    os.rename(fresh + ".old", out_dir)
                    raise
                shutil.rmtree(fresh + ".old")
            else:
                os.rename(fresh, out_dir)
        finally:
            shutil.rmtree(fresh, ignore_errors=True)
    except Exception as e:
        if (error := _export_os_error(e, out_dir)) is None:
            raise
        raise error from e


def load_hf_checkpoint(path: str) -> tuple[ModelConfig, nnx.State]:
    """(ModelConfig, params nnx.State) from a Hugging Face checkpoint dir (its tokenizer: `rlft.load`).

    A causal LM (a Decoder's state); a sequence-classification checkpoint is refused, naming
    `load_hf_scalar_checkpoint` (its state is a ScalarModel's, not a Decoder's).
    """
    if is_hf_scalar_checkpoint(path):
        raise RlftError(f"{path}: a sequence-classification (reward) checkpoint, not a language model; "
                        f"load it with rlft.load(path) or rlft.models.hf.load_hf_scalar_checkpoint "
                        f"(a ScalarModel)")
    cfg = model_config_from_hf(path)
    return cfg, params_from_hf_tensors(cfg, read_safetensors(path), path)


def scalar_model_config_from_hf(path: str) -> ModelConfig:
    """The ModelConfig of a sequence-classification checkpoint's ScalarModel (`model_config_from_hf`).

    config.json must describe one label (num_labels=1: a scalar reward), else RlftError naming it.
    Llama/Qwen2 get tie_embeddings=True: these checkpoints hold no LM head, and a tied head is the
    backbone Decoder's LM head without a [d_model, vocab] weight (its logits are meaningless, and
    nothing reads them: a ScalarModel uses the hidden states only). GPT-2 is always tied.
    """
    import transformers

    cfg = model_config_from_hf(path)
    config_file = os.path.join(path, "config.json")
    num_labels = transformers.AutoConfig.from_pretrained(path).num_labels
    if num_labels != 1:
        raise RlftError(f"{config_file}: num_labels={num_labels}; rlft imports sequence-classification "
                        f"checkpoints with one label (a scalar reward)")
    return cfg if cfg.tie_embeddings else cfg.replace(tie_embeddings=True)


def scalar_params_from_hf_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray], source: str) -> nnx.State:
    """A ScalarModel state (float32) from a sequence-classification checkpoint's tensors.

    The backbone is imported as a causal LM's (`params_from_hf_tensors`; `cfg` ties the LM head,
    see `scalar_model_config_from_hf`); `score.weight` [1, d_model] becomes the head's kernel
    [d_model], and `score.bias` [1] its bias when present (0 otherwise: GPT-2, Llama and Qwen2
    have none).
    """
    tensors = dict(tensors)
    weight, bias = tensors.pop("score.weight", None), tensors.pop("score.bias", None)
    if weight is None:
        raise RlftError(f"{source}: tensor score.weight is missing (the sequence-classification head)")
    if tuple(weight.shape) != (1, cfg.d_model):
        raise RlftError(f"{source}: tensor score.weight has shape {tuple(weight.shape)}, expected "
                        f"(1, {cfg.d_model}) (one label on d_model={cfg.d_model})")
    if bias is not None and bias.size != 1:
        raise RlftError(f"{source}: tensor score.bias has shape {tuple(bias.shape)}, expected (1,)")
    backbone = params_from_hf_tensors(cfg, tensors, source)
    values = {f"backbone.{name}": value for name, value in flatten_params(backbone).items()}
    values["head.kernel"] = np.asarray(weight, np.float32).reshape(cfg.d_model)
    values["head.bias"] = np.float32(0.0) if bias is None else np.asarray(bias, np.float32).reshape(())
    abstract = nnx.state(nnx.eval_shape(lambda: ScalarModel(cfg, rngs=nnx.Rngs(0))))
    return fill_params(abstract, values, source)


def load_hf_scalar_checkpoint(path: str) -> tuple[ModelConfig, nnx.State]:
    """(ModelConfig, ScalarModel params nnx.State) from a Hugging Face sequence-classification
    checkpoint dir (GPT2/Llama/Qwen2ForSequenceClassification, num_labels=1): a reward model whose
    score at a row's last real token equals the HF model's logits[:, 0]. `rlft.load` adds the
    tokenizer and the framing of texts (how transformers tokenises them)."""
    if not is_hf_scalar_checkpoint(path):
        raise RlftError(f"{path}: config.json names no ...{SEQUENCE_CLASSIFICATION} architecture; "
                        f"a language model loads with rlft.models.hf.load_hf_checkpoint")
    cfg = scalar_model_config_from_hf(path)
    return cfg, scalar_params_from_hf_tensors(cfg, read_safetensors(path), path)


# Our adapter targets -> the Llama/Qwen2 module names PEFT targets (torch Linear layers).
PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def save_peft_adapters(cfg: ModelConfig, adapters: dict, lora, out_dir: str, base: str | None = None,
                       overwrite: bool = False) -> None:
    """Write a LoRA stage's adapters alone as a PEFT adapter directory (adapter_config.json +
    adapter_model.safetensors), loadable with `peft.PeftModel.from_pretrained(base_model, out_dir)`.

    adapters: the stage's checkpoint params (nested, `nnx.to_pure_dict` layout, either layer layout);
    ours are A [in, r], B [r, out] on flattened weights, PEFT's lora_A [r, in] and lora_B [out, r]
    with the same alpha / r scale. Llama and Qwen2 only: GPT-2's fused c_attn has no per-q/k/v module.
    """
    import json

    from safetensors.numpy import save_file

    if cfg.family == "gpt2":
        raise RlftError("export --adapters-only: GPT-2 fuses q, k and v into one c_attn module, which rlft's "
                        "per-weight adapters do not map onto; export the merged model instead")
    flat = unstack_layers({k: np.asarray(v, np.float32) for k, v in dotted_names(adapters).items()})
    tensors = {}
    for name, value in flat.items():
        parts = name.split(".")  # layers.{i}.{attn|mlp}.{target}_lora.lora_{a|b}
        if len(parts) != 5 or parts[0] != "layers" or not parts[3].endswith("_lora"):
            continue  # not an adapter (e.g. a reward model's head)
        target, which = parts[3][: -len("_lora")], parts[4]
        prefix = f"base_model.model.model.layers.{parts[1]}.{PEFT_MODULES[target]}"
        key = f"{prefix}.lora_{'A' if which == 'lora_a' else 'B'}.weight"
        tensors[key] = np.ascontiguousarray(value.T)
    if not tensors:
        raise RlftError("export --adapters-only: the checkpoint holds no LoRA adapters")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
              "target_modules": sorted(PEFT_MODULES[t].split(".")[-1] for t in lora.targets),
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "inference_mode": True, "base_model_name_or_path": base}

    def fill(fresh: str) -> None:
        save_file(tensors, os.path.join(fresh, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(fresh, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)

    _write_dir(out_dir, overwrite, fill)

