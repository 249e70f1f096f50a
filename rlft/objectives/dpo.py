"""Direct preference optimisation: sigmoid DPO (with conservative label smoothing) and IPO, as sums.

Inputs are sequence log-probabilities [batch, 2] of the completions (column 0 chosen, column 1
rejected) under the policy and under a frozen reference. With h = (log π_c − log π_ref,c) −
(log π_r − log π_ref,r):

    sigmoid: −(1 − ε) log σ(β h) − ε log σ(−β h)     (Rafailov et al. 2023; cDPO for ε > 0)
    ipo:     (h − 1 / (2β))²                           (Azar et al. 2023, sequence log-probs)

Implicit rewards are β (log π − log π_ref) for both. Log-probs are sums over completion tokens
(loss_mask), as in the papers; TRL's IPO averages them per token instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rlft.errors import RlftError
from rlft.generate.logprobs import sequence_logprobs
from rlft.ops import flatten_pairs

Array = jax.Array


def _sigmoid_loss(h: Array, beta: float, label_smoothing: float) -> Array:
    """Per-pair conservative DPO loss [batch] of log-ratio differences h [batch]."""
    logits = beta * h
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)


def _ipo_loss(h: Array, beta: float, label_smoothing: float) -> Array:
    """Per-pair IPO loss [batch]: (h − 1/(2β))²; label smoothing does not apply."""
    del label_smoothing
    return jnp.square(h - 1.0 / (2.0 * beta))


DPO_LOSSES: dict[str, Callable[[Array, float, float], Array]] = {
    "sigmoid": _sigmoid_loss,
    "ipo": _ipo_loss,
}


def check_dpo_args(beta: float, label_smoothing: float, loss_type: str) -> None:
    """Raises RlftError naming the dpo.* field that is out of range."""
    if loss_type not in DPO_LOSSES:
        raise RlftError(f"dpo.loss_type={loss_type!r}: expected one of {sorted(DPO_LOSSES)}")
    if not beta > 0:
        raise RlftError(f"dpo.beta={beta}: must be > 0")
    if not 0.0 <= label_smoothing < 0.5:
        raise RlftError(f"dpo.label_smoothing={label_smoothing}: must be in [0, 0.5)")
    if loss_type == "ipo" and label_smoothing:
        raise RlftError("dpo.label_smoothing applies to loss_type='sigmoid' only; set it to 0 for ipo")


def pair_logprobs(graphdef: nnx.GraphDef, params: nnx.State, batch: Any) -> Array:
    """float32 [batch, 2]: log p(completion | prompt) of chosen and rejected rows of a pair batch.

    The batch fields are [batch, 2, length]; loss_mask marks the completion tokens.
    """
    flat = flatten_pairs(batch)
    logp = sequence_logprobs(graphdef, params, flat["tokens"], flat["positions"], flat["segment_ids"])
    logp = jnp.sum(jnp.where(flat["loss_mask"][:, 1:] > 0, logp, 0.0), axis=-1)
    n = logp.shape[0] // 2
    return jnp.stack([logp[:n], logp[n:]], axis=1)


def dpo_loss(policy_logps: Array, reference_logps: Array, beta: float = 0.1,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> tuple[Array, Array, dict]:
    """(loss sum, pair count, aux sums) from log-probs [batch, 2] (chosen, rejected).

    aux sums: "correct" (chosen reward > rejected reward), "margin" (reward differences),
    "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp" (policy log-probs).
    """
    check_dpo_args(beta, label_smoothing, loss_type)
    policy_logps = policy_logps.astype(jnp.float32)
    ratios = policy_logps - jax.lax.stop_gradient(reference_logps.astype(jnp.float32))
    h = ratios[:, 0] - ratios[:, 1]
    losses = DPO_LOSSES[loss_type](h, beta, label_smoothing)
    rewards = jax.lax.stop_gradient(beta * ratios)
    aux = {"correct": jnp.sum((rewards[:, 0] > rewards[:, 1]).astype(jnp.float32)),
           "margin": jnp.sum(rewards[:, 0] - rewards[:, 1]),
           "chosen_reward": jnp.sum(rewards[:, 0]), "rejected_reward": jnp.sum(rewards[:, 1]),
           "chosen_logp": jnp.sum(jax.lax.stop_gradient(policy_logps[:, 0])),
           "rejected_logp": jnp.sum(jax.lax.stop_gradient(policy_logps[:, 1]))}
    return jnp.sum(losses), jnp.asarray(h.shape[0], jnp.float32), aux
