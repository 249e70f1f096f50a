"""Test setup: 8 simulated CPU devices (set before jax is imported), shared tiny HF checkpoints."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for the session (and the subprocesses it starts): many tests
# compile the same programs again (a resumed run, a second stage with a new closure); a fresh
# directory per session, so nothing is ever read from an earlier checkout. Measured: the RL resume
# test 55 s -> 40 s.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="rlft-tests-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.05")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


def tiny_hf_configs():
    """Tiny random configs of the three families, built with transformers (the reference)."""
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return {
        "gpt2": (tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               bos_token_id=0, eos_token_id=1), tf.GPT2LMHeadModel),
        "llama": (tf.LlamaConfig(**common, bos_token_id=0, eos_token_id=1), tf.LlamaForCausalLM),
        "llama_bias_tied": (tf.LlamaConfig(**common, attention_bias=True, mlp_bias=True,
                                           tie_word_embeddings=True, bos_token_id=0, eos_token_id=1),
                            tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config(**common, bos_token_id=0, eos_token_id=1), tf.Qwen2ForCausalLM),
    }


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """{name: (dir, torch model)}: random tiny models saved with save_pretrained
    (`save_random_hf_model`)."""
    import torch

    torch.manual_seed(0)
    out = {}
    for name, (config, cls) in tiny_hf_configs().items():
        path = tmp_path_factory.mktemp(name)
        out[name] = (str(path), save_random_hf_model(config, cls, path))
    return out


def save_random_hf_model(config, cls, path):
    """A random transformers model of `cls(config)` saved to `path` with save_pretrained; returned.

    Norm scales and biases get noise (they start at exactly 1/0), so a mapping error shows up.
    """
    import torch

    model = cls(config).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model
