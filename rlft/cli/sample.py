"""`rlft sample PATH --prompt TEXT [...]`: sample completions from a checkpoint and print them."""

from __future__ import annotations

import argparse

from rlft.errors import RlftError


class _Parser(argparse.ArgumentParser):
    """argparse that raises RlftError instead of exiting, so the CLI prints one clean line."""

    def error(self, message: str):
        raise RlftError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlft sample", description="Sample completions of prompts from a checkpoint.")
    parser.add_argument("path", help="anything rlft.load takes: an HF checkpoint or an rlft run/checkpoint dir")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text; repeat for a batch of prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def sample_command(args: list[str]) -> int:
    """Run `rlft sample` with the arguments after `sample`; returns the exit status (0)."""
    import rlft
    from rlft.generate.sampling import SamplingParams

    opts = _parser().parse_args(args)
    for flag, ok, rule in (("--max-new-tokens", opts.max_new_tokens >= 1, ">= 1"),
                           ("--temperature", opts.temperature >= 0, ">= 0 (0 = greedy)"),
                           ("--top-k", opts.top_k >= 0, ">= 0 (0 = off)"),
                           ("--top-p", 0 < opts.top_p <= 1, "in (0, 1] (1 = off)")):
        if not ok:
            raise RlftError(f"{flag}={getattr(opts, flag[2:].replace('-', '_'))}: must be {rule}")
    sampling = SamplingParams(temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p)
    model = rlft.load(opts.path)
    if model.tokenizer is None:
        raise RlftError(f"{opts.path}: no tokenizer files (tokenizer.json, vocab.json or tokenizer.model)")
    out = model.generate(opts.prompt, max_new_tokens=opts.max_new_tokens, temperature=sampling.temperature,
                         top_k=sampling.top_k, top_p=sampling.top_p, seed=opts.seed)
    eos_ids = set(model.eos_ids) or {model.tokenizer.eos_token_id}
    for i, prompt in enumerate(opts.prompt):
        completion = out["tokens"][i, : int(out["mask"][i].sum())].tolist()
        stop = "eos" if completion and completion[-1] in eos_ids else "length"
        print(f"--- sample {i}: {len(completion)} tokens, stopped at {stop} ---")
        print(prompt + out["text"][i])
    return 0
