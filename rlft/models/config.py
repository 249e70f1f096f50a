"""ModelConfig: one decoder description covering the GPT-2, Llama and Qwen2 families."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Literal

from rlft.errors import RlftError

Family = Literal["gpt2", "llama", "qwen2"]
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu", "silu")
# Rematerialisation policies by name (ModelConfig.remat); decoder.REMAT_POLICY maps them to JAX's.
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer.

    The family picks the block layout: GPT-2 = learned positions, LayerNorm, GELU MLP with biases,
    tied embeddings; Llama = RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases;
    Qwen2 = Llama with q/k/v biases. Use the `gpt2`/`llama`/`qwen2` constructors.
    """

    family: Family
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_positions: int
    norm_eps: float
    activation: str
    tie_embeddings: bool
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    rope_theta: float = 10000.0
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_positions) or None.
    rope_scaling: tuple | None = None
    dtype: str = "float32"  # compute dtype; parameters are always float32
    # Rematerialisation of each decoder block in the no-cache forward (one of REMAT_POLICIES):
    # "none" saves every activation; "full" saves only the block inputs and recomputes the rest in
    # the backward; "dots" also saves the outputs of the dense projections (not attention scores).
    remat: str = "none"
    # Stack the blocks' parameters on a leading "layers" axis and run them with `lax.scan`:
    # compile time independent of depth. Changes the parameter layout ("layers.attn.q" [L, ...]).
    scan_layers: bool = False

    def __post_init__(self):
        if self.family not in ("gpt2", "llama", "qwen2"):
            raise RlftError(f"model.family={self.family!r}: expected one of gpt2, llama, qwen2")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                     "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise RlftError(f"model.{name}={value!r}: must be an integer >= 1")
        if self.family == "gpt2" and self.n_heads * self.head_dim != self.d_model:
            raise RlftError(f"model.d_model={self.d_model}: must be a multiple of model.n_heads={self.n_heads}")
        if not (isinstance(self.norm_eps, numbers.Real) and 0 < self.norm_eps < math.inf):
            raise RlftError(f"model.norm_eps={self.norm_eps!r}: must be a finite number > 0")
        if self.n_heads % self.n_kv_heads:
            raise RlftError(
                f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}"
            )
        if self.activation not in ACTIVATIONS:
            raise RlftError(f"model.activation={self.activation!r}: expected one of {ACTIVATIONS}")
        if self.dtype not in ("float32", "bfloat16"):
            raise RlftError(f"model.dtype={self.dtype!r}: expected float32 or bfloat16")
        if self.remat not in REMAT_POLICIES:
            raise RlftError(f"model.remat={self.remat!r}: expected one of {', '.join(REMAT_POLICIES)}")
        if not isinstance(self.scan_layers, bool):
            raise RlftError(f"model.scan_layers={self.scan_layers!r}: must be true or false")

    @property
    def uses_rope(self) -> bool:
        """Llama/Qwen2 rotate q and k; GPT-2 adds a learned position table instead."""
        return self.family != "gpt2"

    @property
    def gated_mlp(self) -> bool:
        """SwiGLU (gate * up) for Llama/Qwen2; a plain two-layer MLP for GPT-2."""
        return self.family != "gpt2"

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (e.g. `dtype="bfloat16"`)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready dict; `ModelConfig.from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from `to_dict` output (or a config section), naming any unknown key."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise RlftError(f"unknown model config field(s) {unknown}; valid fields: {sorted(names)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in d and f.default is dataclasses.MISSING)
        if missing:
            raise RlftError(f"missing model config field(s) {missing}")
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = tuple(d["rope_scaling"])
        return cls(**d)

    @classmethod
    def gpt2(cls, vocab_size=50257, d_model=768, n_layers=12, n_heads=12, max_positions=1024,
             d_ff=None, norm_eps=1e-5, activation="gelu_new", **kw) -> "ModelConfig":
        """GPT-2 family (defaults: GPT-2 small)."""
        return cls(family="gpt2", vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                   n_heads=n_heads, n_kv_heads=n_heads, head_dim=d_model // n_heads,
                   d_ff=d_ff or 4 * d_model, max_positions=max_positions, norm_eps=norm_eps,
                   activation=activation, tie_embeddings=True, qkv_bias=True, out_bias=True,
                   mlp_bias=True, **kw)

    @classmethod
    def llama(cls, vocab_size, d_model, n_layers, n_heads, n_kv_heads, d_ff, max_positions=2048,
              head_dim=None, norm_eps=1e-6, rope_theta=10000.0, tie_embeddings=False,
              attention_bias=False, mlp_bias=False, **kw) -> "ModelConfig":
        """Llama family (RoPE, RMSNorm, SwiGLU, GQA)."""
        return cls(family="llama", vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                   n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim or d_model // n_heads,
                   d_ff=d_ff, max_positions=max_positions, norm_eps=norm_eps, activation="silu",
                   tie_embeddings=tie_embeddings, qkv_bias=attention_bias, out_bias=attention_bias,
                   mlp_bias=mlp_bias, rope_theta=rope_theta, **kw)

    @classmethod
    def qwen2(cls, vocab_size, d_model, n_layers, n_heads, n_kv_heads, d_ff, max_positions=32768,
              head_dim=None, norm_eps=1e-6, rope_theta=10000.0, tie_embeddings=False,
              **kw) -> "ModelConfig":
        """Qwen2 family (Llama with q/k/v biases)."""
        return cls(family="qwen2", vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                   n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim or d_model // n_heads,
                   d_ff=d_ff, max_positions=max_positions, norm_eps=norm_eps, activation="silu",
                   tie_embeddings=tie_embeddings, qkv_bias=True, out_bias=False, mlp_bias=False,
                   rope_theta=rope_theta, **kw)


def tiny_config(family: Family = "gpt2", vocab_size: int = 512, **kw) -> ModelConfig:
    """The benchmark's tiny shape (4 layers, 4 heads, d 256) in any family."""
    if family == "gpt2":
        return ModelConfig.gpt2(vocab_size=vocab_size, d_model=256, n_layers=4, n_heads=4,
                                max_positions=kw.pop("max_positions", 256), **kw)
    ctor = ModelConfig.llama if family == "llama" else ModelConfig.qwen2
    return ctor(vocab_size=vocab_size, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=688,
                max_positions=kw.pop("max_positions", 256), **kw)


# Named shapes of public checkpoints, from each model's Hugging Face config.json (architecture
# only: no weights). `model_config(name)` looks them up; the memory planner (`rlft plan`) and the
# parameter-count tests use them without ever materialising a parameter.
NAMED_CONFIGS: dict[str, Any] = {
    # openai-community/gpt2 (124M): the GPT2Config defaults.
    "gpt2": lambda: ModelConfig.gpt2(),
    # meta-llama/Llama-2-7b-hf (6.74B).
    "llama2_7b": lambda: ModelConfig.llama(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008,
        max_positions=4096, norm_eps=1e-5, rope_theta=10000.0),
    # meta-llama/Meta-Llama-3-8B (8.03B; plain RoPE, no llama3 scaling, which came with 3.1).
    "llama3_8b": lambda: ModelConfig.llama(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
        max_positions=8192, norm_eps=1e-5, rope_theta=500000.0),
    # Qwen/Qwen2-7B (7.62B; the base model's config.json; Qwen2-7B-Instruct says 32768 positions).
    "qwen2_7b": lambda: ModelConfig.qwen2(
        vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, d_ff=18944,
        max_positions=131072, norm_eps=1e-6, rope_theta=1000000.0),
    # The benchmark's tiny shapes (`tiny_config`, vocabulary 512).
    "tiny_gpt2": lambda: tiny_config("gpt2"),
    "tiny_llama": lambda: tiny_config("llama"),
    "tiny_qwen2": lambda: tiny_config("qwen2"),
}


def _name_key(name: str) -> str:
    """Case, '-', '_' and '.' do not matter: 'Llama-2-7B' and 'llama2_7b' are the same name."""
    return "".join(c for c in name.lower() if c.isalnum())


def model_config(name: str, **changes: Any) -> ModelConfig:
    """The named ModelConfig (`NAMED_CONFIGS`), with optional field changes (e.g. dtype="bfloat16")."""
    by_key = {_name_key(n): n for n in NAMED_CONFIGS}
    canonical = by_key.get(_name_key(str(name)))
    if canonical is None:
        raise RlftError(f"unknown model {name!r}; named models: {', '.join(NAMED_CONFIGS)}")
    cfg = NAMED_CONFIGS[canonical]()
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise RlftError(f"model {canonical}: unknown model config field(s) {unknown}")
    return cfg.replace(**changes) if changes else cfg


def model_section(**shape: Any):
    """An experiment's `model` config section: a GPT-2-family shape (`shape`: d_model, n_layers,
    n_heads, max_positions, ...) plus `name` ("" = that shape; else a NAMED_CONFIGS model, e.g.
    `--config.model=llama2_7b`), `remat` and `scan_layers`."""
    import ml_collections

    return ml_collections.ConfigDict(dict(name="", **shape, remat="none", scan_layers=False))


def model_from_section(section: Any, vocab_size: int) -> ModelConfig:
    """The ModelConfig a `model_section` describes, for a tokenizer of `vocab_size` tokens.

    A named model keeps its own shape (the section's shape fields are then unused) and vocabulary,
    which must hold the tokenizer's; `remat` and `scan_layers` apply either way.
    """
    fields = dict(section)
    name = fields.pop("name", "")
    runtime = {k: fields.pop(k) for k in ("remat", "scan_layers", "dtype") if k in fields}
    if not name:
        return ModelConfig.gpt2(vocab_size=vocab_size, **fields, **runtime)
    cfg = model_config(name, **runtime)
    if vocab_size > cfg.vocab_size:
        raise RlftError(f"model.name={name!r}: its vocabulary ({cfg.vocab_size} tokens) is smaller than the "
                        f"tokenizer's ({vocab_size}); raise the model's or lower tokenizer.vocab_size")
    return cfg
