"""Test helpers for the data tests: an offline tokenizer, local data files, batch invariants."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from foundry_padfree.data.tokenizer import stdlib_texts, train_tokenizer
from foundry_padfree.varlen import IGNORE_INDEX


@functools.lru_cache(maxsize=1)
def tokenizer() -> PreTrainedTokenizerFast:
    """A 512-token byte-level BPE trained on stdlib docstrings (pad 0, bos 1, eos 2)."""
    return train_tokenizer(stdlib_texts(), vocab_size=512, model_max_length=4096)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prompt_response_rows(n: int, seed: int = 0, max_lines: int = 6) -> list[dict[str, str]]:
    """`n` examples `{'q': ..., 'a': ...}` of stdlib docstring lines, with varied lengths."""
    rng = random.Random(seed)
    texts = stdlib_texts()
    return [
        {
            "q": " ".join(rng.sample(texts, rng.randint(1, 2))),
            "a": " ".join(rng.sample(texts, rng.randint(1, max_lines))),
        }
        for _ in range(n)
    ]


def chat_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` multi-turn chat examples (1-3 user/assistant turns) in LLM-Foundry's `messages` format."""
    rng = random.Random(seed)
    texts = stdlib_texts()
    rows = []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(1, 3)):
            messages += [
                {"role": "user", "content": rng.choice(texts)},
                {"role": "assistant", "content": rng.choice(texts)},
            ]
        rows.append({"messages": messages})
    return rows


def write_mds(directory: Path, columns: dict[str, str], samples: list[dict[str, Any]]) -> Path:
    from streaming import MDSWriter

    with MDSWriter(out=str(directory), columns=columns) as writer:
        for sample in samples:
            writer.write(sample)
    return directory


def token_stream(num_texts: int, eos_token_id: int) -> list[int]:
    """Tokenized stdlib docstring lines, each followed by EOS: concatenated pretraining text."""
    tok = tokenizer()
    ids: list[int] = []
    for text in stdlib_texts()[:num_texts]:
        ids += tok(text)["input_ids"] + [eos_token_id]
    return ids


def documents_of(batch: dict[str, Any]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Check the invariants every padfree batch must satisfy; return its documents per row.

    Each document is `(input_ids, labels)` as numpy arrays. Invariants: [B,S] int64 tensors,
    right padding, `sequence_id` 0..k-1 then -1, `attention_mask` and `position_ids` that agree with
    it, labels ignored on padding and at every document's first token, and per-row counts.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    B, S = input_ids.shape
    for key in ("input_ids", "labels", "attention_mask", "sequence_id", "position_ids"):
        assert batch[key].shape == (B, S) and batch[key].dtype == torch.int64, key
    assert len(batch["total_tokens"]) == B and len(batch["loss_generating_tokens"]) == B
    rows = []
    for b in range(B):
        seq = batch["sequence_id"][b].numpy()
        real = seq >= 0
        n = int(real.sum())
        assert n > 0 and real[:n].all() and not real[n:].any(), f"row {b} is not right-padded: {seq.tolist()}"
        assert (batch["attention_mask"][b].numpy() == real).all()
        starts = np.flatnonzero(np.diff(seq[:n], prepend=-1) != 0)
        assert (seq[starts] == np.arange(len(starts))).all(), f"row {b} sequence_id not 0..k-1: {seq.tolist()}"
        ends = np.append(starts[1:], n)
        expected_pos = np.concatenate([np.arange(e - s) for s, e in zip(starts, ends)])
        assert (batch["position_ids"][b].numpy()[:n] == expected_pos).all()
        lab = labels[b].numpy()
        assert (lab[n:] == IGNORE_INDEX).all() and (lab[starts] == IGNORE_INDEX).all()
        assert batch["total_tokens"][b] == n
        assert batch["loss_generating_tokens"][b] == int((lab != IGNORE_INDEX).sum())
        ids = input_ids[b].numpy()
        rows.append([(ids[s:e].copy(), lab[s:e].copy()) for s, e in zip(starts, ends)])
    return rows
