"""RL hyper-parameters: the `rl` config section, per-algorithm defaults, and their validation.

`--config.rl.algorithm=ppo|grpo|rloo|reinforce|gspo|dapo|cispo|dr_grpo` picks a family's defaults;
every component is its own field and overrides them (a field left at None takes the algorithm's
value). With several updates per rollout, `rl.old_logprobs` says where the old policy's logprobs
come from: "recompute" (a forward before the first update, the default) or "sampler" (the
sampler's own, which are those of the same distribution; trl's PPO does this; saves a forward):

| field             | ppo        | grpo      | rloo       | reinforce  | gspo      | dapo       | cispo      | dr_grpo      |
|-------------------|------------|-----------|------------|------------|-----------|------------|------------|--------------|
| advantage         | gae        | grpo      | rloo       | reinforce  | grpo      | grpo       | grpo       | grpo         |
| critic            | separate   | none      | none       | none       | none      | none       | none       | none         |
| kl.placement      | reward     | loss      | reward     | reward     | loss      | loss       | loss       | loss         |
| kl.estimator      | k1         | k3        | k1         | k1         | k3        | k3         | k3         | k3           |
| kl.coef           | 0.05       | 0.04      | 0.05       | 0.05       | 0         | 0          | 0          | 0            |
| loss_aggregation  | token-mean | seq-mean- | token-mean | token-mean | seq-mean- | token-mean | token-mean | fixed-length |
|                   |            | token-mean|            |            | token-mean|            |            |              |
| whiten_advantages | True       | False     | False      | False      | False     | False      | False      | False        |
| clip              | True       | True      | True       | False      | True      | True       | True       | True         |
| clip_eps_low/high | 0.2/0.2    | 0.2/0.2   | 0.2/0.2    | 0.2/0.2    | 3e-4/4e-4 | 0.2/0.28   | 0.2/0.28   | 0.2/0.2      |
| policy_loss       | clipped    | clipped   | clipped    | clipped    | clipped   | clipped    | cispo      | clipped      |
| ratio_level       | token      | token     | token      | token      | sequence  | token      | token      | token        |
| dynamic_sampling  | False      | False     | False      | False      | False     | True       | False      | False        |
| grpo_scale_by_std | True       | True      | True       | True       | True      | True       | True       | False        |
| epochs            | 4          | 1         | 1          | 1          | 1         | 1          | 1          | 1            |

Beside them: `rl.tis=none|token|sequence` with `rl.tis_cap` (truncated importance sampling of the
loss by min(π_trainer/π_sampler, cap) against the sampler/trainer mismatch; logged as
policy/sampler_mismatch_kl either way) and `rl.mask_truncated` (completions that reach
max_new_tokens without EOS are left out of the loss). `rl.dynamic_sampling` (DAPO's; group
estimators) keeps only groups whose scores differ and draws up to `rl.max_resample_rounds` extra
rounds of prompts to fill the batch (`rlft.rl.dynamic_sampling`).

Asynchronous RL: `rl.max_staleness=K` (0: the synchronous loop) samples the rollouts of steps
t+1..t+K while step t updates (`rlft.rl.stage`), so step t trains on a rollout of the policy K
versions old (logged as async/staleness); `rl.off_policy=none|tis|decoupled` corrects for it:
"tis" puts rl.tis's capped weights min(π_old/π_behaviour, rl.tis_cap) on the loss (token level
unless rl.tis=sequence), "decoupled" is AReaL's decoupled PPO: the clip around the current
(proximal) policy, times the uncapped π_proximal/π_behaviour per token. `rl.rollout_slots=S` (> 0)
samples the rollouts with the continuous-batching engine (`rlft.generate.engine`, S slots split
over the sampler's batch shards, in one process or several): the same completions as the static
sampler, sooner when their lengths differ.

`resolve_pg_config(section)` validates everything before any work starts and returns a frozen,
hashable `PGConfig` (a static argument of the jitted step). Errors name the field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import ml_collections
import numpy as np
from ml_collections.config_dict import placeholder

from rlft.errors import RlftError
from rlft.generate.logprobs import SamplingParams
from rlft.models.lora import lora_section
from rlft.objectives.advantages import check_estimator
from rlft.objectives.kl import (check_kl_coef, check_kl_controller, check_kl_estimator,
                                check_kl_placement)
from rlft.objectives.pg import RATIO_LEVELS, check_aggregation, check_pg_args, check_policy_loss

ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce", "gspo", "dapo", "cispo", "dr_grpo")
CRITICS = ("none", "separate", "shared")

_GROUP = dict(advantage="grpo", critic="none", kl_placement="loss", kl_estimator="k3", whiten_advantages=False,
              clip=True, epochs=1)
ALGORITHM_DEFAULTS: dict[str, dict] = {
    "ppo": dict(advantage="gae", critic="separate", kl_placement="reward", kl_estimator="k1",
                kl_coef=0.05, loss_aggregation="token-mean", whiten_advantages=True, clip=True,
                epochs=4),
    "grpo": dict(_GROUP, kl_coef=0.04, loss_aggregation="seq-mean-token-mean"),
    "rloo": dict(advantage="rloo", critic="none", kl_placement="reward", kl_estimator="k1",
                 kl_coef=0.05, loss_aggregation="token-mean", whiten_advantages=False, clip=True,
                 epochs=1),
    "reinforce": dict(advantage="reinforce", critic="none", kl_placement="reward", kl_estimator="k1",
                      kl_coef=0.05, loss_aggregation="token-mean", whiten_advantages=False,
                      clip=False, epochs=1),
    # GSPO (Zheng et al. 2025): the sequence's length-normalised ratio on every token, a narrow clip.
    "gspo": dict(_GROUP, kl_coef=0.0, loss_aggregation="seq-mean-token-mean", ratio_level="sequence",
                 clip_eps_low=3e-4, clip_eps_high=4e-4),
    # DAPO (Yu et al. 2025): clip-higher, token-level loss, no KL (pair it with the `length` reward).
    "dapo": dict(_GROUP, kl_coef=0.0, loss_aggregation="token-mean", clip_eps_high=0.28, dynamic_sampling=True),
    # CISPO (MiniMax-M1 2025): a clipped, constant importance weight on every token's log-prob.
    "cispo": dict(_GROUP, kl_coef=0.0, loss_aggregation="token-mean", policy_loss="cispo", clip_eps_high=0.28),
    # Dr. GRPO (Liu et al. 2025): no std scaling of the advantages, a constant length normaliser.
    "dr_grpo": dict(_GROUP, kl_coef=0.0, loss_aggregation="fixed-length", grpo_scale_by_std=False),
}
# Fields every algorithm shares unless its row above says otherwise.
COMMON_DEFAULTS = dict(policy_loss="clipped", ratio_level="token", clip_eps_low=0.2, clip_eps_high=0.2,
                       grpo_scale_by_std=True, dynamic_sampling=False)
for _row in ALGORITHM_DEFAULTS.values():
    for _field, _value in COMMON_DEFAULTS.items():
        _row.setdefault(_field, _value)


def rl_stage_config(steps: int, prompts_per_step: int, group_size: int, learning_rate: float,
                    max_new_tokens: int, algorithm: str = "grpo", **overrides) -> ml_collections.ConfigDict:
    """The `rl` section of an experiment: one step = prompts_per_step × group_size completions.

    Fields at None take the algorithm's defaults (module table); each is declared with its type
    (`placeholder(bool)` etc.), so `--config.rl.clip=false` parses to False, never to the string
    'false'. Sampling: temperature, top_k, top_p (logprobs everywhere are those of this distribution).
    Memory at scale: `experience_chunk` rows per forward of the experience (0 = all rows at once),
    `accum_steps` micro-batches per minibatch update, `vocab_chunk` vocabulary columns per block of
    the log-probs (0 = the whole vocabulary; needs untruncated sampling).
    """
    section = dict(
        algorithm=algorithm, steps=steps, prompts_per_step=prompts_per_step, group_size=group_size,
        max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
        learning_rate=learning_rate, critic_learning_rate=placeholder(float), warmup_steps=0,
        weight_decay=0.0, clip_norm=1.0, accum_steps=1, experience_chunk=0, vocab_chunk=0,
        advantage=placeholder(str), critic=placeholder(str), gamma=1.0, lam=0.95,
        whiten_advantages=placeholder(bool),
        grpo_scale_by_std=placeholder(bool), grpo_ddof=1, grpo_eps=1e-4, baseline_decay=0.9,
        clip=placeholder(bool), clip_eps_low=placeholder(float), clip_eps_high=placeholder(float),
        policy_loss=placeholder(str), ratio_level=placeholder(str), tis="none", tis_cap=2.0,
        mask_truncated=False, dynamic_sampling=placeholder(bool), max_resample_rounds=4,
        max_staleness=0, off_policy="none", rollout_slots=0, vf_coef=0.1, vf_clip=0.2,
        entropy_coef=0.0, loss_aggregation=placeholder(str), epochs=placeholder(int), minibatches=1,
        old_logprobs="recompute", no_eos_penalty=0.0,
        kl=ml_collections.ConfigDict(dict(coef=placeholder(float), estimator=placeholder(str),
                                          placement=placeholder(str), controller="fixed", target=6.0,
                                          horizon=10000.0)),
        save_every=max(steps // 4, 1), keep=2, max_nonfinite_steps=3, lora=lora_section(),
    )
    cfg = ml_collections.ConfigDict(section)
    cfg.update(overrides)
    return cfg


@dataclasses.dataclass(frozen=True)
class PGConfig:
    """Every static choice of the policy-gradient step, resolved and validated (hashable)."""

    advantage: str
    critic: str
    gamma: float
    lam: float
    whiten_advantages: bool
    grpo_scale_by_std: bool
    grpo_ddof: int
    grpo_eps: float
    baseline_decay: float
    kl_coef: float  # the initial coefficient; the current one lives in the state
    kl_estimator: str
    kl_placement: str
    kl_controller: str
    kl_target: float
    kl_horizon: float
    clip: bool
    clip_eps_low: float
    clip_eps_high: float
    policy_loss: str  # a key of objectives.pg.POLICY_LOSSES
    ratio_level: str  # "token" or "sequence" (GSPO)
    tis: str  # truncated importance sampling against the sampler: "none", "token", "sequence"
    tis_cap: float
    mask_truncated: bool  # completions cut at max_new_tokens (no EOS) are left out of the loss
    dynamic_sampling: bool  # DAPO: only groups whose scores differ; extra rounds fill the batch
    max_resample_rounds: int
    max_staleness: int  # asynchronous RL: rollouts sampled this many policy versions ahead (0 = synchronous)
    rollout_slots: int  # > 0: the rollout runs on the continuous-batching engine with that many slots
    vf_coef: float
    vf_clip: float
    entropy_coef: float
    loss_aggregation: str
    epochs: int
    minibatches: int
    old_logprobs: str  # "recompute" (a forward before the updates) or "sampler" (the sampler's)
    accum_steps: int
    experience_chunk: int  # rows per forward of the experience (0 = all)
    vocab_chunk: int  # vocabulary columns per log-prob block (0 = all)
    group_size: int
    max_new_tokens: int
    no_eos_penalty: float
    eos_ids: tuple[int, ...]  # a completion ends at any of them
    sampling: SamplingParams

    @property
    def uses_reference(self) -> bool:
        """A reference forward is needed unless the KL coefficient is fixed at 0."""
        return self.kl_coef > 0 or self.kl_controller == "adaptive"

    @property
    def single_update(self) -> bool:
        """One update per rollout: the old policy is the current one (its logprobs, detached)."""
        return self.epochs * self.minibatches == 1

    @property
    def recompute_old_logprobs(self) -> bool:
        """Several updates and old_logprobs="recompute": one forward before the first update."""
        return not self.single_update and self.old_logprobs == "recompute"


def _pick(section: ml_collections.ConfigDict, defaults: dict, field: str, key: str | None = None):
    value = section[field] if key is None else section.kl[key]
    return defaults[field if key is None else f"kl_{key}"] if value is None else value


def _positive_int(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RlftError(f"{field}={value!r}: must be an integer >= 1")
    return value


def _non_negative_int(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RlftError(f"{field}={value!r}: must be an integer >= 0 (0 = off)")
    return value


def _flag(value, field: str) -> bool:
    """A boolean field; anything else (the string 'false', 0, None) is refused, never truth-tested."""
    if not isinstance(value, bool):
        raise RlftError(f"{field}={value!r}: must be true or false")
    return value


def _in_range(value, field: str, low: float, high: float = math.inf, *, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (low_open and value == low) or value > high:
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise RlftError(f"{field}={value!r}: must be a finite number in {bound}")
    return float(value)


def resolve_pg_config(section: ml_collections.ConfigDict, eos_id: int | Sequence[int],
                      prefix: str = "rl") -> PGConfig:
    """A validated PGConfig from an `rl_stage_config` section (algorithm defaults filled in);
    eos_id: the policy's EOS id, or several (a completion ends at any)."""
    algorithm = section.algorithm
    if algorithm not in ALGORITHMS:
        raise RlftError(f"{prefix}.algorithm={algorithm!r}: expected one of {list(ALGORITHMS)}")
    d = ALGORITHM_DEFAULTS[algorithm]
    for field in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "minibatches",
                  "accum_steps", "save_every", "keep", "max_nonfinite_steps"):
        _positive_int(section[field], f"{prefix}.{field}")
    advantage = _pick(section, d, "advantage")
    check_estimator(advantage, f"{prefix}.advantage")
    critic = _pick(section, d, "critic")
    if critic not in CRITICS:
        raise RlftError(f"{prefix}.critic={critic!r}: expected one of {list(CRITICS)}")
    if advantage == "gae" and critic == "none":
        raise RlftError(f"{prefix}.advantage='gae' needs a value function: set {prefix}.critic to "
                        f"'separate' or 'shared'")
    if advantage != "gae" and critic != "none":
        raise RlftError(f"{prefix}.critic={critic!r}: only advantage='gae' uses a value function "
                        f"(advantage={advantage!r}); set {prefix}.critic='none'")
    group = section.group_size
    if advantage in ("grpo", "rloo") and group < 2:
        raise RlftError(f"{prefix}.group_size={group}: {advantage} compares the completions of a prompt "
                        f"with each other and needs a group of at least 2")
    estimator = _pick(section, d, "estimator", "estimator")
    check_kl_estimator(estimator, f"{prefix}.kl.estimator")
    placement = _pick(section, d, "placement", "placement")
    check_kl_placement(placement, f"{prefix}.kl.placement")
    kl_coef = _pick(section, d, "coef", "coef")
    check_kl_coef(kl_coef, f"{prefix}.kl.coef")
    check_kl_controller(section.kl.controller, target=section.kl.target, horizon=section.kl.horizon,
                        field=f"{prefix}.kl.controller")
    aggregation = _pick(section, d, "loss_aggregation")
    check_aggregation(aggregation, f"{prefix}.loss_aggregation")
    eps_low, eps_high = _pick(section, d, "clip_eps_low"), _pick(section, d, "clip_eps_high")
    check_pg_args(eps_low, eps_high, section.vf_clip)
    policy_loss = _pick(section, d, "policy_loss")
    check_policy_loss(policy_loss, f"{prefix}.policy_loss")
    ratio_level = _pick(section, d, "ratio_level")
    if ratio_level not in RATIO_LEVELS:
        raise RlftError(f"{prefix}.ratio_level={ratio_level!r}: expected one of {list(RATIO_LEVELS)}")
    if section.tis not in ("none", "token", "sequence"):
        raise RlftError(f"{prefix}.tis={section.tis!r}: expected one of ['none', 'token', 'sequence']")
    staleness = _non_negative_int(section.max_staleness, f"{prefix}.max_staleness")
    off_policy = section.off_policy
    if off_policy not in ("none", "tis", "decoupled"):
        raise RlftError(f"{prefix}.off_policy={off_policy!r}: expected one of ['none', 'tis', 'decoupled']")
    if off_policy != "none" and not staleness:
        raise RlftError(f"{prefix}.off_policy={off_policy!r} corrects stale rollouts and needs {prefix}.max_staleness "
                        f">= 1; against the sampler/trainer mismatch alone use {prefix}.tis")
    tis, tis_cap = section.tis, _in_range(section.tis_cap, f"{prefix}.tis_cap", 1.0)
    if off_policy == "tis":
        tis = "token" if tis == "none" else tis
    elif off_policy == "decoupled":
        if tis != "none":
            raise RlftError(f"{prefix}.off_policy='decoupled' sets its own token-level weights; leave {prefix}.tis "
                            f"at 'none' (got {tis!r})")
        tis, tis_cap = "token", math.inf
    epochs = _positive_int(_pick(section, d, "epochs"), f"{prefix}.epochs")
    dynamic = _flag(_pick(section, d, "dynamic_sampling"), f"{prefix}.dynamic_sampling")
    if dynamic and section.max_staleness:
        raise RlftError(f"{prefix}.dynamic_sampling=true with {prefix}.max_staleness={section.max_staleness}: dynamic "
                        f"sampling draws its extra rounds from the current policy inside the step; use one of them")
    if dynamic and (advantage == "gae" or group < 2):
        raise RlftError(f"{prefix}.dynamic_sampling=true keeps the groups whose scores differ: it needs a group "
                        f"estimator (advantage={advantage!r}) and group_size >= 2 (group_size={group})")
    rows = section.prompts_per_step * group
    if rows % section.minibatches:
        raise RlftError(f"{prefix}.minibatches={section.minibatches} does not divide the rollout of "
                        f"{rows} completions (prompts_per_step × group_size)")
    if (rows // section.minibatches) % section.accum_steps:
        raise RlftError(f"{prefix}.accum_steps={section.accum_steps} does not divide a minibatch of "
                        f"{rows // section.minibatches} completions")
    chunk = _non_negative_int(section.experience_chunk, f"{prefix}.experience_chunk")
    if chunk and rows % chunk:
        raise RlftError(f"{prefix}.experience_chunk={chunk} does not divide the rollout of {rows} completions "
                        f"(prompts_per_step × group_size)")
    vocab_chunk = _non_negative_int(section.vocab_chunk, f"{prefix}.vocab_chunk")
    if section.old_logprobs not in ("recompute", "sampler"):
        raise RlftError(f"{prefix}.old_logprobs={section.old_logprobs!r}: expected 'recompute' or 'sampler'")
    _in_range(section.learning_rate, f"{prefix}.learning_rate", 0.0, low_open=True)
    if section.critic_learning_rate is not None:
        _in_range(section.critic_learning_rate, f"{prefix}.critic_learning_rate", 0.0, low_open=True)
    sampling = SamplingParams(temperature=section.temperature, top_k=section.top_k, top_p=section.top_p)
    if sampling.greedy:
        raise RlftError(f"{prefix}.temperature=0: RL needs sampled completions (temperature > 0)")
    if vocab_chunk and (sampling.top_k or sampling.top_p < 1):
        raise RlftError(f"{prefix}.vocab_chunk={vocab_chunk}: vocabulary blocks need untruncated sampling "
                        f"({prefix}.top_k=0, {prefix}.top_p=1): top-k and top-p read the whole vocabulary")
    return PGConfig(
        advantage=advantage, critic=critic,
        gamma=_in_range(section.gamma, f"{prefix}.gamma", 0.0, 1.0),
        lam=_in_range(section.lam, f"{prefix}.lam", 0.0, 1.0),
        whiten_advantages=_flag(_pick(section, d, "whiten_advantages"), f"{prefix}.whiten_advantages"),
        grpo_scale_by_std=_flag(_pick(section, d, "grpo_scale_by_std"), f"{prefix}.grpo_scale_by_std"),
        grpo_ddof=int(_in_range(section.grpo_ddof, f"{prefix}.grpo_ddof", 0, 1)),
        grpo_eps=_in_range(section.grpo_eps, f"{prefix}.grpo_eps", 0.0),
        baseline_decay=_in_range(section.baseline_decay, f"{prefix}.baseline_decay", 0.0, 1.0),
        kl_coef=float(kl_coef), kl_estimator=estimator, kl_placement=placement,
        kl_controller=section.kl.controller, kl_target=float(section.kl.target),
        kl_horizon=float(section.kl.horizon),
        clip=_flag(_pick(section, d, "clip"), f"{prefix}.clip"), clip_eps_low=float(eps_low),
        clip_eps_high=float(eps_high), policy_loss=policy_loss, ratio_level=ratio_level, tis=tis,
        tis_cap=tis_cap,
        mask_truncated=_flag(section.mask_truncated, f"{prefix}.mask_truncated"),
        dynamic_sampling=dynamic,
        max_resample_rounds=_non_negative_int(section.max_resample_rounds, f"{prefix}.max_resample_rounds"),
        max_staleness=staleness,
        rollout_slots=_non_negative_int(section.rollout_slots, f"{prefix}.rollout_slots"),
        vf_coef=_in_range(section.vf_coef, f"{prefix}.vf_coef", 0.0),
        vf_clip=float(section.vf_clip or 0.0),
        entropy_coef=_in_range(section.entropy_coef, f"{prefix}.entropy_coef", 0.0),
        loss_aggregation=aggregation, epochs=epochs, minibatches=section.minibatches,
        old_logprobs=section.old_logprobs,
        accum_steps=section.accum_steps, experience_chunk=chunk, vocab_chunk=vocab_chunk, group_size=group,
        max_new_tokens=section.max_new_tokens,
        no_eos_penalty=_in_range(section.no_eos_penalty, f"{prefix}.no_eos_penalty", 0.0),
        eos_ids=tuple(sorted({int(i) for i in np.reshape(eos_id, -1)})), sampling=sampling)
