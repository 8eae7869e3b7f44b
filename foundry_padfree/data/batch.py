"""The one place a padding-free batch is laid out: documents placed in rows, right-padded.

Shape legend: B batch rows, S row length (columns), L tokens of one document.

Both collators (`padfree_text`, `padfree_finetuning`) decide which documents go in which row and
then call `collate_rows`; everything about the batch format lives here:

- `input_ids` (B, S) int64: documents back to back, `pad_token_id` after the last one.
- `labels` (B, S) int64, unshifted (HF convention; the model shifts within each document):
  the document's own labels, except that the **first label of every document is IGNORE_INDEX**, so
  that no model (ours or a stock one that ignores `sequence_id`) is ever trained to predict a
  document's first token from the previous document; IGNORE_INDEX on padding.
- `attention_mask` (B, S) int64: 1 on real tokens, 0 on padding. Padding is known from the
  documents' lengths, never from a token id, so a pad id equal to EOS cannot hide a real EOS.
- `sequence_id` (B, S) int64: 0..k-1 along each row, -1 on padding (LLM-Foundry convention).
- `position_ids` (B, S) int64: 0..L-1 within each document (HF padding-free convention), 0 on padding.
- `total_tokens`, `loss_generating_tokens`: per-row Python lists, as LLM-Foundry's
  `LossGeneratingTokensCollatorWrapper` adds them: real tokens, and labels that are not
  IGNORE_INDEX (exactly the targets the model trains on, because each document's first label is
  ignored). Composer splits lists along with tensors, so microbatches keep their own counts.

Everything is per row: Composer's microbatching slices dim 0 of every tensor and list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from foundry_padfree.varlen import IGNORE_INDEX


class Document(NamedTuple):
    """One document (a text segment or a finetuning example) to place in a row.

    Attributes:
        input_ids: (L,), integer token ids, L >= 1.
        labels: (L,), integer, unshifted; IGNORE_INDEX where the token is not a target.
    """

    input_ids: np.ndarray
    labels: np.ndarray


def collate_rows(rows: Sequence[Sequence[Document]], row_len: int, pad_token_id: int) -> dict[str, Any]:
    """Lay out `rows` of documents as a right-padded `[B, S]` batch (see the module docstring).

    Args:
        rows: B rows, each a sequence of documents whose lengths add up to at most `row_len` (a row
            without documents is all padding, as LLM-Foundry's `text` loader makes of an empty sample).
        row_len: S, the number of columns.
        pad_token_id: filler id for `input_ids` on padding (never used to find padding).

    Returns:
        dict with `input_ids`, `labels`, `attention_mask`, `sequence_id`, `position_ids`, each
        (B, S) int64, and the per-row lists `total_tokens`, `loss_generating_tokens`.

    Raises:
        ValueError: for an empty batch or document, or a row longer than `row_len`.
    """
    if not rows:
        raise ValueError("collate_rows got no rows; a batch needs at least one row.")
    B, S = len(rows), row_len
    input_ids_BS = np.full((B, S), pad_token_id, dtype=np.int64)
    labels_BS = np.full((B, S), IGNORE_INDEX, dtype=np.int64)
    sequence_id_BS = np.full((B, S), -1, dtype=np.int64)
    position_ids_BS = np.zeros((B, S), dtype=np.int64)
    total_tokens: list[int] = []
    for b, docs in enumerate(rows):
        lengths = [len(doc.input_ids) for doc in docs]
        if min(lengths, default=1) == 0:
            raise ValueError(f"row {b} holds an empty document (document lengths {lengths}); drop empty documents.")
        if sum(lengths) > S:
            raise ValueError(f"row {b} holds {sum(lengths)} tokens (documents {lengths}) but rows have {S} columns.")
        start = 0
        for k, (doc, n) in enumerate(zip(docs, lengths)):
            if len(doc.labels) != n:
                raise ValueError(f"row {b}, document {k}: {n} input_ids but {len(doc.labels)} labels.")
            end = start + n
            input_ids_BS[b, start:end] = doc.input_ids
            labels_BS[b, start:end] = doc.labels
            labels_BS[b, start] = IGNORE_INDEX  # never a target across a document boundary
            sequence_id_BS[b, start:end] = k
            position_ids_BS[b, start:end] = np.arange(n)
            start = end
        total_tokens.append(start)
    attention_mask_BS = (sequence_id_BS >= 0).astype(np.int64)
    loss_generating_tokens = (labels_BS != IGNORE_INDEX).sum(axis=1)
    return {
        "input_ids": torch.from_numpy(input_ids_BS),
        "labels": torch.from_numpy(labels_BS),
        "attention_mask": torch.from_numpy(attention_mask_BS),
        "sequence_id": torch.from_numpy(sequence_id_BS),
        "position_ids": torch.from_numpy(position_ids_BS),
        "total_tokens": total_tokens,
        "loss_generating_tokens": [int(n) for n in loss_generating_tokens],
    }
