"""Integer arithmetic problems from a seed, a disjoint train/test split, a character tokenizer.

A problem is (a, op, b) with a, b in [0, max_operand] and op one of the characters of `ops`
(a subset of "+-*"). Its prompt is exactly f"{a}{op}{b}=" and its answer the decimal result,
with a leading '-' when subtraction goes below zero ("3-7=" -> "-4").

The problems are indexed 0 .. N-1 (N = len(ops) * (max_operand + 1)^2, one index per distinct
prompt string), so a split is a draw of distinct indices: `split_problems` draws num_test +
num_train of them without replacement with numpy's Generator seeded by `seed`; the first
num_test are the test set and the others the training set (num_train = 0: every problem not in
the test set). Test and training sets therefore never share a prompt string, and the same
(task, seed) always gives the same split, on any machine.

The tokenizer has one token per character of "0123456789+-*=" plus `<|endoftext|>` (EOS, id 0)
and `<|pad|>` (id 1); it is a Hugging Face tokenizer directory built with `tokenizers` (a BPE
model without merges over single characters), so it loads with `load_tokenizer` and
`transformers.AutoTokenizer`. Decoding concatenates characters; characters outside the
alphabet (e.g. spaces) are dropped when encoding.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlft.data.tokenizer import EOS_TOKEN, PAD_TOKEN
from rlft.parallel.distributed import is_primary
from rlft.errors import RlftError

OPS = "+-*"
ALPHABET = "0123456789+-*="


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem a op b; `prompt` is "a{op}b=", `answer` the decimal result."""

    a: int
    op: str
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    @property
    def answer(self) -> str:
        value = {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]
        return str(value)

    def record(self, tokenizer=None) -> dict:
        """{"text": prompt, "answer": answer} plus "ids" (the prompt's token ids) with a tokenizer."""
        out = {"text": self.prompt, "answer": self.answer}
        if tokenizer is not None:
            out["ids"] = encode(tokenizer, self.prompt)
        return out


def unique_ops(ops: str) -> str:
    """The distinct characters of `ops`, in order of first appearance ("+-+" -> "+-")."""
    return "".join(dict.fromkeys(ops))


def num_problems(max_operand: int, ops: str) -> int:
    """How many distinct problems (prompt strings) the task has."""
    return len(unique_ops(ops)) * (max_operand + 1) ** 2


def check_task(max_operand, ops, num_test: int = 0, num_train: int = 0) -> None:
    """RlftError naming `task.ops` / `task.max_operand` / `task.num_test` / `task.num_train` when
    the task is malformed or has too few distinct problems for the requested split."""
    if not isinstance(ops, str) or not ops:
        raise RlftError(f"task.ops={ops!r}: must be a non-empty string of characters from {OPS!r}")
    bad = sorted(set(ops) - set(OPS))
    if bad:
        raise RlftError(f"task.ops={ops!r}: unknown operator(s) {''.join(bad)!r}; use characters "
                        f"from {OPS!r}")
    if isinstance(max_operand, bool) or not isinstance(max_operand, (int, np.integer)) or max_operand < 1:
        raise RlftError(f"task.max_operand={max_operand!r}: must be an integer >= 1")
    for name, value in (("task.num_test", num_test), ("task.num_train", num_train)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise RlftError(f"{name}={value!r}: must be an integer >= 0")
    total = num_problems(max_operand, ops)
    if num_test < 1:
        raise RlftError(f"task.num_test={num_test}: need at least one test problem")
    if num_test + max(num_train, 1) > total:
        raise RlftError(f"task.num_test={num_test} + task.num_train={num_train} problems requested, "
                        f"but task.max_operand={max_operand} with task.ops={ops!r} has only {total} "
                        f"distinct problems (and training needs at least one): raise "
                        f"task.max_operand, add task.ops, or ask for fewer")


def problem_at(index: int, max_operand: int, ops: str) -> Problem:
    """The problem with index `index` in [0, num_problems): op-major, then a, then b."""
    ops = unique_ops(ops)
    side = max_operand + 1
    op, rest = divmod(int(index), side * side)
    a, b = divmod(rest, side)
    return Problem(a, ops[op], b)


def split_problems(max_operand: int, ops: str, num_test: int, num_train: int = 0,
                   seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """(train, test): disjoint lists of distinct problems drawn from `seed` (see the module doc).

    num_train = 0 takes every problem not in the test set, in a seeded random order.
    """
    check_task(max_operand, ops, num_test, num_train)
    total = num_problems(max_operand, ops)
    count = num_test + num_train if num_train else total
    rng = np.random.default_rng([seed, 0x617269])  # a stream of its own for the split
    indices = rng.choice(total, size=count, replace=False)
    test = [problem_at(i, max_operand, ops) for i in indices[:num_test]]
    train = [problem_at(i, max_operand, ops) for i in indices[num_test:]]
    return train, test


def max_prompt_length(max_operand: int, ops: str) -> int:
    """The longest prompt in characters (= tokens): f"{max_operand}{op}{max_operand}=")."""
    return 2 * len(str(max_operand)) + 2


def max_answer_length(max_operand: int, ops: str) -> int:
    """The longest answer in characters (= tokens), without EOS."""
    ops = unique_ops(ops)
    longest = 0
    if "+" in ops:
        longest = max(longest, len(str(2 * max_operand)))
    if "-" in ops:
        longest = max(longest, len(str(-max_operand)))
    if "*" in ops:
        longest = max(longest, len(str(max_operand * max_operand)))
    return longest


def build_tokenizer(out_dir: str | None = None) -> PreTrainedTokenizerFast:
    """The character tokenizer (EOS id 0, pad id 1, then one id per character of ALPHABET).

    Saved as a Hugging Face tokenizer directory in `out_dir` when given (by process 0 only).
    """
    vocab = {EOS_TOKEN: 0, PAD_TOKEN: 1, **{c: i + 2 for i, c in enumerate(ALPHABET)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens([EOS_TOKEN, PAD_TOKEN])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                 clean_up_tokenization_spaces=False)
    if out_dir is not None and is_primary():
        os.makedirs(out_dir, exist_ok=True)
        hf.save_pretrained(out_dir)
    return hf


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, one per character, no special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def decode_answer(tokenizer, ids, eos_id: int) -> tuple[str, bool]:
    """(text before the first EOS, whether an EOS was produced) of generated ids."""
    ids = [int(t) for t in ids]
    ended = eos_id in ids
    if ended:
        ids = ids[:ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True), ended
