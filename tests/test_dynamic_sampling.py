"""DAPO's dynamic sampling: the batch holds exactly the groups whose scores differ (topped up from
extra rounds of prompts drawn from (seed, step, round)), and a run with it resumes bit for bit."""

import json

import jax
import numpy as np
import pytest

from rlft.errors import RlftError
from rlft.rl.config import resolve_pg_config
from rlft.rl.dynamic_sampling import informative_groups, resample_indices, select_groups
from tests.test_rl_stage import TOK, char_reward, run, stage_config

GROUP = 2


def test_informative_groups_are_those_with_unequal_scores():
    scores = np.array([1, 1, 0, 1, 0.5, 0.5, 2, 3], np.float32)
    np.testing.assert_array_equal(informative_groups(scores, 2), [False, True, False, True])
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 2, size=(50, 4)).astype(np.float32)
    expected = [len(set(row.tolist())) > 1 for row in scores]
    np.testing.assert_array_equal(informative_groups(scores.reshape(-1), 4), expected)


def test_select_groups_takes_informative_groups_in_order_then_fills():
    round0 = np.array([1, 1, 0, 1, 2, 2], np.float32)  # groups: flat, informative, flat
    round1 = np.array([3, 4, 5, 5, 0, 1], np.float32)  # informative, flat, informative
    chosen = select_groups([round0, round1], GROUP, 3)
    # rows of the concatenated rounds: group 1 (round 0), groups 3 and 5 (round 1)
    np.testing.assert_array_equal(chosen.rows, [2, 3, 6, 7, 10, 11])
    assert (chosen.dropped, chosen.filled, chosen.informative) == (3, 0, 3)
    short = select_groups([round0], GROUP, 3)  # one informative group: two flat ones fill the batch
    np.testing.assert_array_equal(short.rows, [2, 3, 0, 1, 4, 5])
    assert (short.dropped, short.filled, short.informative) == (0, 2, 1)
    many = select_groups([round1], GROUP, 1)  # more informative groups than needed: the first
    np.testing.assert_array_equal(many.rows, [0, 1])
    assert (many.dropped, many.filled) == (1, 0)


def test_resample_indices_are_a_pure_function_of_seed_step_and_round():
    a = resample_indices(100, 8, seed=3, step=5, round_=1)
    np.testing.assert_array_equal(a, resample_indices(100, 8, seed=3, step=5, round_=1))
    assert len(set(a.tolist())) == 8 and a.max() < 100
    others = [resample_indices(100, 8, 3, 5, 2), resample_indices(100, 8, 3, 6, 1), resample_indices(100, 8, 4, 5, 1)]
    assert all(not np.array_equal(a, b) for b in others)


def test_dynamic_sampling_needs_a_group_estimator():
    with pytest.raises(RlftError, match="rl.dynamic_sampling"):
        resolve_pg_config(stage_config(algorithm="ppo", dynamic_sampling=True), TOK.eos_token_id)
    assert resolve_pg_config(stage_config(algorithm="dapo"), TOK.eos_token_id).dynamic_sampling
    assert not resolve_pg_config(stage_config(algorithm="dapo", dynamic_sampling=False),
                                 TOK.eos_token_id).dynamic_sampling


def half_flat_reward(calls):
    """Prompts with an even answer score 5 whatever the completion (flat groups); the others
    char_reward's dense score. Records every call's scores."""
    def reward(completions, recs):
        scores = np.where([int(r["answer"]) % 2 == 0 for r in recs], 5.0, char_reward(completions, recs))
        scores = scores.astype(np.float32)
        calls.append(scores)
        return scores
    return reward


def dapo_config(**overrides):
    return stage_config(algorithm="dapo", epochs=1, minibatches=1, kl=dict(controller="fixed"), steps=6,
                        **overrides)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """(work directory, params, the scores of every reward call) of an uninterrupted DAPO run."""
    workdir, calls = tmp_path_factory.mktemp("dapo_straight"), []
    params = run(workdir, half_flat_reward(calls), cfg=dapo_config())
    return workdir, params, calls


def test_the_batch_is_the_informative_groups_of_the_rounds(straight):
    workdir, _, calls = straight
    logged = [json.loads(line) for line in (workdir / "rl" / "metrics.jsonl").read_text().splitlines()]
    prompts = 4
    call = 0
    extra_rounds = 0
    for record in logged:
        rounds = int(record["rollout/resample_rounds"])
        scores = calls[call:call + rounds + 1]
        call += rounds + 1
        extra_rounds += rounds
        groups = np.concatenate(scores).reshape(-1, GROUP)
        informative = groups[groups.max(-1) != groups.min(-1)]
        flat = groups[groups.max(-1) == groups.min(-1)]
        if len(informative) < prompts:  # the rounds ran out: flat groups fill the batch
            assert rounds == 4
        if rounds:  # an extra round is drawn only while the batch cannot be filled
            before = np.concatenate(scores[:-1]).reshape(-1, GROUP)
            assert np.sum(before.max(-1) != before.min(-1)) < prompts
        batch = np.concatenate([informative[:prompts], flat[:max(prompts - len(informative), 0)]])
        np.testing.assert_allclose(record["objective/scores"], batch.mean(), rtol=1e-6)
        assert record["rollout/filled_groups"] == max(prompts - len(informative), 0)
        assert record["rollout/dropped_groups"] == len(flat) - record["rollout/filled_groups"]
        np.testing.assert_allclose(record["reward/mean"], batch.mean(), rtol=1e-6)
    assert call == len(calls) and extra_rounds > 0  # some step needed extra rounds


def test_dynamic_sampling_resumes_exactly(tmp_path, straight):
    straight_dir, straight, _ = straight
    calls = []
    inner = half_flat_reward(calls)

    def interrupted(completions, recs):
        if len(calls) == 7:  # somewhere in step 3 or 4, after the periodic save of step 2
            raise KeyboardInterrupt
        return inner(completions, recs)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", interrupted, cfg=dapo_config())
    resumed = run(tmp_path / "resumed", half_flat_reward([]), cfg=dapo_config())
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(a, b)
    assert ((tmp_path / "resumed" / "rl" / "metrics.jsonl").read_text()
            == (straight_dir / "rl" / "metrics.jsonl").read_text())
