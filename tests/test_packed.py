"""Packed rows equal each document run alone: no cross-document attention, positions restart."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import hf_twin, packed_lm_batch, tiny_model

TOL = dict(atol=1e-5, rtol=1e-5)
# Two rows of 16: documents of 5, 3, 7 tokens (1 pad), and 4, 6 tokens (6 pads).
ROWS = [[5, 3, 7], [4, 6]]
S = 16


def packed_batch(rows=ROWS, seq_len=S, vocab=97):
    """LLM-Foundry-style packed rows: sequence_id 0..k-1 per row, -1 and pad id 0 on padding."""
    docs = [[torch.randint(3, vocab, (n,)) for n in row] for row in rows]
    ids = torch.zeros(len(rows), seq_len, dtype=torch.long)
    seq_id = torch.full_like(ids, -1)
    positions = torch.zeros_like(ids)
    for r, row in enumerate(docs):
        col = 0
        for k, doc in enumerate(row):
            ids[r, col : col + len(doc)] = doc
            seq_id[r, col : col + len(doc)] = k
            positions[r, col : col + len(doc)] = torch.arange(len(doc))
            col += len(doc)
    labels = ids.masked_fill(seq_id < 0, -100)
    return docs, ids, seq_id, positions, labels


def doc_slices(rows=ROWS):
    for r, row in enumerate(rows):
        col = 0
        for k, n in enumerate(row):
            yield r, k, slice(col, col + n)
            col += n


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_packed_logits_and_grads_equal_documents_alone(backend, kv_heads):
    model = tiny_model(num_key_value_heads=kv_heads, attn_backend=backend)
    hf = hf_twin(model)
    docs, ids, seq_id, _, labels = packed_batch()

    packed = model(ids, sequence_id=seq_id, labels=labels)
    # Reference: every document alone through stock HF; the packed loss is the mean over all
    # targets, so the reference sums per-document losses over the same count.
    total, count = 0.0, 0
    for r, k, cols in doc_slices():
        alone = hf(docs[r][k][None], labels=docs[r][k][None])
        torch.testing.assert_close(packed.logits[r, cols], alone.logits[0], **TOL)
        n_targets = len(docs[r][k]) - 1
        total = total + alone.loss * n_targets
        count += n_targets
    reference_loss = total / count
    torch.testing.assert_close(packed.loss, reference_loss, **TOL)

    packed.loss.backward()
    reference_loss.backward()
    ref_grads = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, **TOL, msg=name)


def test_perturbing_one_document_leaves_the_others_bit_identical():
    model = tiny_model()
    _, ids, seq_id, _, _ = packed_batch()
    before = model(ids, sequence_id=seq_id).logits
    changed = ids.clone()
    r, k, cols = list(doc_slices())[1]  # row 0, second document
    changed[r, cols] = torch.randint(3, 97, (cols.stop - cols.start,))
    assert not torch.equal(changed, ids)
    after = model(changed, sequence_id=seq_id).logits
    for r2, k2, cols2 in doc_slices():
        if (r2, k2) == (r, k):
            assert not torch.equal(after[r2, cols2], before[r2, cols2])
        else:
            assert torch.equal(after[r2, cols2], before[r2, cols2]), (r2, k2)


def test_sequence_id_position_ids_and_one_row_padding_free_agree():
    model = tiny_model()
    _, ids, seq_id, positions, labels = packed_batch()
    by_seq_id = model(ids, sequence_id=seq_id, labels=labels)
    mask = (seq_id >= 0).long()
    by_positions = model(ids, attention_mask=mask, position_ids=positions, labels=labels)
    torch.testing.assert_close(by_seq_id.logits, by_positions.logits, atol=0, rtol=0)
    torch.testing.assert_close(by_seq_id.loss, by_positions.loss, atol=0, rtol=0)
    # HF padding-free convention: every document in one row, positions restarting at 0.
    real = mask.bool()
    flat = model(ids[real][None], position_ids=positions[real][None], labels=labels[real][None])
    torch.testing.assert_close(flat.logits[0], by_seq_id.logits[real], **TOL)
    torch.testing.assert_close(flat.loss, by_seq_id.loss, **TOL)


def test_bos_mode_sequence_ids_starting_at_one():
    # LLM-Foundry's BOS mode numbers documents from 1 when a row starts with BOS.
    model = tiny_model()
    docs, ids, seq_id, _, _ = packed_batch()
    shifted = torch.where(seq_id >= 0, seq_id + 1, seq_id)
    logits = model(ids, sequence_id=shifted).logits
    for r, k, cols in doc_slices():  # each document as it is alone
        torch.testing.assert_close(logits[r, cols], model(docs[r][k][None]).logits[0], **TOL)


def test_last_token_of_a_document_is_never_trained_on_the_next():
    model = tiny_model()
    _, ids, seq_id, _, labels = packed_batch()
    base = model(ids, sequence_id=seq_id, labels=labels, loss_reduction="sum")
    # Labels are unshifted: the first token of each document is only ever a target of the token
    # before it, which belongs to another document; changing it must not change the loss.
    moved = labels.clone()
    for r, _, cols in doc_slices():
        if cols.start > 0:
            moved[r, cols.start] = (moved[r, cols.start] + 1) % 97
    other = model(ids, sequence_id=seq_id, labels=moved, loss_reduction="sum")
    torch.testing.assert_close(base.loss, other.loss, atol=0, rtol=0)
    assert int(base.num_loss_tokens) == sum(n - 1 for row in ROWS for n in row)


def test_training_mode_skips_padded_logits_unless_asked():
    model = tiny_model().train()
    _, ids, seq_id, _, labels = packed_batch()
    out = model(ids, sequence_id=seq_id, labels=labels)
    assert out.logits is None and out.loss is not None
    out = model(ids, sequence_id=seq_id, labels=labels, return_logits=True)
    assert out.logits.shape == (2, S, 97)
    assert torch.all(out.logits[seq_id < 0] == 0)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model().train()
    _, ids, seq_id, _, labels = packed_batch()
    model(ids, sequence_id=seq_id, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(ids, sequence_id=seq_id, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], msg=name)


def test_autocast_hands_the_kernel_low_precision_inputs(monkeypatch):
    # Composer's amp_bf16: fp32 weights and residual stream under autocast. The projections give
    # bf16, RoPE's fp32 tables would promote q and k back to fp32; varlen kernels (flash, aten's
    # varlen) take fp16/bf16 only, so every layer must hand the kernel one low-precision dtype.
    from foundry_padfree import attention

    model = tiny_model(attn_backend="sdpa")
    seen = []
    original = attention.BACKENDS["sdpa"].attend

    def spy(q, k, v, meta, scale):
        seen.append((q.dtype, k.dtype, v.dtype))
        return original(q, k, v, meta, scale)

    monkeypatch.setitem(attention.BACKENDS, "sdpa", attention.BACKENDS["sdpa"]._replace(attend=spy))
    model.model._backends.clear()
    ids = torch.randint(3, 97, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, sequence_id=torch.tensor([[0] * 4 + [1] * 5, [0] * 9]), labels=ids)
    assert seen == [(torch.bfloat16,) * 3] * model.config.num_hidden_layers
    assert torch.isfinite(out.loss)
    seen.clear()
    model(ids)  # no autocast: the model's own dtype, untouched
    assert seen == [(torch.float32,) * 3] * model.config.num_hidden_layers


def test_compiled_layers_take_inductor_options_only_where_they_exist(monkeypatch):
    # Inductor's non-strict mix-order reduction (torch >= 2.10; tests/test_gpu_kernels.py checks
    # that a smaller batch then reuses the graph) is asked for only where torch has it: an unknown
    # option would make torch.compile raise. Other backends take no inductor options.
    from torch._inductor import config as inductor_config

    from foundry_padfree import modeling

    has_it = hasattr(inductor_config.triton, "mix_order_reduction_non_strict_mode")
    expected = {"triton.mix_order_reduction_non_strict_mode": True} if has_it else {}
    assert modeling._inductor_options("inductor") == expected
    assert modeling._inductor_options("aot_eager") == {}
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    options = {"inductor": {"triton.x": True}, "aot_eager": {}}
    monkeypatch.setattr(modeling, "_inductor_options", options.__getitem__)
    modeling._compile(modeling._stack, "inductor")
    modeling._compile(modeling._stack, "aot_eager")
    assert calls == [dict(backend="inductor", options={"triton.x": True}), dict(backend="aot_eager")]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("wrt", ["model.norm.weight", "model.layers.0.mlp.up_proj.weight"])
def test_second_order_gradients_raise_instead_of_missing_the_hand_written_backwards(tied, wrt):
    """The hand-written backwards (norm, MLP, output head and loss) have no derivative of their own:
    a Hessian-vector product through them would miss their paths (zero for the final norm's
    weight), so `create_graph=True` raises, naming the way out."""
    model = tiny_model(tie_word_embeddings=tied).train()
    out = model(**packed_lm_batch())
    param = model.get_parameter(wrt)
    with pytest.raises(RuntimeError, match=r"second-order gradients .* not supported .* stock transformers"):
        (grad,) = torch.autograd.grad(out.loss, param, create_graph=True)
        torch.autograd.grad(grad.sum(), param)
    # First-order gradients, with or without retain_graph, are unaffected.
    out = model(**packed_lm_batch())
    (grad,) = torch.autograd.grad(out.loss, param, retain_graph=True)
    assert grad.abs().sum() > 0
