"""`rlft.load`: one entry point for Hugging Face checkpoints and rlft runs, for notebooks and CLIs."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlft.errors import RlftError
from rlft.models import Decoder, ModelConfig, ScalarModel, positions_from_mask
from rlft.models import hf

AUTO_SLOTS = 64  # Model.generate: more prompts than this go through the continuous-batching engine


def _shown(value: Any) -> str:
    """A short repr of an argument for an error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(value: Any, low: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= low


def _real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(value)


def _texts(value: Any, arg: str) -> list[str]:
    """`value` as a list of str; RlftError naming `arg` for a bare str/bytes or a non-str item."""
    if isinstance(value, (str, bytes)):
        raise RlftError(f"{arg}={_shown(value)}: expected a list of strings, got a single "
                        f"{type(value).__name__}; wrap it in a list")
    if not isinstance(value, (list, tuple)):
        raise RlftError(f"{arg}: expected a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise RlftError(f"{arg}[{i}]={_shown(item)}: expected a str, got {type(item).__name__}")
        _check_unicode(item, f"{arg}[{i}]={_shown(item)}")
    return list(value)


def _check_unicode(text: str, where: str) -> None:
    """RlftError starting with `where` if `text` cannot be UTF-8 encoded (a lone surrogate, e.g.
    from bytes decoded with errors="surrogateescape"); tokenizers would raise from inside Rust."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RlftError(f"{where}: not valid Unicode text (a lone surrogate "
                        f"{text[e.start]!r} at position {e.start}); decode the source with "
                        f"errors='replace'") from None


@dataclasses.dataclass
class Model:
    """A loaded model: config, params (nnx.State), tokenizer, and pure-function helpers.

    `kind` is "lm" for a language model (Decoder) and "scalar" for a reward/value model;
    `reward_stats` is a reward stage's reward_stats.json (mean, std, add_bos, add_eos, max_length)
    if any, or a Hugging Face reward model's framing (add_bos, bos_id, add_eos, max_length; no mean/std).
    """

    config: ModelConfig
    params: nnx.State
    tokenizer: Any = None
    kind: str = "lm"
    reward_stats: dict | None = None
    eos_ids: tuple[int, ...] = ()  # generation stops at any (the tokenizer's EOS + generation_config.json's)

    @functools.cached_property
    def graphdef(self) -> nnx.GraphDef:
        """The static half of the module; `nnx.merge(m.graphdef, m.params)` rebuilds it."""
        cls = Decoder if self.kind == "lm" else ScalarModel
        return nnx.graphdef(nnx.eval_shape(lambda: cls(self.config, rngs=nnx.Rngs(0))))

    @functools.cached_property
    def _forward(self):
        graphdef = self.graphdef
        return jax.jit(lambda params, t, m: nnx.merge(graphdef, params)(t, positions_from_mask(m), m))

    def _token_ids(self, value: Any, arg: str, ndim: int) -> np.ndarray:
        """int32 ids with `ndim` dims in [0, vocab) and at most max_positions long; else RlftError naming `arg`."""
        if isinstance(value, (str, bytes)):
            raise RlftError(f"{arg}={_shown(value)}: expected integer token ids, got {type(value).__name__}"
                            + ("; pass text prompts as a list of str" if ndim == 1 else
                               "; tokenise text first (model.tokenizer.encode)"))
        try:
            ids = np.asarray(value)
        except ValueError:  # ragged rows
            raise RlftError(f"{arg}: rows of different lengths; pad them to one length and pass "
                            f"attention_mask") from None
        if ids.size == 0:
            raise RlftError(f"{arg}: no tokens (shape {ids.shape})")
        if ids.dtype.kind not in "iu":
            what = "floats" if ids.dtype.kind == "f" else "bools" if ids.dtype.kind == "b" else \
                f"{ids.dtype} values" if ids.dtype != object else "rows of different lengths or non-numbers"
            raise RlftError(f"{arg}: expected integer token ids, got {what}")
        if ids.ndim != ndim:
            shape = "[batch, length]" if ndim == 2 else "[length]"
            raise RlftError(f"{arg}: expected {shape} token ids, got shape {ids.shape}")
        vocab = self.config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise RlftError(f"{arg}: token id {bad} is outside the model's vocabulary [0, {vocab})")
        if ids.shape[-1] > self.config.max_positions:
            raise RlftError(f"{arg}: {ids.shape[-1]} tokens exceed the model's max_positions="
                            f"{self.config.max_positions}")
        return ids.astype(np.int32)

    def _inputs(self, token_ids, attention_mask) -> tuple[jax.Array, jax.Array]:
        tokens = self._token_ids(token_ids, "token_ids", ndim=2)
        if attention_mask is None:
            return jnp.asarray(tokens), jnp.ones(tokens.shape, jnp.int32)
        mask = np.asarray(attention_mask)
        if mask.shape != tokens.shape:
            raise RlftError(f"attention_mask: shape {mask.shape} != token_ids shape {tokens.shape}")
        if mask.dtype.kind not in "iubf" or not np.isin(mask, (0, 1)).all():
            raise RlftError("attention_mask: expected 0/1 values (1 = real token, 0 = padding)")
        return jnp.asarray(tokens), jnp.asarray(mask, jnp.int32)

    def logits(self, token_ids, attention_mask=None) -> np.ndarray:
        """float32 [batch, length, vocab] logits of token ids; left or right padding.

        token_ids: integer ids [batch, length] (a nested list or an integer array), each in
        [0, vocab_size), length <= max_positions; text is refused (tokenise it first).
        attention_mask: 0/1 of the same shape (1 = real token), default all ones.
        """
        if self.kind != "lm":
            raise RlftError("logits() needs a language model; this is a scalar (reward/value) model")
        return np.asarray(self._forward(self.params, *self._inputs(token_ids, attention_mask)))

    def _prompt_ids(self, prompts: Any) -> tuple[list[list[int]], bool]:
        """(token ids of each prompt, whether the prompts were text); RlftError naming the bad prompt."""
        if isinstance(prompts, (str, bytes)):
            raise RlftError(f"generate(prompts={_shown(prompts)}): expected a list of prompts, got a "
                            f"single {type(prompts).__name__}; wrap one prompt in a list")
        if isinstance(prompts, np.ndarray):
            prompts = list(self._token_ids(prompts, "generate(prompts)", ndim=2))
        if not isinstance(prompts, (list, tuple)):
            raise RlftError(f"generate(prompts): expected a list of str or of token-id lists, got "
                            f"{type(prompts).__name__}")
        if not prompts:
            raise RlftError("generate(prompts=[]): no prompts")
        as_text = isinstance(prompts[0], str)
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, bytes):
                raise RlftError(f"generate(prompts[{i}]={_shown(prompt)}): bytes are neither text nor "
                                f"token ids; decode them to str")
            if isinstance(prompt, str) != as_text:
                raise RlftError(f"generate(prompts[{i}]={_shown(prompt)}): prompts mix text and token "
                                f"ids (prompts[0] is {'text' if as_text else 'token ids'}); pass one kind")
            if as_text and not prompt:
                raise RlftError(f"generate(prompts[{i}]=''): empty prompt")
            if as_text:
                _check_unicode(prompt, f"generate(prompts[{i}]={_shown(prompt)})")
        if as_text:
            tok = self._require_tokenizer()
            prompts = [tok.encode(p, add_special_tokens=False) for p in prompts]
        return [self._token_ids(p, f"generate(prompts[{i}])", ndim=1).tolist()
                for i, p in enumerate(prompts)], as_text

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 32,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, mesh: jax.sharding.Mesh | None = None, slots: int | None = None) -> dict:
        """Sample completions of text or token-id prompts (temperature=0: greedy).

        prompts: a non-empty list of non-empty prompts, either all str (needs a tokenizer) or all
        token-id lists (ints in [0, vocab_size)); a bare str or bytes is refused. The longest
        prompt + max_new_tokens must fit in max_positions. max_new_tokens >= 1; temperature >= 0
        (0 = greedy); top_k >= 0 (0 = off); top_p in (0, 1] (1 = off); seed an integer >= 0.

        Returns {"text": [str] (when prompts are strings), "tokens": int32 [batch, max_new_tokens]
        (pad after EOS), "mask": [batch, max_new_tokens], "logprobs": float32 [batch,
        max_new_tokens] under the distribution sampled from}. With `mesh` (from
        `rlft.parallel.sharding.make_mesh`), the prompts are split over its data axes and the parameters
        replicated; the number of prompts must divide evenly. Same results as without.
        slots: run the prompts through the continuous-batching engine with that many slots
        (`rlft.generate.engine`: a finished row's slot takes the next prompt; memory for `slots`
        rows, not for every prompt; with a mesh, a multiple of its data shards, split over them);
        0 = one static batch; None (default) = the engine with AUTO_SLOTS slots for more than
        AUTO_SLOTS prompts without a mesh. Same results either way.
        """
        from rlft.data.batching import pad_left
        from rlft.generate.engine import generate_continuous
        from rlft.generate.sampling import SamplingParams, sample
        from rlft.parallel.sharding import replicated

        if self.kind != "lm":
            raise RlftError("generate() needs a language model; this is a scalar (reward/value) model")
        for arg, value, ok, rule in (
                ("max_new_tokens", max_new_tokens, _integer(max_new_tokens, 1), "an integer >= 1"),
                ("temperature", temperature, _real(temperature) and temperature >= 0, "a number >= 0 (0 = greedy)"),
                ("top_k", top_k, _integer(top_k, 0), "an integer >= 0 (0 = off)"),
                ("top_p", top_p, _real(top_p) and 0 < top_p <= 1, "a number in (0, 1] (1 = off)"),
                ("seed", seed, _integer(seed, 0), "an integer >= 0"),
                ("slots", slots, slots is None or _integer(slots, 0), "None or an integer >= 0 (0 = static)")):
            if not ok:
                raise RlftError(f"generate({arg}={_shown(value)}): must be {rule}")
        ids, as_text = self._prompt_ids(prompts)
        longest = max(len(r) for r in ids)
        if longest + max_new_tokens > self.config.max_positions:
            raise RlftError(f"generate(max_new_tokens={max_new_tokens}): the longest prompt ({longest} tokens) "
                            f"+ max_new_tokens exceeds the model's max_positions={self.config.max_positions}")
        tok = self.tokenizer
        eos_id = self.eos_ids or (-1 if tok is None or tok.eos_token_id is None else tok.eos_token_id)  # -1: never
        pad_id = 0 if tok is None or tok.pad_token_id is None else tok.pad_token_id
        tokens, mask, _ = pad_left(ids, longest, pad_id)
        sampling = SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
        if slots is None:
            slots = AUTO_SLOTS if mesh is None and len(ids) > AUTO_SLOTS else 0
        param_shardings = None if mesh is None else jax.tree.map(lambda _: replicated(mesh), self.params)
        if slots:
            params = self.params if mesh is None else jax.device_put(self.params, param_shardings)
            try:
                out = generate_continuous(self.graphdef, params, tokens, mask, jax.random.key(int(seed)),
                                          slots=int(slots), max_new_tokens=int(max_new_tokens), eos_id=eos_id,
                                          pad_id=pad_id, sampling=sampling, mesh=mesh)
            except RlftError as e:
                raise RlftError(f"generate(slots={slots}): {e}") from None
        else:
            out = sample(self.graphdef, self.params, tokens, mask, jax.random.key(int(seed)),
                         max_new_tokens=int(max_new_tokens), eos_id=eos_id, pad_id=pad_id, sampling=sampling,
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

        texts (and prompts, if given): lists of str of the same length; a bare str is refused.
        batch_size: an integer >= 1. Texts are tokenised as in training, following
        reward_stats.json: EOS before the text (add_bos) and after it (add_eos, the default), and
        over-long sequences truncated to its max_length by `rlft.data.batching.truncate`. With `prompts`, each text follows its prompt.
        `normalize` maps scores to (s - mean) / std of the recorded reference set.
        """
        from rlft.generate.scoring import has_reference_stats, reward_examples, sequence_scores
        from rlft.parallel.sharding import local_device_mesh

        if self.kind != "scalar":
            raise RlftError("score() needs a reward (scalar) model; this is a language model")
        tok = self._require_tokenizer()
        stats = self.reward_stats or {}
        if normalize and not has_reference_stats(stats):
            raise RlftError("score(normalize=True): this model has no reward_stats.json")
        texts = _texts(texts, "score(texts)")
        if prompts is not None and len(_texts(prompts, "score(prompts)")) != len(texts):
            raise RlftError(f"score(prompts): {len(prompts)} prompts for {len(texts)} texts")
        if not _integer(batch_size, 1):
            raise RlftError(f"score(batch_size={_shown(batch_size)}): must be an integer >= 1")
        examples = reward_examples(tok, texts, prompts, stats, self.config.max_positions)
        if not examples:
            return np.zeros((0,), np.float32)
        longest = max(max(len(p) + len(c) for p, c in examples), 1)
        length = min(1 << (longest - 1).bit_length(), self.config.max_positions)  # few shapes
        mesh = local_device_mesh()
        scores = sequence_scores(self.graphdef, self.params, examples, length, tok.pad_token_id, mesh,
                                 min(batch_size, len(examples)))
        if normalize:
            from rlft.generate.scoring import normalize_scores

            scores = normalize_scores(scores, stats)
        return scores

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise RlftError("this model has no tokenizer; pass token ids instead of text")
        return self.tokenizer


def _load_run(run_dir: str, path: str) -> Model:
    """A model from an rlft run dir (its last stage), a stage dir, a checkpoints dir or a step dir."""
    from rlft.train.checkpoints import load_model_config
    from rlft.train.warm_start import load_values
    from rlft.data.tokenizer import load_tokenizer
    from rlft.generate.scoring import read_reward_stats
    from rlft.train.stages import STAGES_FILE, read_stages

    stages = read_stages(run_dir)
    if os.path.abspath(path) == run_dir:
        if not stages:
            raise RlftError(f"{run_dir}: no {STAGES_FILE}; pass a stage or checkpoint directory")
        path = os.path.join(run_dir, stages[-1]["name"])
    relative = os.path.relpath(os.path.abspath(path), run_dir).split(os.sep)[0]
    kind = next((s["kind"] for s in stages if s["name"] == relative), "lm")
    # The small files first, so a damaged one is reported before the parameters are read.
    cfg = load_model_config(run_dir)
    tok_dir = os.path.join(run_dir, "tokenizer")
    tokenizer = load_tokenizer(tok_dir) if os.path.isdir(tok_dir) else None
    stats = read_reward_stats(os.path.join(run_dir, relative)) if kind == "scalar" else None
    cls = Decoder if kind == "lm" else ScalarModel
    state = nnx.state(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, load_values(path))
    return Model(config=cfg, params=state, tokenizer=tokenizer, kind=kind, reward_stats=stats,
                 eos_ids=_eos_ids(tokenizer, tok_dir))


def _hf_tokenizer(path: str):
    """The tokenizer saved beside a Hugging Face checkpoint, or None when it has none."""
    from rlft.data.tokenizer import read_pretrained_tokenizer

    if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        return read_pretrained_tokenizer(path)
    return None


def _eos_ids(tokenizer, directory: str) -> tuple[int, ...]:
    """The ids generation stops at: the tokenizer's EOS and DIRECTORY/generation_config.json's."""
    from rlft.data.records import eos_token_ids

    return tuple(eos_token_ids(tokenizer, directory))


def _hf_reward_framing(path: str, tokenizer, cfg: ModelConfig) -> dict:
    """How transformers frames a text for a sequence-classification checkpoint, as reward_stats.json
    keys (no mean/std: nothing was recorded to normalise with).

    `tokenizer(text)` adds the tokenizer's own special tokens (Llama: BOS; GPT-2, Qwen2: none),
    found by encoding a probe text with and without them: one id before the text is `add_bos` with
    that `bos_id`, EOS after it `add_eos`; anything else is an RlftError. `max_length` is the
    model's max_positions. The HF model reads its score at the last non-pad token, as rlft does. A
    tokenizer without a pad token gets config.json's pad_token_id (rlft uses it only as filler).
    """
    from rlft.files import read_json

    framing = {"add_bos": False, "add_eos": False, "max_length": cfg.max_positions}
    if tokenizer is None:
        return framing
    if tokenizer.pad_token_id is None:
        pad_id = read_json(os.path.join(path, "config.json")).get("pad_token_id")
        if _integer(pad_id, 0) and pad_id < len(tokenizer):
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    plain = tokenizer.encode("a b", add_special_tokens=False)
    full = tokenizer.encode("a b")
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), len(full))
    before, after = full[:at], full[at + len(plain):]
    if not plain or at == len(full) or len(before) > 1 or after not in ([], [tokenizer.eos_token_id]):
        raise RlftError(f"{path}: the tokenizer frames a text as {full} (without special tokens: {plain}); "
                        f"rlft reproduces at most one token before a text and EOS after it")
    if before:
        framing.update(add_bos=True, bos_id=int(before[0]))
    framing["add_eos"] = bool(after)
    return framing


def load(path: str) -> Model:
    """Load a Hugging Face checkpoint dir (GPT-2, Llama, Qwen2) or an rlft run/checkpoint dir.

    A Hugging Face sequence-classification checkpoint (num_labels=1) is a reward model:
    kind="scalar", with `reward_stats` holding only the framing of its texts (`_hf_reward_framing`),
    so `score(texts)` equals the HF model's logits of `tokenizer(texts)`. A run directory gives
    the model of its last stage; a stage, checkpoints or step directory gives that one (the
    latest step unless a step directory is named).
    """
    if not os.path.exists(path):
        raise RlftError(f"no such file or directory: {path}")
    if hf.is_hf_scalar_checkpoint(path):  # a sequence-classification reward model
        cfg, params = hf.load_hf_scalar_checkpoint(path)
        tokenizer = _hf_tokenizer(path)
        return Model(config=cfg, params=params, tokenizer=tokenizer, kind="scalar",
                     reward_stats=_hf_reward_framing(path, tokenizer, cfg))
    if hf.is_hf_checkpoint(path):
        cfg, params = hf.load_hf_checkpoint(path)
        tokenizer = _hf_tokenizer(path)
        return Model(config=cfg, params=params, tokenizer=tokenizer, eos_ids=_eos_ids(tokenizer, path))
    from rlft.train.warm_start import run_dir_of

    run_dir = run_dir_of(path)
    if run_dir is None:
        raise RlftError(f"{path}: not a Hugging Face checkpoint directory (no config.json) "
                        f"nor inside an rlft run directory (no model_config.json)")
    return _load_run(run_dir, path)
