"""The RL-step benchmark's workload, shared by rlft and the peers it is measured beside.

Everything both sides must agree on lives here: the tokenizer (a byte-level BPE of 512 ids trained
with `tokenizers` on a generated corpus, nothing downloaded), the 64 prompts of exactly 16 tokens,
the tiny GPT-2 shape, the reward function and the step's sizes. The module imports only
`tokenizers` and `transformers` (lazily), so it serves rlft's own environment and the peers'
virtual environments alike; `workload_digest` lets a driver check that both built the same thing.

Tokenizer: eos ``<|endoftext|>`` = 0 (also bos), pad ``<pad>`` = 1, left padding. The corpus and
the prompt selection are deterministic (seeded `random.Random`), so every process that calls
`build_tokenizer` / `build_prompts` gets the same ids.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics

# One optimizer step: PROMPTS_PER_STEP prompts x GROUP_SIZE completions each.
PROMPTS_PER_STEP = 4
GROUP_SIZE = 8
COMPLETIONS_PER_STEP = PROMPTS_PER_STEP * GROUP_SIZE  # 32
NUM_PROMPTS = 64
PROMPT_TOKENS = 16
MAX_NEW_TOKENS = 48
TEMPERATURE = 1.0
LEARNING_RATE = 1e-5
VOCAB_SIZE = 512

# GPT2Config keyword arguments of the "tiny" model (3,356,160 parameters, tied LM head).
TINY_GPT2 = {"n_layer": 4, "n_head": 4, "n_embd": 256, "n_positions": 256, "vocab_size": VOCAB_SIZE}

EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<pad>"

_WORDS = ("the a one two red blue green cat dog bird fish runs jumps eats sleeps sees finds big small "
          "fast slow happy sad tree house river hill moon sun star and or but with under over near far "
          "count add plus minus equals number apple banana seven three five nine ten").split()
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """``n`` generated sentences of 6-14 words: mostly from a small word list, ~30% random letter strings."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(6, 14)):
            if rng.random() < 0.7:
                words.append(rng.choice(_WORDS))
            else:
                words.append("".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 6))))
        sentences.append(" ".join(words) + ".")
    return sentences


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A `transformers.PreTrainedTokenizerFast`: byte-level BPE trained on `corpus()`, left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                  pad_token=PAD_TOKEN, unk_token=None)
    tok.padding_side = "left"
    assert len(tok) <= vocab_size, len(tok)
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 1), (tok.eos_token_id, tok.pad_token_id)
    return tok


def build_prompts(tok, n: int = NUM_PROMPTS, tokens: int = PROMPT_TOKENS) -> list[str]:
    """``n`` prompt texts that each encode to exactly ``tokens`` ids.

    Sentences of a second corpus (seed 7) are cut to their first ``tokens`` ids and decoded; a cut
    that does not re-encode to the same length is skipped.
    """
    prompts = []
    for sentence in corpus(400, seed=7):
        ids = tok(sentence)["input_ids"]
        if len(ids) < tokens:
            continue
        text = tok.decode(ids[:tokens])
        if len(tok(text)["input_ids"]) == tokens:
            prompts.append(text)
            if len(prompts) == n:
                return prompts
    raise RuntimeError(f"only {len(prompts)} prompts of {tokens} tokens in the corpus, wanted {n}")


def build_workload():
    """(tokenizer, prompts): the tokenizer and the 64 prompts of 16 tokens every side uses."""
    tok = build_tokenizer()
    return tok, build_prompts(tok)


def count_a(text: str) -> float:
    """The benchmark's reward for one completion: how many letters 'a' its text holds."""
    return float(text.count("a"))


def reward_count_a(completions, **kwargs) -> list[float]:
    """`count_a` over a batch of completion texts (trl's reward-function signature)."""
    return [count_a(c) for c in completions]


def workload_digest(tok, prompts: list[str]) -> str:
    """Short hash of the vocabulary and the prompts' token ids, to check two sides built the same workload."""
    payload = json.dumps({"vocab": sorted(tok.get_vocab().items()),
                          "prompts": [tok(p)["input_ids"] for p in prompts]})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


if __name__ == "__main__":
    tok, prompts = build_workload()
    print(f"vocab {len(tok)}, eos {tok.eos_token_id}, pad {tok.pad_token_id}, {len(prompts)} prompts, "
          f"digest {workload_digest(tok, prompts)}")
    for p in prompts[:3]:
        print(repr(p), tok(p)["input_ids"])


# --- What every peer script reports (the driver reads one RESULT line per run) ------------------

RESULT_PREFIX = "RESULT "


def print_result(result: dict) -> None:
    """The one line a driver reads: ``RESULT {json}``."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def median_after(values: list[float], skip: int) -> float | None:
    """Median of ``values[skip:]`` (None if empty)."""
    kept = values[skip:]
    return statistics.median(kept) if kept else None


def rounded(values: list[float], digits: int = 4) -> list[float]:
    return [round(v, digits) for v in values]
