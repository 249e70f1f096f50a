"""Pure loss functions, each returning (loss_sum, count, aux sums): SFT tokens, reward pairs, DPO pairs."""

from rlft.objectives.dpo import DPO_LOSSES, dpo_loss, pair_logprobs
from rlft.objectives.reward import bradley_terry_loss, last_token_scores, pair_rewards, reward_loss
from rlft.objectives.sft import batch_field, sft_loss, token_logprobs

__all__ = ["batch_field", "sft_loss", "token_logprobs", "bradley_terry_loss", "last_token_scores",
           "pair_rewards", "reward_loss", "DPO_LOSSES", "dpo_loss", "pair_logprobs"]
