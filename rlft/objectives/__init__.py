"""Pure loss functions of (graphdef, params, batch), each returning (loss_sum, token_count, aux sums)."""

from rlft.objectives.sft import batch_field, sft_loss, token_logprobs

__all__ = ["batch_field", "sft_loss", "token_logprobs"]
