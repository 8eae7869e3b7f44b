"""VarlenMeta from hand-computed cases, and a spy on the forward: one unpad, one meta, every layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import foundry_padfree.modeling as modeling
import foundry_padfree.varlen as varlen
from foundry_padfree import IGNORE_INDEX, unpad
from foundry_padfree.attention import BACKENDS, Backend
from tests.conftest import tiny_model


def test_position_ids_restarting_give_cu_seqlens():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    meta = unpad(torch.ones_like(positions), position_ids=positions).meta
    assert meta.cu_seqlens_N1.tolist() == [0, 3, 5, 9]
    assert meta.cu_seqlens_N1.dtype == torch.int32
    assert meta.max_seqlen == 4
    assert meta.doc_lens == (3, 2, 4)
    assert meta.position_ids_T.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert meta.doc_ids_T().tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]


def test_sequence_id_with_padding():
    seq_id = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, -1, -1]])
    ids = torch.arange(12).view(2, 6) + 10
    batch = unpad(ids, sequence_id=seq_id)
    meta = batch.meta
    assert meta.indices_T.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert meta.cu_seqlens_N1.tolist() == [0, 2, 5, 9]
    assert meta.max_seqlen == 4
    assert meta.position_ids_T.tolist() == [0, 1, 0, 1, 2, 0, 1, 2, 3]
    assert batch.input_ids_T.tolist() == [10, 11, 12, 13, 14, 16, 17, 18, 19]
    padded = meta.pad(batch.input_ids_T, fill=-1)
    assert padded.tolist() == [[10, 11, 12, 13, 14, -1], [16, 17, 18, 19, -1, -1]]


def test_left_padding_attention_mask():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    meta = unpad(torch.ones_like(mask), attention_mask=mask).meta
    assert meta.indices_T.tolist() == [2, 3, 4, 5, 6, 7]
    assert meta.cu_seqlens_N1.tolist() == [0, 2, 6]
    assert meta.position_ids_T.tolist() == [0, 1, 0, 1, 2, 3]


def test_dense_batch_needs_no_mask():
    meta = unpad(torch.ones(3, 4, dtype=torch.long)).meta
    assert meta.cu_seqlens_N1.tolist() == [0, 4, 8, 12]
    assert meta.position_ids_T.tolist() == [0, 1, 2, 3] * 3


def test_targets_shift_within_documents_only():
    seq_id = torch.tensor([[0, 0, 0, 1, 1, -1]])
    labels = torch.tensor([[5, 6, 7, 8, IGNORE_INDEX, IGNORE_INDEX]])
    batch = unpad(torch.ones_like(labels), sequence_id=seq_id, labels=labels)
    # token 0 -> 6, token 1 -> 7, token 2 ends doc 0, token 3 -> ignored label, token 4 ends doc 1.
    assert batch.targets_T.tolist() == [6, 7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert batch.supervised_T.tolist() == [0, 1]


def test_one_unpad_and_the_same_meta_object_in_every_layer(monkeypatch):
    model = tiny_model(num_hidden_layers=3, attn_backend="sdpa")
    seen_metas, unpad_calls, pad_calls = [], [], []
    reference = BACKENDS["sdpa"]

    def spy_attend(q, k, v, meta, scale):
        seen_metas.append(meta)
        return reference.attend(q, k, v, meta, scale)

    def spy_unpad(*args, **kwargs):
        unpad_calls.append(1)
        return unpad(*args, **kwargs)

    original_pad = modeling.VarlenMeta.pad

    def spy_pad(self, *args, **kwargs):
        pad_calls.append(1)
        return original_pad(self, *args, **kwargs)

    monkeypatch.setitem(BACKENDS, "sdpa", Backend("sdpa", spy_attend))
    monkeypatch.setattr(modeling, "unpad", spy_unpad)
    monkeypatch.setattr(modeling.VarlenMeta, "pad", spy_pad)
    seq_id = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, -1, -1]])
    ids = torch.randint(3, 97, (2, 6))
    model(ids, sequence_id=seq_id, labels=ids)

    assert len(unpad_calls) == 1
    assert len(seen_metas) == 3
    assert all(m is seen_metas[0] for m in seen_metas)
    assert len(pad_calls) == 1  # logits re-padded once, at the end


def test_a_host_batch_bound_for_another_device_lands_there_whole():
    # A CPU batch for a GPU model is read on the host and only its real tokens are copied. Here the
    # other device is `meta` (no GPU on CPU-only machines): every output must be on it, with the
    # shapes the same batch gives on the CPU.
    seq_id = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, -1, -1]])
    ids = torch.arange(12).view(2, 6) + 10
    labels = ids.clone()
    for kwargs in (dict(sequence_id=seq_id), dict(position_ids=torch.arange(6).repeat(2, 1)), {}):
        here = unpad(ids, labels=labels, **kwargs)
        there = unpad(ids, labels=labels, device="meta", **kwargs)
        assert there.meta.doc_lens == here.meta.doc_lens and there.meta.max_seqlen == here.meta.max_seqlen
        for name in ("input_ids_T", "targets_T", "supervised_T"):
            t, ref = getattr(there, name), getattr(here, name)
            assert t.device.type == "meta" and t.shape == ref.shape and t.dtype == ref.dtype, (kwargs, name)
        for name in ("indices_T", "cu_seqlens_N1", "position_ids_T"):
            t, ref = getattr(there.meta, name), getattr(here.meta, name)
            assert t.device.type == "meta" and t.shape == ref.shape and t.dtype == ref.dtype, (kwargs, name)


def test_a_host_batch_bound_for_another_device_gathers_the_same_values(monkeypatch):
    # The values of the host path above: the copies to the other device left out (they keep
    # tensors on the CPU here), what the host gathered must equal the same-device unpad's tensors.
    monkeypatch.setattr(varlen, "_to", lambda t, device: t)
    monkeypatch.setattr(varlen, "_to_device", lambda a, dtype, device: torch.tensor(np.asarray(a), dtype=dtype))
    seq_id = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, -1, -1]])
    ids = torch.arange(12).view(2, 6) + 10
    labels = ids.clone()
    labels[0, 3] = -100
    positions = torch.tensor([[0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
    for kwargs in (dict(sequence_id=seq_id), dict(position_ids=positions), {}):
        here = unpad(ids, labels=labels, **kwargs)
        there = unpad(ids, labels=labels, device="meta", **kwargs)
        for name in ("input_ids_T", "targets_T", "supervised_T"):
            assert torch.equal(getattr(there, name), getattr(here, name)), (kwargs, name)
        for name in ("indices_T", "cu_seqlens_N1", "position_ids_T"):
            assert torch.equal(getattr(there.meta, name), getattr(here.meta, name)), (kwargs, name)
    there = unpad(ids, labels=labels, device="meta", sequence_id=seq_id)
    assert there.input_ids_T.tolist() == [10, 11, 12, 13, 14, 16, 17, 18, 19]
    assert there.meta.position_ids_T.tolist() == [0, 1, 0, 1, 2, 0, 1, 2, 3]


def test_a_batch_split_across_devices_is_refused():
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels is on meta but input_ids on cpu; pass the whole batch"):
        unpad(ids, labels=ids.to("meta"))
    with pytest.raises(ValueError, match=r"the batch is on meta and device=cpu: only a batch on the CPU"):
        unpad(ids.to("meta"), device="cpu")
