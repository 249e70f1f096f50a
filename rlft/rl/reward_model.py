"""A learned reward model as an RL reward, scored on the training mesh.

`ModelReward` holds a ScalarModel (graphdef, params on a mesh), its tokenizer and its
reward_stats.json (how its training inputs were framed, the reference mean and std). The RL step
(`rlft.rl.reward_step`) scores a rollout with it in one of two ways:

    same vocabulary   `rollout_scores`: the rollout's own token ids (prompt + completion), framed as
                      in training, in one jitted program on the mesh with the batch's sharding: no
                      decode, no re-encode, fixed shapes (one compile per run); each device scores
                      the rows it holds
    other vocabulary  each process decodes its rows, encodes them with the reward model's
                      tokenizer at a fixed width (`reward_input_length`), and `row_scores` scores them
                      on the mesh

Framing (what `rlft.generate.scoring.reward_examples` does to texts): add_bos puts the stats'
`bos_id` (default EOS; a Hugging Face reward model's own BOS) before the prompt (not when the prompt
already opens with it: policy prompts often carry their own), add_eos
puts EOS after a completion that did not end with one, and the whole is truncated to the training
max_length by `rlft.data.batching.truncate`'s rule (the prompt loses its start, the completion its end).

Called as a text reward function, (completions, records) -> float32 [n], a ModelReward scores
the record's prompt (`prompt_text`) + completion through the same tokenisation as `rlft.load(path).score` (the
evaluation's proxy reward).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from rlft.errors import RlftError
from rlft.generate.sampling import Sequences
from rlft.generate.scoring import has_reference_stats, reward_examples, reward_input_length, sequence_scores
from rlft.models.decoder import positions_from_mask
from rlft.models.heads import last_token_scores
from rlft.parallel.distributed import put_global
from rlft.parallel.sharding import local_device_mesh, state_shardings
from rlft.train.steps import map_row_chunks

Array = jax.Array
NORMALIZE_EPS = 1e-8  # as `rlft.generate.scoring.normalize_scores`


@dataclasses.dataclass(frozen=True, eq=False)
class ModelReward:
    """A ScalarModel reward: graphdef, params (on a mesh), tokenizer, reward_stats.json (or None).

    normalize: scores become (s - mean) / std of the stats' reference set (needs them recorded:
    `has_reference_stats`; `load_reward_model` normalises by default only then). batch_size: rows per
    forward on the text path. name: how messages and metrics name it, e.g. "reward_model(PATH)".
    """

    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: Any
    stats: dict | None = None
    normalize: bool = True
    batch_size: int = 64
    name: str = "reward_model"

    def __post_init__(self):
        if self.normalize and not has_reference_stats(self.stats):
            raise RlftError(f"{self.name}: normalize=True needs a reference mean and std (an rlft reward "
                            f"stage's reward_stats.json); this model has "
                            f"{'none recorded' if self.stats else 'no reward_stats.json'}")

    @property
    def rlft_name(self) -> str:
        return self.name

    @functools.cached_property
    def config(self):
        """The reward model's ModelConfig."""
        return nnx.merge(self.graphdef, self.params).config

    @property
    def max_length(self) -> int:
        """The truncation length of its inputs (`reward_input_length`)."""
        return reward_input_length(self.stats, self.config.max_positions)

    @property
    def mesh(self) -> Mesh | None:
        """The mesh its params are on (None for host arrays)."""
        sharding = getattr(jax.tree.leaves(self.params)[0], "sharding", None)
        return sharding.mesh if isinstance(sharding, NamedSharding) else None

    def framing(self) -> dict:
        """Keyword arguments of `rollout_scores`: bos_id (the stats' bos_id, default EOS, when
        add_bos), eos_id (when add_eos), max_length, and the normalisation score -> (score - mean) /
        scale (scale = std + 1e-8 as `normalize_scores`; 0 and 1 without)."""
        stats = self.stats or {}
        eos = self.tokenizer.eos_token_id
        bos = eos if stats.get("bos_id") is None else int(stats["bos_id"])
        mean, scale = (stats["mean"], stats["std"] + NORMALIZE_EPS) if self.normalize else (0.0, 1.0)
        return {"bos_id": bos if stats.get("add_bos", False) else None,
                "eos_id": eos if stats.get("add_eos", True) else None,
                "max_length": self.max_length, "mean": float(mean), "scale": float(scale)}

    def on_mesh(self, mesh: Mesh) -> "ModelReward":
        """This reward with its params on `mesh` (sharded by the model's rules); itself when they
        are there already, so a critic started from the same params shares their buffers."""
        if self.mesh == mesh:
            return self
        return dataclasses.replace(self, params=put_global(self.params, state_shardings(self.params, mesh)))

    def shares_vocabulary(self, tokenizer) -> bool:
        """True when `tokenizer` maps every token to the same id as the reward model's (and has the
        same EOS), so the policy's token ids can be scored as they are."""
        if tokenizer is None or self.tokenizer is None:
            return False
        return (tokenizer is self.tokenizer or
                (tokenizer.eos_token_id == self.tokenizer.eos_token_id
                 and tokenizer.get_vocab() == self.tokenizer.get_vocab()))

    def __call__(self, completions: Sequence[str], records: Sequence[dict]) -> np.ndarray:
        """float32 [n]: the record's prompt text (`prompt_text`) + completion, tokenised as in training."""
        prompts = [prompt_text(r) for r in records]
        examples = reward_examples(self.tokenizer, completions, prompts, self.stats, self.config.max_positions)
        if not examples:
            return np.zeros((0,), np.float32)
        mesh = self.mesh or local_device_mesh()
        reward = self.on_mesh(mesh)
        scores = sequence_scores(self.graphdef, reward.params, examples, self.max_length,
                                 self.tokenizer.pad_token_id, mesh, min(self.batch_size, len(examples)))
        framing = self.framing()
        return ((scores - framing["mean"]) / framing["scale"]).astype(np.float32)


def prompt_text(record: dict) -> str:
    """The prompt a reward model reads before a completion: record["prompt"] (the text the policy
    saw, as the general experiments record it), else record["text"] (the sentiment recipes'), else ""."""
    return str(record["prompt"]) if "prompt" in record else str(record.get("text", ""))


def load_reward_model(path: str, normalize: bool | None = None, batch_size: int = 64,
                      mesh: Mesh | None = None) -> ModelReward:
    """The reward (ScalarModel) at `path` as a ModelReward, its params placed on `mesh` (default:
    this process's first device; the RL stage moves them to its mesh).

    path: anything `rlft.load` reads as a scalar model: an rlft reward stage, or a Hugging Face
    sequence-classification checkpoint (framed as transformers tokenises texts). normalize: None
    (default) normalises when the stats record a reference mean and std (an rlft reward stage's
    reward_stats.json), not otherwise (a Hugging Face reward model); True without them is an
    RlftError.
    """
    import rlft

    model = rlft.load(path)
    if model.kind != "scalar":
        raise RlftError(f"reward_model={path}: not a reward (scalar) model stage")
    if model.tokenizer is None:
        raise RlftError(f"reward_model={path}: no tokenizer beside the model")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise RlftError(f"reward_model batch_size={batch_size!r}: must be an integer >= 1")
    if normalize is None:
        normalize = has_reference_stats(model.reward_stats)
    mesh = mesh or local_device_mesh()
    params = put_global(model.params, state_shardings(model.params, mesh))
    return ModelReward(graphdef=model.graphdef, params=params, tokenizer=model.tokenizer, stats=model.reward_stats,
                       normalize=normalize, batch_size=batch_size, name=f"reward_model({path})")


def rollout_reward_inputs(seqs: Sequences, *, bos_id: int | None, eos_id: int | None,
                          max_length: int) -> tuple[Array, Array, Array]:
    """The rollout framed as the reward model's inputs: (tokens, positions, segment_ids), int32
    [rows, prompt_len + max_new_tokens + 2] (a free column on each side for BOS and EOS)."""
    rows, width = seqs.tokens.shape
    pad = jnp.zeros((rows, 1), jnp.int32)
    tokens = jnp.concatenate([pad, seqs.tokens.astype(jnp.int32), pad], axis=1)
    real = jnp.concatenate([pad, (seqs.segment_ids > 0).astype(jnp.int32), pad], axis=1) > 0
    columns = jnp.arange(width + 2)[None, :]
    if bos_id is not None:  # before the first real token, unless that is BOS already
        first = jnp.argmax(real, axis=1)[:, None]
        at = (columns == first - 1) & (jnp.take_along_axis(tokens, first, axis=1) != bos_id)
        tokens, real = jnp.where(at, bos_id, tokens), real | at
    if eos_id is not None:  # after the last real token, unless the completion ended with EOS
        last = width + 1 - jnp.argmax(real[:, ::-1], axis=1)[:, None]
        at = (columns == last + 1) & (jnp.take_along_axis(tokens, last, axis=1) != eos_id)
        tokens, real = jnp.where(at, eos_id, tokens), real | at
    # `truncate`: keep the last keep_p prompt tokens and the first keep_c completion tokens.
    in_prompt = columns < seqs.prompt_length + 1
    prompt_real, completion_real = real & in_prompt, real & ~in_prompt
    p, c = prompt_real.sum(axis=1, keepdims=True), completion_real.sum(axis=1, keepdims=True)
    keep_c = jnp.where(p + c > max_length, jnp.minimum(c, max_length - jnp.minimum(p, 1)), c)
    keep_p = jnp.minimum(p, max_length - keep_c)
    keep = ((prompt_real & (jnp.cumsum(prompt_real, axis=1) > p - keep_p))
            | (completion_real & (jnp.cumsum(completion_real, axis=1) <= keep_c)))
    segment_ids = keep.astype(jnp.int32)
    return tokens, positions_from_mask(segment_ids), segment_ids


def row_scores(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array, positions: Array, segment_ids: Array,
               *, mean: float = 0.0, scale: float = 1.0, chunk_rows: int = 0) -> Array:
    """float32 [rows]: (score at each row's last real token - mean) / scale, `chunk_rows` rows per
    forward (`map_row_chunks`; 0 = all at once). tokens, positions, segment_ids: int32
    [rows, length], padded on either side."""
    def score(rows):
        return last_token_scores(nnx.merge(graphdef, params)(*rows), rows[2])

    chunks = tokens.shape[0] // chunk_rows if chunk_rows else 1
    scores = map_row_chunks(score, (tokens, positions, segment_ids), chunks)
    return (scores - mean) / scale


def rollout_scores(graphdef: nnx.GraphDef, params: nnx.State, seqs: Sequences, *, bos_id: int | None,
                   eos_id: int | None, max_length: int, mean: float = 0.0, scale: float = 1.0,
                   chunk_rows: int = 0) -> Array:
    """float32 [rows]: the reward model's (normalised) score of each rollout row, from its token ids."""
    inputs = rollout_reward_inputs(seqs, bos_id=bos_id, eos_id=eos_id, max_length=max_length)
    return row_scores(graphdef, params, *inputs, mean=mean, scale=scale, chunk_rows=chunk_rows)
