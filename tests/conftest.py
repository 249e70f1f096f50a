"""Test setup: 8 simulated CPU devices (set before jax is imported), shared tiny HF checkpoints."""

import os

# The tests compile hundreds of small programs, where XLA:CPU's LLVM optimisations cost more time than
# they save (measured on 2 cores: tests/test_pg_step.py 82 -> 54 s, test_lora + test_sampling
# 193 -> 123 s). They change how fast the code runs, never what it computes. Subprocesses the tests
# start (multi-process runs, launchers) get them too (`TEST_XLA_FLAGS`).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 "
                           + TEST_XLA_FLAGS).strip()
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


# --- Running the suite in parallel (pytest-xdist: `-n auto --dist loadgroup`, pyproject.toml) -------
# XLA compiles on one thread and these tiny programs rarely keep two cores busy, so two worker
# processes finish the suite in about half the time of one. Each test file runs on one worker (its
# module-scoped fixtures, e.g. a tiny experiment run, are built once), files that share a
# session-scoped run form one group, and the longest groups start first so that the last one to
# finish is a short one.
SHARED_RUNS = {  # files that read the same session-scoped fixture -> one group
    "tests/experiments/test_sentiment_reward.py": "sentiment_reward_run",
    "tests/experiments/test_sentiment_dpo.py": "sentiment_reward_run",
}
LONGEST_FIRST = (  # measured on 2 cores (docs/testing.md); the rest keep their collection order
    "tests/experiments/test_sentiment_rlhf.py",
    "sentiment_reward_run",
    "tests/models/test_lora.py",
    "tests/test_multiprocess.py",
    "tests/experiments/test_rl_byo.py",
    "tests/experiments/test_general_stages.py",
    "tests/test_pg_step.py",
    "tests/test_rl_stage.py",
    "tests/test_rl_scale.py",
    "tests/test_async_rl.py",
    "tests/test_engine.py",
    "tests/test_sampling.py",
    "tests/test_preemption.py",
    "tests/experiments/test_arithmetic_grpo.py",
    "tests/experiments/test_sentiment_classify.py",
    "tests/test_sweep.py",
    "tests/models/test_hf_reward.py",
)


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 (each holds a JAX runtime with 8 host devices)."""
    return max(1, min(os.cpu_count() or 1, 4))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Group each test by file (or shared run) for `--dist loadgroup`, longest groups first."""
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    groups = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        groups[item.nodeid] = SHARED_RUNS.get(path, path)
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))
    order = {item.nodeid: i for i, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(groups[item.nodeid], len(rank)), order[item.nodeid]))
