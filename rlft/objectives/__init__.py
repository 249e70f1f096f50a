"""Pure loss functions, each returning (loss_sum, count, aux sums): SFT tokens, reward pairs, DPO pairs.

RL pieces, also pure and jittable: advantage estimators (advantages.py: GAE, GRPO, RLOO,
REINFORCE, masked whitening), KL estimators, placements and coefficient controllers (kl.py), and
the clipped surrogate, CISPO, GSPO's sequence ratio, truncated importance sampling, value loss,
entropy and loss aggregations (pg.py).
"""

from rlft.objectives.advantages import (ESTIMATORS, check_estimator, gae, grpo, reinforce, rloo,
                                        update_baseline, whiten)
from rlft.objectives.dpo import DPO_LOSSES, dpo_loss, pair_logprobs
from rlft.objectives.kl import (KL_CONTROLLERS, KL_ESTIMATORS, KL_PLACEMENTS, adaptive_kl_coef,
                                check_kl_coef, check_kl_controller, check_kl_estimator,
                                check_kl_placement, fixed_kl_coef, kl_estimate)
from rlft.objectives.pg import (AGGREGATIONS, POLICY_LOSSES, RATIO_LEVELS, aggregate, check_aggregation,
                                check_pg_args, check_policy_loss, cispo_loss, clipped_surrogate,
                                entropy_from_log_probs, log_ratios, sequence_log_ratio, truncated_is_weights,
                                value_loss)
from rlft.objectives.reward import bradley_terry_loss, pair_rewards, reward_loss
from rlft.objectives.sft import sft_loss

__all__ = ["sft_loss", "bradley_terry_loss",
           "pair_rewards", "reward_loss", "DPO_LOSSES", "dpo_loss", "pair_logprobs",
           "ESTIMATORS", "check_estimator", "gae", "grpo", "reinforce", "rloo",
           "update_baseline", "whiten",
           "KL_CONTROLLERS", "KL_ESTIMATORS", "KL_PLACEMENTS", "adaptive_kl_coef", "check_kl_coef",
           "check_kl_controller", "check_kl_estimator", "check_kl_placement", "fixed_kl_coef",
           "kl_estimate",
           "AGGREGATIONS", "aggregate", "check_aggregation", "check_pg_args", "clipped_surrogate",
           "entropy_from_log_probs", "value_loss", "POLICY_LOSSES", "RATIO_LEVELS", "check_policy_loss",
           "cispo_loss", "log_ratios", "sequence_log_ratio", "truncated_is_weights"]
