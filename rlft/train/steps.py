"""Train state, optimizer, gradient accumulation and the pure SFT, reward and DPO steps.

A step is `step(state, batch, **static) -> (state, metrics)`: a pure function of pytrees, wrapped
once by `jit_step` with explicit in/out shardings and the state donated. Losses are carried as
(sum, count): the gradient of one step is sum over micro-batches of grad(loss_sum) divided by the
total token count (pair count for reward and DPO steps), so micro-batching and the device count
never change it. Every step ends with the one epilogue `gradient_update` (accumulate -> divide by
the count -> apply); the policy-gradient step (rlft/rl/pg_step.py) uses the same pieces.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from rlft.errors import RlftError
from rlft.models.lora import adapters_off, combine
from rlft.objectives.dpo import check_dpo_args, dpo_loss, pair_logprobs
from rlft.objectives.reward import reward_loss
from rlft.objectives.sft import sft_loss
from rlft.ops import batch_field
from rlft.parallel.sharding import MeshJit, batch_sharding, checked_sharding, replicated

Array = jax.Array
LossFn = Callable[[nnx.State, Any], tuple[Array, Array, dict]]


@struct.dataclass
class TrainState:
    """Everything a step updates: step (int32 []), params (nnx.State), opt_state, rng (uint32 [2]).

    `rng` is raw key data (`jax.random.key_data`); per-step keys come from `step_key`.
    """

    step: Array
    params: nnx.State
    opt_state: Any
    rng: Array


# ---------------------------------------------------------------------------------------------
# Optimizer


def learning_rate_schedule(lr: float, warmup_steps: int, total_steps: int,
                           end_ratio: float = 0.0) -> optax.Schedule:
    """Linear warm-up lr*(s+1)/warmup for s < warmup, then cosine from lr to lr*end_ratio at total."""
    end = lr * end_ratio
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = lr * (step + 1.0) / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = end + (lr - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


NO_DECAY_NAMES = ("bias", "scale", "norm")


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: ndim >= 2 and not a bias or norm (e.g. q_bias [heads, hd])."""

    def one(path, p):
        names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        name = names[-1] if names else ""
        return jnp.ndim(p) >= 2 and not any(word in name for word in NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(lr: float, warmup_steps: int, total_steps: int, weight_decay: float = 0.0,
                   clip_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, end_lr_ratio: float = 0.0) -> optax.GradientTransformation:
    """AdamW with warm-up + cosine decay, global-norm clipping (None/0 = off), decay on ndim>=2 only.

    The learning rate is injected (`optax.inject_hyperparams`), so the opt_state records the value
    used by the last update; read it with `current_learning_rate`.
    """
    schedule = learning_rate_schedule(lr, warmup_steps, total_steps, end_lr_ratio)

    def chain(learning_rate):
        parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
        parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                                 mask=decay_mask))
        return optax.chain(*parts)

    return optax.inject_hyperparams(chain)(learning_rate=schedule)


def current_learning_rate(opt_state: Any) -> Array:
    """The learning rate of the last update (or the first, before any), NaN if not injected."""
    hyper = getattr(opt_state, "hyperparams", None)
    if hyper is None or "learning_rate" not in hyper:
        return jnp.asarray(jnp.nan, jnp.float32)
    return jnp.asarray(hyper["learning_rate"], jnp.float32)


# ---------------------------------------------------------------------------------------------
# State, shardings


def init_train_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0, the optimizer initialised on params, rng = key data of `seed`."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))


def step_key(state: TrainState, *, salt: int = 0) -> Array:
    """A typed PRNG key for this step: rng folded with the step (and an optional salt)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    return jax.random.fold_in(key, salt) if salt else key


def tree_shardings(tree: Any, mesh: Mesh, what: str) -> Any:
    """Shardings for a state tree: Variables by their logical_axes, small plain arrays replicated.

    Plain arrays of rank <= 1 (step counters, RNG key data, KL coefficients, baselines) are
    replicated; a larger array without logical axes is an error, never a silent replication.
    """

    def one(path, leaf):
        name = f"{what}{jax.tree_util.keystr(path)}"
        if isinstance(leaf, nnx.Variable):
            axes = leaf.get_metadata().get("logical_axes")
            if axes is None:
                raise RlftError(f"sharding: {name} has no logical_axes metadata")
            return leaf.replace(value=checked_sharding(mesh, leaf.shape, axes, what=name))
        if len(jnp.shape(leaf)) <= 1:
            return replicated(mesh)
        raise RlftError(f"sharding: {name} of shape {jnp.shape(leaf)} is neither a parameter-like "
                        f"Variable nor a scalar; give it a rule")

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def train_state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """The state's tree of NamedShardings (any state dataclass: TrainState, PGState, ...)."""
    return tree_shardings(abstract_state, mesh, "state")


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings` (the target of a restore onto a mesh)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def abstract_train_state(graphdef: nnx.GraphDef, params: nnx.State, tx: optax.GradientTransformation,
                         mesh: Mesh) -> TrainState:
    """Abstract TrainState (ShapeDtypeStructs with their shardings on `mesh`); no arrays are made."""
    abstract = jax.eval_shape(lambda p: init_train_state(p, tx, 0), params)
    return with_shardings(abstract, train_state_shardings(abstract, mesh))


def init_sharded_train_state(graphdef: nnx.GraphDef, params: nnx.State, tx: optax.GradientTransformation,
                             seed: int, mesh: Mesh) -> TrainState:
    """`init_train_state` compiled straight into the shardings of `train_state_shardings`."""
    abstract = jax.eval_shape(lambda p: init_train_state(p, tx, seed), params)
    shardings = train_state_shardings(abstract, mesh)
    init = jax.jit(lambda p: init_train_state(p, tx, seed),
                   in_shardings=(shardings.params,), out_shardings=shardings)
    return init(params)


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
    """The batch-shaped tree of shardings: leading dim over ('data', 'fsdp')."""
    return jax.tree.map(lambda x: batch_sharding(mesh, jnp.ndim(x)), batch)


# ---------------------------------------------------------------------------------------------
# Accumulation and update


def split_micro_batches(batch: Any, accum_steps: int) -> Any:
    """[k * m, ...] leaves -> [k, m, ...]; micro-batch j takes rows j, j + k, ... (device-local)."""

    def one(x):
        if x.shape[0] % accum_steps:
            raise RlftError(f"batch of {x.shape[0]} rows is not divisible by accum_steps={accum_steps}")
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(one, batch)


def map_row_chunks(fn: Callable[[Any], Any], batch: Any, chunks: int) -> Any:
    """fn over `chunks` row chunks of batch leaves [rows, ...] one after another (`lax.map`), its
    outputs [rows, ...] joined back in row order: what fn holds in memory is one chunk's.

    Chunk j takes rows j, j + chunks, ... (`split_micro_batches`), so on a batch sharded over
    devices every chunk is spread over all of them.
    """
    if chunks == 1:
        return fn(batch)
    out = jax.lax.map(fn, split_micro_batches(batch, chunks))
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), out)


def accumulate_gradients(loss_fn: LossFn, params: nnx.State, batch: Any,
                         accum_steps: int) -> tuple[nnx.State, Array, Array, dict]:
    """Sums over micro-batches (lax.scan) of (grad of loss_sum, loss_sum, count, aux sums).

    loss_fn(params, micro_batch) -> (loss_sum, count, aux dict of sums).
    """

    def objective(p, micro):
        loss_sum, count, aux = loss_fn(p, micro)
        return loss_sum, (count, aux)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if accum_steps == 1:  # one micro-batch: no scan, no zero-initialised carry to add into
        (loss, (count, aux)), grads = grad_fn(params, batch)
        return grads, loss, count, aux
    micro_batches = split_micro_batches(batch, accum_steps)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    _, (count_shape, aux_shape) = jax.eval_shape(objective, params, first)
    zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)

    def body(carry, micro):
        grads, loss, count, aux = carry
        (l, (c, a)), g = grad_fn(params, micro)
        return (jax.tree.map(jnp.add, grads, g), loss + l, count + c,
                jax.tree.map(jnp.add, aux, a)), None

    init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
            zeros(count_shape), zeros(aux_shape))
    (grads, loss, count, aux), _ = jax.lax.scan(body, init, micro_batches)
    return grads, loss, count, aux


def apply_update(params: Any, opt_state: Any, grads: Any, tx: optax.GradientTransformation,
                 loss: Array | None = None) -> tuple[Any, Any, dict]:
    """One optimizer update: (params, opt_state, {grad_norm, learning_rate, param_norm, nonfinite}).

    The non-finite guard: when the gradient norm (or `loss`) is not finite, params and optimizer
    state stay as they were and "nonfinite" is 1.0, so NaN never reaches the parameters (nor a
    checkpoint); the training loop stops after a number of such steps in a row.
    """
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(grad_norm) if loss is None else jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep_if_finite(new_params, params), keep_if_finite(new_opt_state, opt_state)
    return params, opt_state, {"grad_norm": grad_norm,
                               "learning_rate": current_learning_rate(opt_state),
                               "param_norm": optax.tree.norm(params),
                               "nonfinite": (~finite).astype(jnp.float32)}


def apply_gradients(state: TrainState, grads: nnx.State, tx: optax.GradientTransformation,
                    loss: Array | None = None) -> tuple[TrainState, dict]:
    """One optimizer update of a TrainState (step + 1); returns it and `apply_update`'s metrics."""
    params, opt_state, metrics = apply_update(state.params, state.opt_state, grads, tx, loss)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def mean_gradients(loss_fn: LossFn, params: Any, batch: Any,
                   accum_steps: int) -> tuple[Any, Array, Array, dict]:
    """(grads / count, loss_sum / count, count, aux sums): `accumulate_gradients`, divided once.

    count is clamped at 1, so an all-padding batch gives zero gradients, not NaN.
    """
    grads, loss_sum, count, aux = accumulate_gradients(loss_fn, params, batch, accum_steps)
    denom = jnp.maximum(count, 1.0)
    return jax.tree.map(lambda g: g / denom, grads), loss_sum / denom, denom, aux


def with_frozen(loss_fn: LossFn, frozen: nnx.State | None) -> LossFn:
    """loss_fn of the whole model as a function of its trainable part (LoRA: `frozen` is the base)."""
    if frozen is None:
        return loss_fn
    return lambda trainable, micro: loss_fn(combine(frozen, trainable), micro)


def gradient_update(state: TrainState, loss_fn: LossFn, batch: Any, tx: optax.GradientTransformation,
                    accum_steps: int, frozen: nnx.State | None = None) -> tuple[TrainState, dict, dict, Array]:
    """The epilogue every step shares: accumulate -> divide by the count -> apply.

    Returns (new state, metrics {loss, grad_norm, learning_rate, param_norm, nonfinite}, aux sums,
    count); a non-finite loss or gradient skips the update (`apply_update`).
    Steps turn aux sums into means by dividing by the returned (clamped) count. With `frozen`
    (LoRA), state.params is the trainable part and loss_fn sees it combined with the frozen base.
    """
    grads, loss, count, aux = mean_gradients(with_frozen(loss_fn, frozen), state.params, batch, accum_steps)
    state, metrics = apply_gradients(state, grads, tx, loss)
    return state, {"loss": loss, **metrics}, aux, count


def sft_step(state: TrainState, batch: Any, frozen: nnx.State | None = None, *, graphdef: nnx.GraphDef,
             tx: optax.GradientTransformation, accum_steps: int = 1) -> tuple[TrainState, dict]:
    """One SFT update on batch leaves [accum_steps * micro_batch, length]; mean-per-token gradient.

    frozen: the base of a LoRA model (state.params are then its adapters), else None.
    """
    loss_fn = functools.partial(sft_loss, graphdef)
    state, metrics, aux, count = gradient_update(state, loss_fn, batch, tx, accum_steps, frozen)
    return state, {**metrics, "tokens": count, "input_tokens": aux["input_tokens"],
                   "accuracy": aux["correct"] / count}


def reward_step(state: TrainState, batch: Any, frozen: nnx.State | None = None, *, graphdef: nnx.GraphDef,
                tx: optax.GradientTransformation, accum_steps: int = 1, margin: float = 0.0,
                center_weight: float = 0.0) -> tuple[TrainState, dict]:
    """One Bradley–Terry update of a ScalarModel on pair batch leaves [accum_steps * pairs, 2, length].

    The gradient is that of the mean loss per pair; metrics: loss, bt_loss, accuracy (r_c > r_r),
    margin, chosen, rejected (means over pairs), pairs. frozen: a LoRA model's base (state.params
    are then its adapters and the head), else None.
    """
    loss_fn = functools.partial(reward_loss, graphdef, margin=margin, center_weight=center_weight)
    state, metrics, aux, count = gradient_update(state, loss_fn, batch, tx, accum_steps, frozen)
    return state, {**metrics, "bt_loss": aux["bt_loss"] / count, "accuracy": aux["correct"] / count,
                   "margin": aux["margin"] / count, "chosen": aux["chosen"] / count,
                   "rejected": aux["rejected"] / count, "pairs": count}


def dpo_step(state: TrainState, batch: Any, reference_params: nnx.State | None = None,
             frozen: nnx.State | None = None, *, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, accum_steps: int = 1,
             beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> tuple[TrainState, dict]:
    """One DPO/IPO update on pair batch leaves [accum_steps * pairs, 2, length].

    Reference log-probs come from `reference_params` (frozen, not donated; computed once per
    micro-batch, outside the gradient) or, when it is None, from the batch field "ref_logps"
    [pairs, 2]. With `frozen` (LoRA: state.params are the adapters) and neither, the reference is
    the base with the adapters off, so the base weights are held once. Metrics (means over
    pairs): loss, rewards/accuracies, rewards/margins, rewards/chosen, rewards/rejected,
    logps/chosen, logps/rejected.
    """
    check_dpo_args(beta, label_smoothing, loss_type)
    if frozen is not None and reference_params is None and not _has_field(batch, "ref_logps"):
        reference_params = adapters_off(frozen, state.params)

    def loss_fn(params, micro):
        if reference_params is None:
            reference = batch_field(micro, "ref_logps")
        else:
            reference = jax.lax.stop_gradient(pair_logprobs(graphdef, reference_params, micro))
        return dpo_loss(pair_logprobs(graphdef, params, micro), reference, beta, label_smoothing,
                        loss_type)

    state, metrics, aux, count = gradient_update(state, loss_fn, batch, tx, accum_steps, frozen)
    return state, {**metrics, "rewards/accuracies": aux["correct"] / count,
                   "rewards/margins": aux["margin"] / count,
                   "rewards/chosen": aux["chosen_reward"] / count,
                   "rewards/rejected": aux["rejected_reward"] / count,
                   "logps/chosen": aux["chosen_logp"] / count,
                   "logps/rejected": aux["rejected_logp"] / count, "pairs": count}


def _has_field(batch: Any, name: str) -> bool:
    try:
        batch_field(batch, name)
    except (KeyError, AttributeError):
        return False
    return True


def jit_step(step_fn: Callable[..., tuple[Any, dict]], state_shardings: Any,
             batch_sharding_tree: Any, mesh: Mesh, extra_shardings: tuple = (),
             **static: Any) -> Callable:
    """jax.jit(step_fn(state, batch, *extra, **static)) with explicit shardings, metrics replicated.

    Traced with `mesh` set (`MeshJit`), so that the model keeps its activations batch-sharded.

    Compiles on first call (lower it with `.lower(...)` to inspect). Only the state is donated; `extra_shardings` place further positional arguments (e.g. the
    frozen reference params of `dpo_step`), which are never donated.
    """
    return MeshJit(jax.jit(functools.partial(step_fn, **static),
                           in_shardings=(state_shardings, batch_sharding_tree, *extra_shardings),
                           out_shardings=(state_shardings, replicated(mesh)),
                           donate_argnums=0), mesh)
