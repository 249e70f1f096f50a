"""A reward model as an RL reward (rlft/rl/reward_model.py, rlft/rl/reward_step.py): the rollout's
token ids framed on device == the texts tokenised on the host (the independent reference:
`truncate` + right-padded `sequence_scores`), on one device and on a 2 × 2 mesh, one compile per
run, and the other-vocabulary path == the text path."""

import copy
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlft.data.batching import truncate
from rlft.errors import RlftError
from rlft.generate.sampling import Sequences
from rlft.generate.scoring import sequence_scores
from rlft.models import ScalarModel
from rlft.models.decoder import positions_from_mask
from rlft.parallel.sharding import make_mesh, state_shardings
from rlft.rl.reward_model import ModelReward, rollout_scores
from rlft.rl.reward_step import make_rollout_scorer
from tests.pairs_util import random_params
from tests.test_rl_stage import CFG, TOK

EOS, PAD = TOK.eos_token_id, TOK.pad_token_id
PROMPT_WIDTH, NEW = 6, 5
# (prompt text, completion text, ended with EOS); "^" opens the prompt with EOS (a policy's own BOS).
ROWS = [("1+2=", "3", True), ("^3+4=", "7+1=8", False), ("2=", "", True), ("^9*9=", "81", True),
        ("5-3=", "2=12", False), ("^0=", "0", True), ("7+7=", "14", True), ("8=", "8888", False)]


def encode(text: str) -> list[int]:
    bos = [EOS] if text.startswith("^") else []
    return bos + TOK.encode(text.lstrip("^"), add_special_tokens=False)


def rollout() -> Sequences:
    """The rows of ROWS in the sampler's layout: left-padded prompts, completions up to and
    including the first EOS, padding after it (segment 0)."""
    tokens = np.full((len(ROWS), PROMPT_WIDTH + NEW), PAD, np.int32)
    segments = np.zeros_like(tokens)
    for i, (prompt, completion, ended) in enumerate(ROWS):
        p, c = encode(prompt), TOK.encode(completion, add_special_tokens=False) + ([EOS] if ended else [])
        assert len(p) <= PROMPT_WIDTH and len(c) <= NEW
        tokens[i, PROMPT_WIDTH - len(p):PROMPT_WIDTH] = p
        tokens[i, PROMPT_WIDTH:PROMPT_WIDTH + len(c)] = c
        segments[i, PROMPT_WIDTH - len(p):PROMPT_WIDTH + len(c)] = 1
    mask = segments[:, PROMPT_WIDTH:].astype(np.float32)
    return Sequences(tokens=jnp.asarray(tokens), positions=positions_from_mask(jnp.asarray(segments)),
                     segment_ids=jnp.asarray(segments), completion_mask=jnp.asarray(mask),
                     logprobs=jnp.zeros(mask.shape, jnp.float32))


@pytest.fixture(scope="module")
def reward_model():
    graphdef, params = random_params(lambda: ScalarModel(CFG, rngs=nnx.Rngs(0), head_init_std=1.0), seed=5)
    return graphdef, params


def on_mesh(params, mesh):
    return jax.device_put(params, state_shardings(params, mesh))


def reference_scores(graphdef, params, bos, eos, max_length) -> np.ndarray:
    """Each row framed in Python (BOS unless the prompt opens with it, EOS unless the completion
    ended with it, `truncate`) and scored right-padded by `sequence_scores`."""
    examples = []
    for prompt, completion, ended in ROWS:
        p, c = encode(prompt), TOK.encode(completion, add_special_tokens=False) + ([EOS] if ended else [])
        if bos is not None and p[0] != bos:
            p = [bos] + p
        if eos is not None and not ended:
            c = c + [eos]
        examples.append(truncate(p, c, max_length))
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    return sequence_scores(graphdef, on_mesh(params, mesh), examples, max_length, PAD, mesh, len(examples))


@pytest.mark.parametrize("bos, eos, max_length", [(None, None, 32), (EOS, EOS, 32), (EOS, None, 32),
                                                  (None, EOS, 9), (EOS, EOS, 5), (EOS, EOS, 1)])
def test_rollout_token_ids_score_like_the_framed_texts(reward_model, bos, eos, max_length):
    graphdef, params = reward_model
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    got = jax.jit(lambda p, s: rollout_scores(graphdef, p, s, bos_id=bos, eos_id=eos, max_length=max_length))(
        on_mesh(params, mesh), rollout())
    np.testing.assert_allclose(got, reference_scores(graphdef, params, bos, eos, max_length), rtol=1e-5, atol=1e-5)


STATS = {"mean": 0.25, "std": 2.0, "add_bos": True, "add_eos": True, "max_length": 12}
RECORDS = [{"ids": encode(p), "text": p.lstrip("^"), "answer": "3"} for p, _, _ in ROWS]


def scorer_scores(reward: ModelReward, mesh, chunk_rows=0, tokenizer=TOK) -> np.ndarray:
    score = make_rollout_scorer(reward, tokenizer=tokenizer, prompts=RECORDS, mesh=mesh, chunk_rows=chunk_rows)
    seqs = jax.device_put(rollout(), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
    out, metrics = score(seqs, np.arange(len(ROWS)), lambda: "rl step 1")
    assert metrics == {} and out.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))  # pg_step's batch sharding
    return np.asarray(out)


def test_the_rl_scorer_on_token_ids_equals_the_text_path_sharded_and_chunked(reward_model, caplog):
    """The token-id path (same vocabulary) == ModelReward called on the decoded texts (the host
    path: re-encoded, normalised), on 1 device and on a (data 2, tensor 2) mesh with 2-row
    chunks; the scoring program compiles once for two rollouts."""
    graphdef, params = reward_model
    one = make_mesh((1, 1, 1), jax.devices()[:1])
    reward = ModelReward(graphdef=graphdef, params=on_mesh(params, one), tokenizer=TOK, stats=STATS)
    texts = [c for _, c, _ in ROWS]
    expected = reward(texts, RECORDS)
    np.testing.assert_allclose(scorer_scores(reward, one), expected, rtol=1e-5, atol=1e-5)
    mesh = make_mesh((2, 1, 2), jax.devices()[:4])
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        caplog.clear()
        score = make_rollout_scorer(reward, tokenizer=TOK, prompts=RECORDS, mesh=mesh, chunk_rows=2)
        for _ in range(2):
            seqs = jax.device_put(rollout(), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
            got = np.asarray(score(seqs, np.arange(len(ROWS)), lambda: "rl step 1")[0])
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()
                and "rollout_scores" in r.getMessage()]
    assert len(compiles) == 1, compiles


def test_each_device_scores_its_own_rows(reward_model):
    """On a data-parallel mesh the scoring program has no collective: no device reads another's rows."""
    graphdef, params = reward_model
    mesh = make_mesh((4, 1, 1), jax.devices()[:4])
    seqs = jax.device_put(rollout(), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    score = jax.jit(lambda p, s: rollout_scores(graphdef, p, s, bos_id=EOS, eos_id=EOS, max_length=12))
    hlo = score.lower(on_mesh(params, mesh), seqs).compile().as_text()
    assert not [op for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute") if op in hlo]


def test_another_vocabulary_is_re_encoded_at_a_fixed_width(reward_model):
    """A reward model whose tokenizer differs from the policy's scores the decoded texts with its
    own tokenizer: equal to its text path, on a 2-device data mesh."""
    graphdef, params = reward_model
    other = copy.deepcopy(TOK)
    other.add_tokens(["<unused>"])  # another vocabulary: the token ids cannot be passed through
    mesh = make_mesh((2, 1, 1), jax.devices()[:2])
    reward = ModelReward(graphdef=graphdef, params=params, tokenizer=other, stats=STATS)
    assert not reward.shares_vocabulary(TOK)
    assert ModelReward(graphdef=graphdef, params=params, tokenizer=copy.deepcopy(TOK), stats=STATS
                       ).shares_vocabulary(TOK)
    np.testing.assert_allclose(scorer_scores(reward, mesh), reward([c for _, c, _ in ROWS], RECORDS),
                               rtol=1e-5, atol=1e-5)


def test_a_reward_already_on_the_mesh_is_not_copied(reward_model):
    """on_mesh keeps the same arrays (a critic started from them shares the buffers); another mesh
    gets a sharded copy; normalize without stats is refused."""
    graphdef, params = reward_model
    mesh = make_mesh((2, 1, 1), jax.devices()[:2])
    reward = ModelReward(graphdef=graphdef, params=on_mesh(params, mesh), tokenizer=TOK, stats=STATS)
    assert reward.on_mesh(mesh) is reward
    moved = reward.on_mesh(make_mesh((1, 1, 2), jax.devices()[:2]))
    assert moved.mesh.shape["tensor"] == 2 and moved.params is not reward.params
    with pytest.raises(RlftError, match="reward_stats.json"):
        ModelReward(graphdef=graphdef, params=params, tokenizer=TOK, stats=None)


def test_a_weighted_sum_of_rewards_logs_each_mean(reward_model):
    """rl.rewards=reward_model,length,format,module:function with weights: the total is the weighted
    sum of each reward scored alone (the model on the mesh, the length penalty from the mask, the
    text ones on the host), and each one's mean is a metric."""
    from rlft.rl.rewards import LengthPenalty, build_rewards, format_match

    graphdef, params = reward_model
    mesh = make_mesh((2, 1, 1), jax.devices()[:2])
    model = ModelReward(graphdef=graphdef, params=on_mesh(params, mesh), tokenizer=TOK, stats=STATS)
    texts = [c for _, c, _ in ROWS]
    parts = [("reward_model", 0.5, model), ("length", 2.0, LengthPenalty(NEW, 2)),
             ("format", -1.0, format_match(r"[0-9]+"))]
    parts += build_rewards("tests.test_rl_stage:char_reward", "3")
    seqs = jax.device_put(rollout(), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    total, metrics = make_rollout_scorer(parts, tokenizer=TOK, prompts=RECORDS, mesh=mesh)(
        seqs, np.arange(len(ROWS)), lambda: "rl step 1")
    lengths = np.array([len(TOK.encode(c)) + ended for _, c, ended in ROWS])
    alone = {"reward_model": model(texts, RECORDS),
             "length": -np.clip((lengths - (NEW - 2)) / 2, 0, 1),  # DAPO: 0 up to 3 tokens, -1 at 5
             "format": np.array([float(c.strip().isdigit()) for c in texts]),
             "tests.test_rl_stage:char_reward": np.array([c.count("1") / 4 + (c == "3") for c in texts])}
    assert alone["length"].min() == -1 and alone["length"].max() == 0
    np.testing.assert_allclose(total, sum(w * alone[n] for n, w, _ in parts), rtol=1e-5, atol=1e-5)
    assert sorted(metrics) == sorted(f"rewards/{n}/mean" for n in alone)
    single, none = make_rollout_scorer(parts[1:2], tokenizer=TOK, prompts=RECORDS, mesh=mesh)(
        seqs, np.arange(len(ROWS)), lambda: "rl step 1")  # one reward: weighted, no per-reward metric
    np.testing.assert_allclose(single, 2.0 * alone["length"], rtol=1e-6)
    assert none == {}
    for name, values in alone.items():
        np.testing.assert_allclose(metrics[f"rewards/{name}/mean"], values.mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("names, weights, error", [
    ("", "", "rl.rewards is empty"),
    ("exact_match,bleu", "", "rl.rewards='bleu': expected one of"),
    ("exact_match,exact_match", "", "named twice"),
    ("exact_match,format", "1", "expected 2 finite numbers"),
    ("exact_match", "x", "expected comma-separated numbers"),
    ("format", "", "set rl.format_pattern"),
    ("reward_model", "", "set rl.reward_model"),
    ("no_such_module:f", "", "cannot import it"),
])
def test_bad_reward_lists_are_named(names, weights, error):
    from rlft.rl.rewards import build_rewards

    with pytest.raises(RlftError, match=error):
        build_rewards(names, weights, max_new_tokens=8, length_buffer=4)
