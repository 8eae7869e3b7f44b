"""Collators on hand-made batches: boundaries, EOS as padding, BOS mode, partial documents,
multi-turn masking, and errors; plus a property test over random documents."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_helpers import documents_of
from hypothesis import given, settings
from hypothesis import strategies as st

from foundry_padfree.data.batch import Document, collate_rows
from foundry_padfree.data.dataspec import count_documents
from foundry_padfree.data.finetuning import PadFreeFinetuningCollator
from foundry_padfree.data.text import PadFreeTextCollator

X = -100  # IGNORE_INDEX
EOS, BOS, PAD = 2, 1, 0


def _tensor(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)  # MDS `tokens` columns are often int32


@pytest.mark.parametrize(
    "row, warned",
    [
        ([7, 8, EOS, 9, 9], "dataset.eos_token_id: 2"),  # concatenated documents
        ([BOS, 7, 8, BOS, 9], "dataset.bos_token_id: 1"),
        ([BOS, 7, 8, 9, EOS], None),  # one document, with its own BOS and EOS
        ([7, 8], None),
    ],
)
def test_a_row_with_a_separator_inside_warns_when_none_is_set(row, warned, caplog, monkeypatch):
    from foundry_padfree.data import text

    monkeypatch.setattr(text, "_warned_unsplit", False)
    collate = PadFreeTextCollator(8, PAD, unset_separators={"eos_token_id": EOS, "bos_token_id": BOS})
    with caplog.at_level("WARNING", logger="foundry_padfree.data.text"):
        batch = collate([_tensor(row), _tensor(row)])
    messages = [r.getMessage() for r in caplog.records]
    assert batch["sequence_id"][0].tolist()[: len(row)] == [0] * len(row)  # one document, as configured
    if warned:
        assert len(messages) == 1 and warned in messages[0], messages
    else:
        assert not messages
    # With a separator set there is nothing to warn about.
    caplog.clear()
    monkeypatch.setattr(text, "_warned_unsplit", False)
    with caplog.at_level("WARNING", logger="foundry_padfree.data.text"):
        PadFreeTextCollator(8, PAD, eos_token_id=EOS, unset_separators={"eos_token_id": EOS})([_tensor(row)])
    assert not caplog.records


def test_collate_rows_layout():
    docs = [Document(np.array([5, 6, 7]), np.array([5, 6, 7])), Document(np.array([8, 9]), np.array([X, 9]))]
    batch = collate_rows([docs, [Document(np.array([4]), np.array([4]))]], row_len=6, pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, PAD], [4, PAD, PAD, PAD, PAD, PAD]]
    assert batch["labels"].tolist() == [[X, 6, 7, X, 9, X], [X, X, X, X, X, X]]
    assert batch["sequence_id"].tolist() == [[0, 0, 0, 1, 1, -1], [0, -1, -1, -1, -1, -1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]]
    assert batch["total_tokens"] == [5, 1] and batch["loss_generating_tokens"] == [3, 0]


@pytest.mark.parametrize(
    "rows, row_len, match",
    [
        ([], 4, "no rows"),
        ([[Document(np.array([], dtype=np.int64), np.array([], dtype=np.int64))]], 4, "empty document"),
        ([[Document(np.arange(5), np.arange(5))]], 4, "row 0 holds 5 tokens"),
        ([[Document(np.arange(3), np.arange(2))]], 4, "3 input_ids but 2 labels"),
    ],
)
def test_collate_rows_errors(rows, row_len, match):
    with pytest.raises(ValueError, match=match):
        collate_rows(rows, row_len, PAD)


def test_eos_mode_with_eos_as_padding():
    # pad id == EOS (as when LLM-Foundry sets pad_token = eos_token): padding comes from the length,
    # so the real EOS tokens keep their labels and the two pad positions are not a document.
    batch = PadFreeTextCollator(max_seq_len=10, pad_token_id=EOS, eos_token_id=EOS)(
        [_tensor([3, 4, EOS, 5, 6, 7, EOS, 8])]
    )
    assert batch["input_ids"].tolist() == [[3, 4, EOS, 5, 6, 7, EOS, 8, EOS, EOS]]
    assert batch["sequence_id"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, -1, -1]]
    assert batch["labels"].tolist() == [[X, 4, EOS, X, 6, 7, EOS, X, X, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 8 + [0, 0]]
    assert batch["loss_generating_tokens"] == [5]


def test_bos_mode_numbers_from_zero():
    collate = PadFreeTextCollator(max_seq_len=8, pad_token_id=PAD, bos_token_id=BOS)
    batch = collate([_tensor([5, 6, BOS, 7, 8, BOS, 9]), _tensor([BOS, 7, 8, BOS, 9])])
    assert batch["sequence_id"].tolist() == [[0, 0, 1, 1, 1, 2, 2, -1], [0, 0, 0, 1, 1, -1, -1, -1]]
    assert batch["labels"].tolist() == [[X, 6, X, 7, 8, X, 9, X], [X, 7, 8, X, 9, X, X, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 0], [0, 1, 2, 0, 1, 0, 0, 0]]


def test_partial_documents_at_row_edges():
    # A row cut from concatenated text: it starts in the middle of one document and ends in the
    # middle of another. Each piece is its own segment with positions from 0.
    batch = PadFreeTextCollator(max_seq_len=5, pad_token_id=PAD, eos_token_id=EOS)([_tensor([7, 8, EOS, 9, 9])])
    assert batch["sequence_id"].tolist() == [[0, 0, 0, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[X, 8, EOS, X, 9]]


def test_empty_documents_between_separators():
    batch = PadFreeTextCollator(max_seq_len=4, pad_token_id=PAD, eos_token_id=EOS)([_tensor([EOS, EOS, 5, EOS])])
    assert batch["sequence_id"].tolist() == [[0, 1, 2, 2]]
    assert batch["labels"].tolist() == [[X, X, X, EOS]]


def test_text_column_uses_attention_mask():
    # Tokenizer output of a `text` column: padded to max_seq_len (here on the left); the mask, not
    # the id, says what is padding.
    sample = {"input_ids": [EOS, EOS, 3, 4, EOS], "attention_mask": [0, 0, 1, 1, 1]}
    batch = PadFreeTextCollator(max_seq_len=5, pad_token_id=EOS, eos_token_id=EOS)([sample])
    assert batch["input_ids"].tolist() == [[3, 4, EOS, EOS, EOS]]
    assert batch["sequence_id"].tolist() == [[0, 0, 0, -1, -1]]
    assert batch["labels"].tolist() == [[X, 4, EOS, X, X]]


def test_a_stored_padded_tokens_row_ends_in_padding():
    # Rows written already padded with a pad token of their own: its trailing run is padding, as a
    # pad id inside the row is not (LLM-Foundry masks every label equal to the pad id instead).
    collate = PadFreeTextCollator(8, PAD, eos_token_id=EOS, trailing_pad_id=PAD)
    batch = collate([_tensor([5, PAD, 6, EOS, 7, PAD, PAD]), _tensor([PAD, PAD])])
    assert batch["sequence_id"].tolist() == [[0, 0, 0, 0, 1, -1, -1, -1], [-1] * 8]
    assert batch["labels"].tolist() == [[X, PAD, 6, EOS, X, X, X, X], [X] * 8]
    assert batch["total_tokens"] == [5, 0]
    with pytest.raises(ValueError, match="trailing_pad_id = 2 is also the document separator"):
        PadFreeTextCollator(8, EOS, eos_token_id=EOS, trailing_pad_id=EOS)


def test_an_empty_sample_is_a_row_of_padding():
    # As LLM-Foundry's text loader has it (a blank document of a dump, with a tokenizer adding no BOS).
    batch = PadFreeTextCollator(4, PAD, eos_token_id=EOS)([_tensor([3, EOS]), _tensor([])])
    assert batch["input_ids"].tolist() == [[3, EOS, PAD, PAD], [PAD] * 4]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [0] * 4]
    assert batch["sequence_id"].tolist() == [[0, 0, -1, -1], [-1] * 4]
    assert batch["labels"].tolist() == [[X, EOS, X, X], [X] * 4]
    assert batch["total_tokens"] == [2, 0] and batch["loss_generating_tokens"] == [1, 0]


def test_text_collator_errors():
    with pytest.raises(ValueError, match="eos_token_id = 2 and bos_token_id = 1 are both set"):
        PadFreeTextCollator(8, PAD, eos_token_id=EOS, bos_token_id=BOS)
    collate = PadFreeTextCollator(4, PAD, eos_token_id=EOS)
    with pytest.raises(ValueError, match="sample 0 has 5 tokens, more than max_seq_len"):
        collate([_tensor([3, 4, 5, 6, 7])])


# A two-turn example: prompts [10, 11] and [12]; responses [20, 21] and [22, EOS].
TWO_TURNS = {"turns": [{"input_ids": [10, 11], "labels": [20, 21]}, {"input_ids": [12], "labels": [22, EOS]}]}


@pytest.mark.parametrize(
    "target_prompts, target_responses, labels",
    [
        ("none", "last", [X, X, X, X, X, 22, EOS]),
        ("none", "all", [X, X, 20, 21, X, 22, EOS]),
        ("all", "all", [X, 11, 20, 21, 12, 22, EOS]),  # first label ignored: first token of the document
        ("length>=2", "last", [X, 11, X, X, X, 22, EOS]),  # only the 2-token prompt is a target
    ],
)
def test_multi_turn_masking(target_prompts, target_responses, labels):
    collate = PadFreeFinetuningCollator(16, 16, PAD, EOS, target_prompts, target_responses)
    batch = collate([(0, TWO_TURNS)])
    assert batch["input_ids"][0, :7].tolist() == [10, 11, 20, 21, 12, 22, EOS]
    assert batch["labels"][0, :7].tolist() == labels
    assert batch["input_ids"].shape == (1, 8)  # trimmed to the longest row, rounded up to 8


def test_finetuning_rows_and_eos():
    collate = PadFreeFinetuningCollator(16, 32, PAD, EOS, "none", "last")
    a = {"turns": [{"input_ids": [10], "labels": [20]}]}  # EOS appended: [10, 20, EOS]
    b = {"turns": [{"input_ids": [11, 12], "labels": [21, EOS]}]}
    batch = collate([(0, a), (1, b), (0, b)])
    rows = documents_of(batch)
    assert [[d[0].tolist() for d in row] for row in rows] == [[[10, 20, EOS], [11, 12, 21, EOS]], [[11, 12, 21, EOS]]]
    assert [[d[1].tolist() for d in row] for row in rows] == [[[X, 20, EOS], [X, X, 21, EOS]], [[X, X, 21, EOS]]]
    assert batch["input_ids"].shape == (2, 8)


def test_finetuning_rows_of_padding():
    # The sampler's `(row, None)` items: rows that even out the ranks, with no example and no sample.
    collate = PadFreeFinetuningCollator(16, 32, PAD, EOS, "none", "last")
    a = {"turns": [{"input_ids": [10], "labels": [20]}]}
    batch = collate([(0, a), (1, None)])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["total_tokens"] == [3, 0] and batch["loss_generating_tokens"] == [2, 0]
    assert (batch["sequence_id"][1] == -1).all() and (batch["labels"][1] == X).all()
    assert count_documents(batch) == 1
    alone = collate([(0, None)])  # a rank with no example at an epoch's last step
    assert alone["input_ids"].shape == (1, 8) and alone["total_tokens"] == [0] and count_documents(alone) == 0


def test_finetuning_truncation_and_errors():
    collate = PadFreeFinetuningCollator(5, 8, PAD, EOS, "none", "all")
    tokens = collate.document(TWO_TURNS)  # 7 tokens, cut to 5 by LLM-Foundry's rule
    assert tokens.full_length == 7 and tokens.document.input_ids.tolist() == [10, 11, 20, 21, 12]
    last_only = PadFreeFinetuningCollator(5, 8, PAD, EOS, "none", "last")
    with pytest.raises(ValueError, match="example 7 has no loss-generating token within max_seq_len = 5"):
        last_only.document(TWO_TURNS, index=7)
    with pytest.raises(ValueError, match="example 3 has an empty turn"):
        last_only.document({"turns": [{"input_ids": [], "labels": [20]}]}, index=3)
    # After truncation to 2 tokens the only target is the prompt's first token, which is never a
    # target in a packed row: the example has no loss tokens.
    prompt_target = {"turns": [{"input_ids": [9], "labels": [8]}, {"input_ids": [7], "labels": [6]}]}
    with pytest.raises(ValueError, match="has no loss-generating token within max_seq_len = 2"):
        PadFreeFinetuningCollator(2, 8, PAD, EOS, "all", "last").document(prompt_target)


def test_only_examples_longer_than_max_seq_len_count_as_truncated():
    from foundry_padfree.data.finetuning import _example_lengths

    collate = PadFreeFinetuningCollator(5, 8, PAD, EOS, "none", "all")
    examples = [{"turns": [{"input_ids": [10] * (n - 2), "labels": [20]}]} for n in (4, 5, 6)]  # n tokens, EOS included
    lengths, truncated = _example_lengths(examples, collate)
    assert lengths.tolist() == [4, 5, 5] and truncated == 1


@st.composite
def _concatenated_rows(draw):
    """Random documents (content without EOS, possibly empty, then EOS) cut into rows of S tokens."""
    docs = draw(st.lists(st.lists(st.integers(3, 40), max_size=12), min_size=1, max_size=12))
    stream = [t for doc in docs for t in [*doc, EOS]]
    S = draw(st.integers(2, 16))
    return [stream[i : i + S] for i in range(0, len(stream), S)], S


@settings(max_examples=60, deadline=None)
@given(_concatenated_rows(), st.integers(1, 4))
def test_text_property_every_token_once_no_cross_boundary_labels(rows_and_len, rows_per_batch):
    rows, S = rows_and_len
    collate = PadFreeTextCollator(max_seq_len=S, pad_token_id=EOS, eos_token_id=EOS)  # EOS as padding, too
    seen: list[int] = []
    for start in range(0, len(rows), rows_per_batch):
        batch = collate([_tensor(row) for row in rows[start : start + rows_per_batch]])
        for row_docs in documents_of(batch):
            for ids, labels in row_docs:
                seen += ids.tolist()
                assert (ids[:-1] != EOS).all(), "a document continues past an EOS"
                assert labels[0] == X and (labels[1:] == ids[1:]).all(), "label crosses a boundary or is lost"
    assert seen == [t for row in rows for t in row]  # every real token exactly once, in order
