"""Byte-level BPE tokenizers saved and loaded as Hugging Face tokenizer directories."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlft.errors import RlftError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE on `texts` and saves it as a Hugging Face tokenizer dir in `out_dir`.

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
    hf.save_pretrained(out_dir)
    return hf


def load_tokenizer(path: str, add_pad_token: bool = False) -> PreTrainedTokenizerFast:
    """Loads a Hugging Face tokenizer dir (e.g. a checkpoint's) and checks pad/EOS tokens.

    If the tokenizer has no pad token distinct from EOS, adds `<|pad|>` when `add_pad_token`
    (the vocab then grows by one: resize the model's embeddings), else raises RlftError.
    """
    p = Path(path)
    files = ("tokenizer.json", "tokenizer_config.json")
    if not p.is_dir() or not any((p / f).exists() for f in files):
        raise RlftError(f"No Hugging Face tokenizer at {path} (need {' or '.join(files)}).")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise RlftError(f"Could not load the tokenizer at {path}: {e}") from e
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
