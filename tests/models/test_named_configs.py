"""Named model configs (Llama-2-7B, Llama-3-8B, Qwen2-7B, GPT-2): the public config.json values
import to exactly the named config, the parameter counts are the published ones (from abstract
shapes only), and a 2-layer model with each family's flags (RoPE theta, GQA ratio, biases, tying,
norm eps) matches transformers' logits.
"""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

import rlft
from rlft.errors import RlftError
from rlft.models import Decoder, model_config
from rlft.models.hf import model_config_from_hf
from tests.conftest import save_random_hf_model
from tests.models.test_hf_parity import _inputs, _torch_logits

# The architecture fields of each model's Hugging Face config.json.
HF_CONFIGS = {
    "gpt2": {  # openai-community/gpt2
        "model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
        "n_head": 12, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5},
    "llama2_7b": {  # meta-llama/Llama-2-7b-hf
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False},
    "llama3_8b": {  # meta-llama/Meta-Llama-3-8B
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False},
    "qwen2_7b": {  # Qwen/Qwen2-7B
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "use_sliding_window": False,
        "sliding_window": 131072, "max_window_layers": 28},
}

# Published parameter counts (embeddings included; GPT-2's lm_head is tied).
PARAMETERS = {"gpt2": 124_439_808, "llama2_7b": 6_738_415_616, "llama3_8b": 8_030_261_248,
              "qwen2_7b": 7_615_616_512}

# 2 layers, a small width and vocabulary; the same query/kv head ratio and every other flag.
SCALED = {
    "gpt2": {"vocab_size": 96, "n_embd": 64, "n_layer": 2, "n_head": 4},
    "llama2_7b": {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 4},
    "llama3_8b": {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 224, "num_hidden_layers": 2,
                  "num_attention_heads": 8, "num_key_value_heads": 2},
    "qwen2_7b": {"vocab_size": 96, "hidden_size": 112, "intermediate_size": 592, "num_hidden_layers": 2,
                 "num_attention_heads": 7, "num_key_value_heads": 1},
}
# The ModelConfig fields the scaling changes (everything else must equal the named config).
SCALED_FIELDS = ("vocab_size", "d_model", "d_ff", "n_layers", "n_heads", "n_kv_heads", "head_dim")


def _write_config(path, fields: dict) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(fields))
    return str(path)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_public_config_json_imports_to_the_named_config(name, tmp_path):
    assert model_config_from_hf(_write_config(tmp_path, HF_CONFIGS[name])) == model_config(name)


@pytest.mark.parametrize("name", list(PARAMETERS))
def test_parameter_count_from_abstract_shapes(name):
    cfg = model_config(name)
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    leaves = jax.tree.leaves(abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing materialised
    assert sum(math.prod(x.shape) for x in leaves) == PARAMETERS[name]


@pytest.mark.parametrize("name", list(SCALED))
def test_scaled_down_family_matches_transformers(name, tmp_path):
    import torch
    import transformers as tf

    fields = {**HF_CONFIGS[name], **SCALED[name], "bos_token_id": 0, "eos_token_id": 1}
    model_type = fields.pop("model_type")
    config_cls, model_cls = {"gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel),
                             "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                             "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[model_type]
    torch.manual_seed(0)
    torch_model = save_random_hf_model(config_cls(**fields), model_cls, tmp_path)
    model = rlft.load(str(tmp_path))
    # The checkpoint differs from the named config only in the scaled sizes.
    scaled = {f: getattr(model.config, f) for f in SCALED_FIELDS}
    assert model.config == model_config(name, **scaled)
    ids, mask = _inputs(left_pad=True)
    real = mask.astype(bool)
    np.testing.assert_allclose(model.logits(ids, mask)[real], _torch_logits(torch_model, ids, mask)[real],
                               atol=1e-4, rtol=0)


def test_named_lookup_ignores_case_and_separators():
    assert model_config("Llama-2-7B") == model_config("llama2_7b")
    assert model_config("Qwen2-7B", dtype="bfloat16").dtype == "bfloat16"


def test_unknown_name_lists_the_names():
    with pytest.raises(RlftError, match=r"unknown model 'llama-7b'; named models: gpt2, llama2_7b, "
                                        r"llama3_8b, qwen2_7b"):
        model_config("llama-7b")
    with pytest.raises(RlftError, match=r"unknown model config field\(s\) \['layers'\]"):
        model_config("gpt2", layers=2)
