"""Tests for the byte-level BPE tokenizer helpers."""

import json

import pytest
from transformers import AutoTokenizer

from rlft.data.tokenizer import EOS_TOKEN, PAD_TOKEN, load_tokenizer, train_tokenizer
from rlft.errors import RlftError

TEXTS = [f"The movie was {w}, truly {w}!" for w in ("great", "awful", "fine", "boring", "moving")] * 20


def test_saved_dir_loads_with_auto_tokenizer(tmp_path):
    train_tokenizer(TEXTS, 300, str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.eos_token, tok.pad_token) == (EOS_TOKEN, PAD_TOKEN)
    assert tok.pad_token_id != tok.eos_token_id
    for s in ["The movie was great!", "Ünïcödé ✓ 🙂\ttabs\r\nand  spaces "]:
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == s
    assert len(tok.encode("The movie was great", add_special_tokens=False)) < len("The movie was great")


def test_training_is_deterministic(tmp_path):
    train_tokenizer(TEXTS, 300, str(tmp_path / "a"))
    train_tokenizer(list(TEXTS), 300, str(tmp_path / "b"))
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()


def test_load_tokenizer_checks_path_and_pad(tmp_path):
    with pytest.raises(RlftError, match="nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"))
    train_tokenizer(TEXTS, 300, str(tmp_path))
    assert load_tokenizer(str(tmp_path)).pad_token == PAD_TOKEN
    cfg_path = tmp_path / "tokenizer_config.json"  # make it a tokenizer whose pad is EOS
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "pad_token": EOS_TOKEN}))
    with pytest.raises(RlftError, match="pad token"):
        load_tokenizer(str(tmp_path))
    tok = load_tokenizer(str(tmp_path), add_pad_token=True)
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id != tok.eos_token_id
