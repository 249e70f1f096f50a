"""Sample several policies on the same prompts and measure their samples: the evaluation's device work.

    sample_policy    completions of fixed prompts with the same sampling settings and keys for every
                     policy (common random numbers: two identical policies give identical samples)
    logprobs_under   the log-probs of a policy's samples under another model (e.g. the SFT reference,
                     for KL(policy‖reference))
    text_perplexity  perplexity of held-out human text under a model

Prompts go in fixed-size, left-padded batches (the last one filled with copies of the first prompt),
so each model compiles the sampler once; long prompt lists in one process go through the
continuous-batching engine instead (same completions: each prompt's random stream is its index's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rlft.data.batching import Example, pad_left
from rlft.parallel.distributed import to_host
from rlft.errors import RlftError
from rlft.eval.metrics import perplexity
from rlft.generate.engine import generate_continuous
from rlft.generate.logprobs import SamplingParams
from rlft.rl.rollout import ended_with_eos, reference_logprobs
from rlft.generate.sampling import Sequences, sample
from rlft.generate.scoring import completion_token_logprobs
from rlft.parallel.sharding import batch_shards


@dataclasses.dataclass
class PolicySamples:
    """One policy's completions of the evaluation prompts, rows in prompt order.

    texts: decoded completions (special tokens dropped); mask, logprobs: float32 [n, max_new_tokens]
    (log-probs under the distribution sampled from, 0 where masked); ended: bool [n], the completion
    produced EOS; batches: the device-side training layout of each batch (for `logprobs_under`).
    """

    texts: list[str]
    mask: np.ndarray
    logprobs: np.ndarray
    ended: np.ndarray
    batches: list[Sequences]
    sampling: SamplingParams

    @property
    def lengths(self) -> np.ndarray:
        """int [n]: completion tokens of each row (EOS included)."""
        return self.mask.sum(axis=1).astype(int)


def _batch_size(batch_size: int, n: int, mesh: Mesh | None) -> int:
    """`batch_size` capped at n and rounded up to a multiple of the mesh's data axes."""
    ways = batch_shards(mesh)
    return -(-min(batch_size, n) // ways) * ways


def sample_policy(graphdef: nnx.GraphDef, params: nnx.State, prompt_ids: Sequence[Sequence[int]],
                  tokenizer, *, max_new_tokens: int, sampling: SamplingParams, seed: int,
                  eos_id: int | Sequence[int], pad_id: int, mesh: Mesh | None = None, batch_size: int = 128,
                  slots: int | None = None) -> PolicySamples:
    """Sample one completion of every prompt; prompt i draws with the stream of row i of key(seed).

    The keys depend only on (seed, prompt index) (`rlft.generate.sampling.row_keys`), so every
    policy evaluated with the same seed sees the same random numbers (differences between policies
    are not sampling noise of the keys), whatever the batch size or the sampler.
    slots: sample through the continuous-batching engine with that many slots
    (`rlft.generate.engine`; one process; with a mesh, split over its data shards); 0 = static
    batches of `batch_size`; None (default) = the engine with one batch's worth of slots when
    there are more prompts than that and the run has one process. Same completions either way.
    """
    if not prompt_ids:
        raise RlftError("sample_policy: no prompts")
    width = max(len(p) for p in prompt_ids)
    size = _batch_size(batch_size, len(prompt_ids), mesh)
    if slots is None:
        one_process = mesh is None or not mesh.is_multi_process
        slots = size if one_process and len(prompt_ids) > size else 0
    key = jax.random.key(seed)
    if slots:
        tokens, mask, _ = pad_left(list(prompt_ids), width, pad_id)
        whole = generate_continuous(graphdef, params, tokens, mask, key, slots=slots, max_new_tokens=max_new_tokens,
                                    eos_id=eos_id, pad_id=pad_id, sampling=sampling, mesh=mesh)
    texts, masks, logps, ended, batches = [], [], [], [], []
    for start in range(0, len(prompt_ids), size):
        chunk = list(prompt_ids[start:start + size])
        real = len(chunk)
        chunk += [chunk[0]] * (size - real)  # fixed shapes; the copies are dropped below
        tokens, mask, _ = pad_left(chunk, width, pad_id)
        if slots:
            rows = np.minimum(np.arange(start, start + size), len(prompt_ids) - 1)
            out = jax.tree.map(lambda x: x[rows] if x.ndim else x, whole)
        else:
            out = sample(graphdef, params, tokens, mask, key, max_new_tokens=max_new_tokens, eos_id=eos_id,
                         pad_id=pad_id, sampling=sampling, mesh=mesh, first_row=start)
        seqs = Sequences.from_sample(jax.numpy.asarray(tokens), jax.numpy.asarray(mask), out)
        rows, lengths, mask, logprobs = to_host((out.tokens, out.lengths, out.mask, out.logprobs))
        rows, lengths = rows[:real], lengths[:real]
        texts += tokenizer.batch_decode([r[:n] for r, n in zip(rows.tolist(), lengths)], skip_special_tokens=True)
        masks.append(mask.astype(np.float32)[:real])
        logps.append(logprobs.astype(np.float32)[:real])
        ended.append(np.asarray(ended_with_eos(out.tokens, out.mask, eos_id))[:real])
        batches.append(seqs)
    return PolicySamples(texts=texts, mask=np.concatenate(masks), logprobs=np.concatenate(logps),
                         ended=np.concatenate(ended), batches=batches, sampling=sampling)


_reference_logprobs = jax.jit(reference_logprobs, static_argnames=("graphdef", "sampling"))


def logprobs_under(graphdef: nnx.GraphDef, params: nnx.State, samples: PolicySamples) -> np.ndarray:
    """float32 [n, max_new_tokens]: log-probs of `samples`' tokens under the model `params`, with the
    samples' sampling distribution (temperature, top-k/top-p); 0 where masked."""
    n = len(samples.texts)
    out = [np.asarray(_reference_logprobs(graphdef, params, seqs, samples.sampling))
           for seqs in samples.batches]
    return np.where(samples.mask > 0, np.concatenate(out)[:n], 0.0).astype(np.float32)


def text_perplexity(graphdef: nnx.GraphDef, params: nnx.State, examples: Sequence[Example], length: int,
                    pad_id: int, mesh: Mesh, batch_size: int = 64) -> float:
    """Corpus perplexity of the completion tokens of `examples` ((prompt ids, text ids) pairs, e.g.
    ([EOS], sentence + [EOS])) under the Decoder `params` at temperature 1."""
    logp, mask = completion_token_logprobs(graphdef, params, examples, length, pad_id, mesh, batch_size)
    return perplexity(logp, mask)
