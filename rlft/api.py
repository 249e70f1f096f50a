"""`rlft.load`: one entry point for Hugging Face checkpoints and rlft runs, for notebooks and CLIs."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlft.errors import RlftError
from rlft.models import Decoder, ModelConfig, ScalarModel, positions_from_mask
from rlft.models import hf


@dataclasses.dataclass
class Model:
    """A loaded model: config, params (nnx.State), tokenizer, and pure-function helpers.

    `kind` is "lm" for a language model (Decoder) and "scalar" for a reward/value model;
    `reward_stats` is a reward stage's reward_stats.json (mean, std, add_bos, add_eos) if any.
    """

    config: ModelConfig
    params: nnx.State
    tokenizer: Any = None
    kind: str = "lm"
    reward_stats: dict | None = None

    @functools.cached_property
    def graphdef(self) -> nnx.GraphDef:
        """The static half of the module; `nnx.merge(m.graphdef, m.params)` rebuilds it."""
        cls = Decoder if self.kind == "lm" else ScalarModel
        return nnx.graphdef(nnx.eval_shape(lambda: cls(self.config, rngs=nnx.Rngs(0))))

    @functools.cached_property
    def _forward(self):
        graphdef = self.graphdef
        return jax.jit(lambda params, t, m: nnx.merge(graphdef, params)(t, positions_from_mask(m), m))

    def _inputs(self, token_ids, attention_mask) -> tuple[jax.Array, jax.Array]:
        tokens = jnp.asarray(token_ids, jnp.int32)
        if tokens.ndim != 2:
            raise RlftError(f"token_ids must be [batch, length], got shape {tokens.shape}")
        mask = jnp.ones_like(tokens) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        if mask.shape != tokens.shape:
            raise RlftError(f"attention_mask shape {mask.shape} != token_ids shape {tokens.shape}")
        return tokens, mask

    def logits(self, token_ids, attention_mask=None) -> np.ndarray:
        """float32 [batch, length, vocab] for int [batch, length] ids; left or right padding."""
        if self.kind != "lm":
            raise RlftError("logits() needs a language model; this is a scalar (reward/value) model")
        return np.asarray(self._forward(self.params, *self._inputs(token_ids, attention_mask)))

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 32,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> dict:
        """Sample completions of text or token-id prompts (temperature=0: greedy).

        Returns {"text": [str] (when prompts are strings), "tokens": int32 [batch, max_new_tokens]
        (pad after EOS), "mask": [batch, max_new_tokens], "logprobs": float32 [batch,
        max_new_tokens] under the distribution sampled from}. With `mesh` (from
        `rlft.sharding.make_mesh`), the prompts are split over its data axes and the parameters
        replicated; the number of prompts must divide evenly. Same results as without.
        """
        from rlft.data.batching import pad_left
        from rlft.sampling import SamplingParams, sample
        from rlft.sharding import replicated

        if self.kind != "lm":
            raise RlftError("generate() needs a language model; this is a scalar (reward/value) model")
        if not len(prompts):
            raise RlftError("generate(): no prompts")
        as_text = isinstance(prompts[0], str)
        tok = self._require_tokenizer() if as_text or self.tokenizer is not None else None
        ids = [tok.encode(p, add_special_tokens=False) if as_text else [int(t) for t in p] for p in prompts]
        for prompt, row in zip(prompts, ids):
            if not row:
                raise RlftError(f"generate(): prompt {prompt!r} has no tokens")
        eos_id = -1 if tok is None or tok.eos_token_id is None else tok.eos_token_id  # -1: never stops
        pad_id = 0 if tok is None or tok.pad_token_id is None else tok.pad_token_id
        tokens, mask, _ = pad_left(ids, max(len(r) for r in ids), pad_id)
        param_shardings = None if mesh is None else jax.tree.map(lambda _: replicated(mesh), self.params)
        out = sample(self.graphdef, self.params, tokens, mask, jax.random.key(seed),
                     max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                     sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p),
                     mesh=mesh, param_shardings=param_shardings)
        result = {"tokens": np.asarray(out.tokens), "mask": np.asarray(out.mask),
                  "logprobs": np.asarray(out.logprobs)}
        if as_text:
            result["text"] = [tok.decode(row[:n], skip_special_tokens=True)
                              for row, n in zip(result["tokens"].tolist(), np.asarray(out.lengths))]
        return result

    def score(self, texts: Sequence[str], prompts: Sequence[str] | None = None, normalize: bool = False,
              batch_size: int = 64) -> np.ndarray:
        """float32 [len(texts)]: a reward model's score of each text at its last real token.

        Texts are tokenised as in training, following reward_stats.json: EOS before the text
        (add_bos) and after it (add_eos, the default), and over-long sequences truncated to its
        max_length by `rlft.data.batching.truncate`. With `prompts`, each text follows its prompt.
        `normalize` maps scores to (s - mean) / std of the recorded reference set.
        """
        from rlft.data.batching import truncate

        if self.kind != "scalar":
            raise RlftError("score() needs a reward (scalar) model; this is a language model")
        tok = self._require_tokenizer()
        stats = self.reward_stats or {}
        if normalize and not stats:
            raise RlftError("score(normalize=True): this model has no reward_stats.json")
        if prompts is not None and len(prompts) != len(texts):
            raise RlftError(f"score(): {len(prompts)} prompts for {len(texts)} texts")
        bos = [tok.eos_token_id] if stats.get("add_bos", False) else []
        eos = [tok.eos_token_id] if stats.get("add_eos", True) else []
        max_length = min(stats.get("max_length") or self.config.max_positions, self.config.max_positions)
        rows = []
        for i, text in enumerate(texts):
            prompt = bos + (tok.encode(prompts[i], add_special_tokens=False) if prompts is not None else [])
            prompt, completion = truncate(prompt, tok.encode(text, add_special_tokens=False) + eos, max_length)
            rows.append(prompt + completion)
        out = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            longest = max(max(len(r) for r in chunk), 1)
            length = min(1 << (longest - 1).bit_length(), self.config.max_positions)  # few shapes
            tokens = np.full((len(chunk), length), tok.pad_token_id, np.int32)
            mask = np.zeros((len(chunk), length), np.int32)
            for i, r in enumerate(chunk):
                tokens[i, :len(r)], mask[i, :len(r)] = r, 1
            scores = np.asarray(self._forward(self.params, jnp.asarray(tokens), jnp.asarray(mask)))
            out.append(scores[np.arange(len(chunk)), np.maximum(mask.sum(1) - 1, 0)])
        scores = np.concatenate(out).astype(np.float32) if out else np.zeros((0,), np.float32)
        if normalize:
            from rlft.scoring import normalize_scores

            scores = normalize_scores(scores, stats)
        return scores

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise RlftError("this model has no tokenizer; pass token ids instead of text")
        return self.tokenizer


def _run_dir_of(path: str) -> str | None:
    """The rlft run directory holding `path` (the first ancestor with model_config.json)."""
    from rlft.checkpoints import MODEL_CONFIG_FILE

    current = os.path.abspath(path)
    for _ in range(5):
        if os.path.isfile(os.path.join(current, MODEL_CONFIG_FILE)):
            return current
        current = os.path.dirname(current)
    return None


def _load_run(run_dir: str, path: str) -> Model:
    """A model from an rlft run dir (its last stage), a stage dir, a checkpoints dir or a step dir."""
    from rlft.checkpoints import load_model_config, load_params
    from rlft.data.tokenizer import load_tokenizer
    from rlft.stages import STAGES_FILE

    stages_file = os.path.join(run_dir, STAGES_FILE)
    stages = json.load(open(stages_file)) if os.path.isfile(stages_file) else []
    if os.path.abspath(path) == run_dir:
        if not stages:
            raise RlftError(f"{run_dir}: no {STAGES_FILE}; pass a stage or checkpoint directory")
        path = os.path.join(run_dir, stages[-1]["name"])
    relative = os.path.relpath(os.path.abspath(path), run_dir).split(os.sep)[0]
    kind = next((s["kind"] for s in stages if s["name"] == relative), "lm")
    cfg = load_model_config(run_dir)
    cls = Decoder if kind == "lm" else ScalarModel
    state = nnx.state(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
    values, _ = load_params(path)
    nnx.replace_by_pure_dict(state, values)
    tok_dir = os.path.join(run_dir, "tokenizer")
    tokenizer = load_tokenizer(tok_dir) if os.path.isdir(tok_dir) else None
    stats = None
    if kind == "scalar":
        from rlft.scoring import read_reward_stats

        stats = read_reward_stats(os.path.join(run_dir, relative))
    return Model(config=cfg, params=state, tokenizer=tokenizer, kind=kind, reward_stats=stats)


def load(path: str) -> Model:
    """Load a Hugging Face checkpoint dir (GPT-2, Llama, Qwen2) or an rlft run/checkpoint dir.

    A run directory gives the model of its last stage; a stage, checkpoints or step directory
    gives that one (the latest step unless a step directory is named).
    """
    if not os.path.exists(path):
        raise RlftError(f"no such file or directory: {path}")
    if hf.is_hf_checkpoint(path):
        cfg, params, tokenizer = hf.load_hf_checkpoint(path)
        return Model(config=cfg, params=params, tokenizer=tokenizer)
    run_dir = _run_dir_of(path)
    if run_dir is None:
        raise RlftError(f"{path}: not a Hugging Face checkpoint directory (no config.json) "
                        f"nor inside an rlft run directory (no model_config.json)")
    return _load_run(run_dir, path)
