"""The offline tokenizer: fixed special ids, deterministic, loadable from disk."""

from __future__ import annotations

import pytest
from data_helpers import tokenizer
from transformers import AutoTokenizer

from foundry_padfree.data.tokenizer import stdlib_texts, train_tokenizer


def test_special_ids_and_round_trip():
    tok = tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 512
    text = "Return a new list, é included."
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless


def test_deterministic_and_saved(tmp_path):
    texts = stdlib_texts(200)
    a = train_tokenizer(texts, vocab_size=300, save_dir=tmp_path)
    b = train_tokenizer(texts, vocab_size=300)
    assert a.get_vocab() == b.get_vocab()
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded("the list of arguments")["input_ids"] == a("the list of arguments")["input_ids"]
    assert loaded.eos_token_id == 2 and loaded.pad_token_id == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size = 100"):
        train_tokenizer(["some text"], vocab_size=100)
    with pytest.raises(ValueError, match="texts is empty"):
        train_tokenizer(["", ""], vocab_size=300)
    with pytest.raises(ValueError, match="max_lines = 0"):
        stdlib_texts(0)
