"""Byte-level BPE tokenizers saved and loaded as Hugging Face tokenizer directories."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from rlft.parallel.distributed import is_primary
from rlft.errors import RlftError
from rlft.files import read_json

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE on `texts` and saves it as a Hugging Face tokenizer dir in `out_dir`
    (process 0 saves).

    Ids 0 and 1 are `<|endoftext|>` (EOS) and `<|pad|>`; every byte has a token, so any text
    round-trips through encode/decode. The same texts and vocab_size give the same tokenizer.
    """
    if vocab_size < 256 + 2:
        raise RlftError(f"vocab_size={vocab_size} is too small for byte-level BPE (need >= 258).")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    if is_primary():  # every process trains the same tokenizer; one writes it
        hf.save_pretrained(out_dir)
    return hf


TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "added_tokens.json", "vocab.json")


def read_pretrained_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(path)` from local files; a damaged file is an RlftError naming it.

    The JSON files are read first (`read_json` names the broken one); anything else the
    tokenizers library refuses becomes a one-line error naming the directory.
    """
    for name in TOKENIZER_JSON_FILES:
        if os.path.isfile(os.path.join(path, name)):
            read_json(os.path.join(path, name), expect=None)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # the tokenizers library raises bare Exceptions for malformed files
        reason = " ".join(str(e).split()) or type(e).__name__
        raise RlftError(f"{path}: could not load the tokenizer ({reason[:300]})") from None


def load_tokenizer(path: str, add_pad_token: bool = False) -> PreTrainedTokenizerFast:
    """Loads a Hugging Face tokenizer dir (e.g. a checkpoint's) and checks pad/EOS tokens.

    If the tokenizer has no pad token distinct from EOS, adds `<|pad|>` when `add_pad_token`
    (the vocab then grows by one: resize the model's embeddings), else raises RlftError.
    """
    p = Path(path)
    files = ("tokenizer.json", "tokenizer_config.json")
    if not p.is_dir() or not any((p / f).exists() for f in files):
        raise RlftError(f"No Hugging Face tokenizer at {path} (need {' or '.join(files)}).")
    tok = read_pretrained_tokenizer(str(p))
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise RlftError(f"The tokenizer at {path} is not a fast (tokenizers-backed) tokenizer.")
    if tok.eos_token_id is None:
        raise RlftError(f"The tokenizer at {path} has no EOS token.")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        if not add_pad_token:
            raise RlftError(
                f"The tokenizer at {path} has no pad token distinct from EOS "
                f"({tok.eos_token!r}); pass add_pad_token=True to add {PAD_TOKEN!r}."
            )
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return tok
