"""`rlft sample PATH --prompt TEXT [...]`: sample completions from a checkpoint and print them."""

from __future__ import annotations

import argparse
import os

import numpy as np

from rlft.errors import RlftError


class _Parser(argparse.ArgumentParser):
    """argparse that raises RlftError instead of exiting, so the CLI prints one clean line."""

    def error(self, message: str):
        raise RlftError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlft sample", description="Sample completions of prompts from a checkpoint.")
    parser.add_argument("path", help="a Hugging Face checkpoint directory (with its tokenizer)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat for a batch of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def left_pad(ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask), both int32 [batch, longest]: rows right-aligned, pad_id / 0 on the left."""
    length = max(len(row) for row in ids)
    tokens = np.full((len(ids), length), pad_id, np.int32)
    mask = np.zeros((len(ids), length), np.int32)
    for i, row in enumerate(ids):
        if row:
            tokens[i, length - len(row):] = row
            mask[i, length - len(row):] = 1
    return tokens, mask


def sample_command(args: list[str]) -> int:
    """Run `rlft sample` with the arguments after `sample`; returns the exit status (0)."""
    import jax
    from flax import nnx

    from rlft.models.decoder import Decoder
    from rlft.models.hf import load_hf_checkpoint
    from rlft.sampling import SamplingParams, sample

    opts = _parser().parse_args(args)
    for flag, ok, rule in (("--max-new-tokens", opts.max_new_tokens >= 1, ">= 1"),
                           ("--temperature", opts.temperature >= 0, ">= 0 (0 = greedy)"),
                           ("--top-k", opts.top_k >= 0, ">= 0 (0 = off)"),
                           ("--top-p", 0 < opts.top_p <= 1, "in (0, 1] (1 = off)")):
        if not ok:
            raise RlftError(f"{flag}={getattr(opts, flag[2:].replace('-', '_'))}: must be {rule}")
    sampling = SamplingParams(temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p)
    if not os.path.isdir(opts.path):
        raise RlftError(f"{opts.path}: no such checkpoint directory")
    cfg, params, tokenizer = load_hf_checkpoint(opts.path)
    if tokenizer is None:
        raise RlftError(f"{opts.path}: no tokenizer files (tokenizer.json, vocab.json or tokenizer.model)")
    ids = [list(tokenizer.encode(p)) for p in opts.prompt]
    for prompt, row in zip(opts.prompt, ids):
        if not row:
            raise RlftError(f"--prompt {prompt!r} encodes to no tokens")
    eos_id = -1 if tokenizer.eos_token_id is None else tokenizer.eos_token_id  # -1 never fires
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else max(eos_id, 0)
    tokens, mask = left_pad(ids, pad_id)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    out = sample(graphdef, params, tokens, mask, jax.random.key(opts.seed),
                 max_new_tokens=opts.max_new_tokens, eos_id=eos_id, pad_id=pad_id, sampling=sampling)
    out_tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for i, prompt in enumerate(opts.prompt):
        completion = out_tokens[i, : lengths[i]].tolist()
        stop = "eos" if completion and completion[-1] == eos_id else "length"
        print(f"--- sample {i}: {len(completion)} tokens, stopped at {stop} ---")
        print(prompt + tokenizer.decode(completion, skip_special_tokens=True))
    return 0
