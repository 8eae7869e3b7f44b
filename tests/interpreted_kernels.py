"""Checks of the fused Triton kernels, run by `tests/test_kernels.py` in a process started with
`TRITON_INTERPRET=1` (Triton reads it when it is imported), where the kernels run on CPU tensors.

Each kernel is compared with the PyTorch formulas it replaces. The interpreter rounds fp32 to bf16
towards zero (the GPU rounds to nearest even), so bf16 results are compared to within one bf16
unit; fp32 results to within fp32 rounding.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from foundry_padfree import kernels
from foundry_padfree.loss import _nll_and_grad
from foundry_padfree.modeling import _apply_rope, _RMSNorm, _SiluMul
from tests.conftest import loss_and_grads, packed_lm_batch, tiny_model

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run by tests/test_kernels.py with TRITON_INTERPRET=1", allow_module_level=True)

BF16_TOL = dict(atol=2e-2, rtol=1.6e-2)  # one bf16 unit (2^-7 relative; 2^-6 near zero products)
FP32_TOL = dict(atol=2e-6, rtol=2e-6)


@pytest.fixture
def K():
    assert kernels.INTERPRET and kernels.usable(torch.zeros(1))
    return kernels


def _tol(dtype):
    return FP32_TOL if dtype == torch.float32 else BF16_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [96, 100])  # a power of two's multiple, and one the block masks
def test_rms_norm_matches_the_pytorch_formula(K, dtype, D):
    x = torch.randn(37, D, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(D)).to(dtype).requires_grad_()
    grad = torch.randn(37, D, dtype=dtype)
    y = K.rms_norm(x, w, 1e-5)
    (dx, dw) = torch.autograd.grad(y, (x, w), grad)
    y_ref = _RMSNorm.apply(x, w, 1e-5)
    (dx_ref, dw_ref) = torch.autograd.grad(y_ref, (x, w), grad)
    assert y.dtype == y_ref.dtype and dw.dtype == w.dtype
    torch.testing.assert_close(y, y_ref, **_tol(dtype))
    torch.testing.assert_close(dx, dx_ref, **_tol(dtype))
    # dw sums 37 rows: the reference rounds each product to bf16 first, the kernel does not.
    torch.testing.assert_close(dw.float(), dw_ref.float(), atol=1e-5 if dtype == torch.float32 else 0.1, rtol=2e-2)


def test_rms_norm_keeps_leading_dims_and_autocast_dtypes(K):
    x = torch.randn(2, 5, 16, requires_grad=True)  # fp32 input, bf16 weight: output in fp32
    w = torch.ones(16, dtype=torch.bfloat16, requires_grad=True)
    y = K.rms_norm(x, w, 1e-6)
    assert y.shape == (2, 5, 16) and y.dtype == torch.float32
    torch.testing.assert_close(y, _RMSNorm.apply(x, w, 1e-6), **FP32_TOL)
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_passes_its_input_through_and_adds_its_gradient(K, dtype):
    # The residual stream's second use of x: its gradient joins the norm's inside the kernel.
    x = torch.randn(23, 48, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(48)).to(dtype).requires_grad_()
    grad_y, grad_x = torch.randn(23, 48, dtype=dtype), torch.randn(23, 48, dtype=dtype)
    y, passed = K.rms_norm(x, w, 1e-5, pass_input=True)
    assert torch.equal(passed, x) and passed.data_ptr() != x.data_ptr()  # a copy, the caller's to update
    passed.mul_(3.0)  # updated in place, as the next residual add does: the backward uses x itself
    dx, dw = torch.autograd.grad((y, passed), (x, w), (grad_y, grad_x / 3.0))
    y_ref, passed_ref = _RMSNorm.apply(x, w, 1e-5, True)
    assert torch.equal(passed_ref, x) and passed_ref.data_ptr() != x.data_ptr()
    dx_ref, dw_ref = torch.autograd.grad((y_ref, passed_ref.mul_(3.0)), (x, w), (grad_y, grad_x / 3.0))
    torch.testing.assert_close(y, y_ref, **_tol(dtype))
    torch.testing.assert_close(dx, dx_ref, **_tol(dtype))
    torch.testing.assert_close(dw.float(), dw_ref.float(), atol=1e-5 if dtype == torch.float32 else 0.1, rtol=2e-2)
    # Against autograd's own sum of the two uses' gradients, in fp32.
    if dtype == torch.float32:
        (dx_norm,) = torch.autograd.grad(_RMSNorm.apply(x, w, 1e-5), x, grad_y)
        torch.testing.assert_close(dx, dx_norm + grad_x, **FP32_TOL)
    # Only the passed-through input used: its gradient, unchanged.
    y, passed = K.rms_norm(x, w, 1e-5, pass_input=True)
    (dx,) = torch.autograd.grad(passed, x, grad_x)
    assert torch.equal(dx, grad_x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scale_cast_matches_mul_into_a_lower_precision_tensor(K, dtype):
    x = torch.randn(3, 1000) * 5  # 3000 elements: two blocks, the second partly masked
    scale = torch.tensor(0.37)
    y = K.scale_cast(x, scale, dtype)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, torch.mul(x, scale, out=torch.empty_like(x, dtype=dtype)), **BF16_TOL)
    with pytest.raises(ValueError, match="contiguous"):
        K.scale_cast(x.t(), scale, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_and_its_backward_match_the_pytorch_formulas(K, dtype):
    gate = 3 * torch.randn(41, 70, dtype=dtype)
    up = torch.randn(41, 70, dtype=dtype)
    grad = torch.randn(41, 70, dtype=dtype)
    torch.testing.assert_close(K.silu_mul(gate, up), torch.nn.functional.silu(gate) * up, **_tol(dtype))
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    ref = torch.autograd.grad(_SiluMul.apply(g, u, False), (g, u), grad)
    for ours, theirs in zip(K.silu_mul_backward(grad, gate, up), ref):
        torch.testing.assert_close(ours, theirs, **_tol(dtype))
    *grads, product = K.silu_mul_backward(grad, gate, up, with_product=True)
    assert torch.equal(product, K.silu_mul(gate, up))
    for ours, theirs in zip(grads, ref):
        torch.testing.assert_close(ours, theirs, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [1, 3])
def test_rope_and_its_backward_match_the_pytorch_formula(K, dtype, heads):
    T, H = 29, 16
    freqs = torch.randn(T, H // 2) * 4
    cos = torch.cat([freqs.cos(), freqs.cos()], -1).to(dtype)
    sin = torch.cat([freqs.sin(), freqs.sin()], -1).to(dtype)
    x = torch.randn(T, heads, H, dtype=dtype, requires_grad=True)
    grad = torch.randn(T, heads, H, dtype=dtype)
    y = K.rope(x, cos, sin)
    y_ref = _apply_rope(x, cos, sin)
    torch.testing.assert_close(y, y_ref, **_tol(dtype))
    (dx,), (dx_ref,) = torch.autograd.grad(y, x, grad), torch.autograd.grad(y_ref, x, grad)
    torch.testing.assert_close(dx, dx_ref, **_tol(dtype))


def test_rope_takes_a_strided_view_of_the_projection(K):
    # q/k/v as views into one projection output: rows are strided, heads are not contiguous rows.
    qkv = torch.randn(11, 3 * 2 * 8)
    q = qkv.view(11, 3, 2, 8)[:, 0]
    freqs = torch.randn(11, 4)
    cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)
    torch.testing.assert_close(K.rope(q, cos, sin), _apply_rope(q, cos, sin), **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_grad_in_place_matches_the_eager_loss(K, dtype):
    C, V = 6, 5000  # V spans two blocks of the kernel, the second partly masked
    logits = 4 * torch.randn(C, V, dtype=dtype)
    logits[0, :4096] = float("-inf")  # a whole first block masked out: its rescale must not be NaN
    targets = torch.randint(0, V, (C,))
    targets[0] = 4500
    nll_sum, grad_ref = _nll_and_grad(logits.clone(), targets, torch.ones(C), need_grad=True)
    nll = K.cross_entropy_grad_(logits, targets)  # logits now hold the gradient
    torch.testing.assert_close(nll.sum(), nll_sum, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logits.float(), grad_ref.float(), atol=1e-6 if dtype == torch.float32 else 4e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding_idx", [None, 5])
def test_tied_embedding_grad_matches_the_head_gradient_plus_the_embedding_backward(K, dtype, padding_idx):
    # 150 tokens: id 5 appears 80 times (3 to 4 scanned chunks of 32, starting mid-chunk), ids 0..9
    # the rest, most of the 40 rows none; unsorted.
    V, D = 40, 72
    ids = torch.cat([torch.full((80,), 5), torch.randint(0, 10, (70,))])[torch.randperm(150)]
    head, grad = torch.randn(V, D), torch.randn(150, D).to(dtype)
    scale = torch.tensor(0.3)
    y = K.tied_embedding_grad(head, scale, ids, grad, padding_idx, dtype)
    pad = -1 if padding_idx is None else padding_idx
    emb = torch.ops.aten.embedding_dense_backward(grad.double(), ids, V, pad, False)
    ref = head.double() * 0.3 + emb
    assert y.dtype == dtype and y.shape == (V, D)
    torch.testing.assert_close(y.double(), ref.to(dtype).double(), **_tol(dtype))
    if padding_idx is not None:
        torch.testing.assert_close(y[5], (head[5] * scale).to(dtype), **_tol(dtype))  # its 80 tokens left out
    # No tokens: the head's gradient alone.
    empty = K.tied_embedding_grad(head, scale, ids[:0], grad[:0], None, dtype)
    torch.testing.assert_close(empty, (head * scale).to(dtype), **_tol(dtype))
    with pytest.raises(ValueError, match="contiguous fp32"):
        K.tied_embedding_grad(head.to(dtype) if dtype != torch.float32 else head.t(), scale, ids, grad, None, dtype)


def test_a_tied_head_hands_its_weight_gradient_to_the_embedding(K, monkeypatch):
    # bf16 weights shared by the embedding and the head: the loss's backward leaves the head's
    # gradient for the embedding's, which writes the weight's whole gradient once.
    from foundry_padfree import modeling

    batch = packed_lm_batch()
    calls = []
    fn = K.tied_embedding_grad
    monkeypatch.setattr(K, "tied_embedding_grad", lambda *a: calls.append(1) or fn(*a))
    model = tiny_model(tie_word_embeddings=True).to(torch.bfloat16).train()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    loss, grads = loss_and_grads(model, batch)
    assert len(calls) == 1
    monkeypatch.setattr(modeling.PadFreeLlamaForCausalLM, "_deferred_head_grad", lambda self: None)
    ref_loss, ref_grads = loss_and_grads(model, batch)
    assert len(calls) == 1 and torch.equal(loss, ref_loss)
    # The two sums round differently (here once; there each gradient, then their sum).
    torch.testing.assert_close(grads.pop("model.embed_tokens.weight"), ref_grads.pop("model.embed_tokens.weight"),
                               atol=1e-2, rtol=1.6e-2)  # fmt: skip
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name
    # A backward without the loss in it (logits only): the embedding's gradient alone, plus the
    # head's through autograd, as untied.
    monkeypatch.undo()
    model.zero_grad()
    model(**batch, return_logits=True).logits.float().square().mean().backward()
    grad = model.model.embed_tokens.weight.grad.clone()
    monkeypatch.setattr(modeling.PadFreeLlamaForCausalLM, "_deferred_head_grad", lambda self: None)
    model.zero_grad()
    model(**batch, return_logits=True).logits.float().square().mean().backward()
    assert torch.equal(grad, model.model.embed_tokens.weight.grad)


def test_cross_entropy_grad_refuses_strided_logits(K):
    with pytest.raises(ValueError, match="contiguous"):
        K.cross_entropy_grad_(torch.randn(8, 4).t(), torch.zeros(4, dtype=torch.long))


def test_the_model_on_the_fused_kernels_matches_the_pytorch_ops(K, monkeypatch, folded_layers):
    batch = packed_lm_batch()
    calls = []
    names = ("rms_norm", "rope", "silu_mul", "silu_mul_backward", "cross_entropy_grad_", "scale_cast")
    for name in names:
        fn = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _fn=fn, _name=name, **kw: calls.append(_name) or _fn(*a, **kw))
    ref_loss, ref_grads = loss_and_grads(tiny_model(fused_kernels=False).train(), batch)
    assert calls == [] and folded_layers == [], "fused_kernels=False still called a Triton kernel"
    loss, grads = loss_and_grads(tiny_model().train(), batch)
    assert set(calls) == set(names) and folded_layers
    torch.testing.assert_close(loss, ref_loss, **FP32_TOL)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------
# Varlen attention (`foundry_padfree.triton_attention`) against the per-document SDPA reference.

SMALL_TILES = dict(fwd_m=16, fwd_n=16, dkdv_n=16, dkdv_m=16, dq_m=16, dq_n=16)


def _attention_case(lens, N, K_heads, H, dtype):
    from foundry_padfree.varlen import VarlenMeta

    T = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    meta = VarlenMeta(torch.arange(T), cu, max(lens), torch.zeros(T, dtype=torch.long), tuple(lens), 1, T)
    q, k, v = (torch.randn(T, heads, H).to(dtype).requires_grad_() for heads in (N, K_heads, K_heads))
    return meta, (q, k, v), torch.randn(T, N, H).to(dtype)


def _sdpa_fp32_attend(meta, q, k, v, scale=None):
    from foundry_padfree.attention import _sdpa_attend

    return _sdpa_attend(q, k, v, meta, scale or q.shape[-1] ** -0.5)


def _sdpa_fp32(meta, qkv, grad, scale=None):
    q, k, v = (t.detach().float().requires_grad_() for t in qkv)
    o = _sdpa_fp32_attend(meta, q, k, v, scale)
    return o, torch.autograd.grad(o, (q, k, v), grad.float())


# fp16, not bf16: the interpreter's products of bf16 tiles are not bf16 products (numpy has no
# bf16); the GPU tests check bf16.
@pytest.mark.parametrize("pack", [1, 4], ids=["one_head", "packed_heads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "lens, N, K_heads, H",
    [
        ([5, 33, 1, 70, 17, 40], 4, 2, 16),  # GQA, documents of 1 to 5 tiles, a 1-token one
        ([16, 32, 3], 3, 3, 16),  # documents that end on tile edges; one key head per query head
        ([50, 9], 4, 1, 24),  # multi-query, a head dim that is not a power of two
    ],
)
def test_triton_attention_matches_per_document_sdpa(pack, dtype, lens, N, K_heads, H):
    # `pack` 4 packs 2 heads per program for 4/2 heads, 4 for 4/1, none for 3/3.
    from foundry_padfree import triton_attention as ta

    meta, (q, k, v), grad = _attention_case(lens, N, K_heads, H, dtype)
    tiles = ta.schedule(meta.doc_lens, q.device, ta.TileSizes(**SMALL_TILES, pack=pack))
    o = ta.varlen_attention(q, k, v, tiles, H**-0.5)
    grads = torch.autograd.grad(o, (q, k, v), grad)
    o_ref, grads_ref = _sdpa_fp32(meta, (q, k, v), grad)
    assert o.dtype == dtype and [g.dtype for g in grads] == [dtype] * 3
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(o.float(), o_ref, **tol)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(g.float(), g_ref, **tol, msg=f"d{name}")


def _rope_tables(lens, H, dtype):
    positions = torch.cat([torch.arange(n) for n in lens]).float()
    freqs = positions[:, None] / 10000 ** (torch.arange(0, H, 2).float() / H)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("pack", [1, 4], ids=["one_head", "packed_heads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H", [16, 24], ids=["rotated_back_in_the_kernels", "rotated_before_the_kernels"])
def test_triton_attention_with_rope_matches_rope_then_per_document_sdpa(monkeypatch, pack, dtype, H):
    # q and k come in before RoPE; the op rotates them, and its dQ/dK kernels rotate their gradients
    # back (head dims that are powers of two; others are rotated on their own first).
    from foundry_padfree import triton_attention as ta

    lens = [5, 33, 1, 70, 17]
    meta, (q, k, v), grad = _attention_case(lens, 4, 2 if pack == 1 else 1, H, dtype)
    cos, sin = _rope_tables(lens, H, dtype)
    rotated_first = []
    rotate = ta._rotate
    monkeypatch.setattr(ta, "_rotate", lambda *a: rotated_first.append(1) or rotate(*a))
    tiles = ta.schedule(meta.doc_lens, q.device, ta.TileSizes(**SMALL_TILES, pack=pack))
    o = ta.varlen_attention(q, k, v, tiles, H**-0.5, rope=(cos, sin))
    grads = torch.autograd.grad(o, (q, k, v), grad)
    assert len(rotated_first) == (0 if H == 16 else 2)

    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    q_rot, k_rot = (_apply_rope(t, cos.float(), sin.float()) for t in (q32, k32))
    o_ref = _sdpa_fp32_attend(meta, q_rot, k_rot, v32)
    grads_ref = torch.autograd.grad(o_ref, (q32, k32, v32), grad.float())
    assert o.dtype == dtype and [g.dtype for g in grads] == [dtype] * 3
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(o.float(), o_ref.detach(), **tol)
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(g.float(), g_ref, **tol, msg=f"d{name}")


def test_triton_attention_casts_rope_tables_to_q_dtype():
    # fp32 tables with fp16 q/k/v: RoPE is applied in q's dtype, as HF's Llama applies it.
    from foundry_padfree import triton_attention as ta

    meta, (q, k, v), _ = _attention_case([5, 9], 4, 2, 16, torch.float16)
    cos, sin = _rope_tables([5, 9], 16, torch.float32)
    tiles = ta.schedule(meta.doc_lens, q.device, ta.TileSizes(**SMALL_TILES))
    o = ta.varlen_attention(q, k, v, tiles, 0.25, rope=(cos, sin))
    assert o.dtype == torch.float16
    assert torch.equal(o, ta.varlen_attention(q, k, v, tiles, 0.25, rope=(cos.half(), sin.half())))


def test_triton_attention_refuses_rope_tables_of_another_shape():
    from foundry_padfree import triton_attention as ta

    meta, (q, k, v), _ = _attention_case([5, 9], 4, 2, 16, torch.float32)
    cos, sin = _rope_tables([5, 9], 16, torch.float32)
    tiles = ta.schedule(meta.doc_lens, q.device, ta.TileSizes(**SMALL_TILES))
    with pytest.raises(ValueError, match=r"cos table of shape \(13, 16\) for 14 tokens"):
        ta.varlen_attention(q, k, v, tiles, 0.25, rope=(cos[1:], sin[1:]))


@pytest.mark.parametrize("wide", [False, True], ids=["", "wide_heads"])
@pytest.mark.parametrize("preset", ["SHORT_DOCS", "SHORT_DOCS_PACKED", "LONG_DOCS", "LONG_DOCS_PACKED"])
def test_triton_attention_with_the_shipped_tiles(preset, wide):
    # Tiles larger than most documents, and a document spanning two tiles of each kernel.
    from foundry_padfree import triton_attention as ta

    sizes = ta.WIDE_HEADS[getattr(ta, preset)] if wide else getattr(ta, preset)
    meta, (q, k, v), grad = _attention_case([3, 140, 20], 4, 1, 16, torch.float32)
    o = ta.varlen_attention(q, k, v, ta.schedule(meta.doc_lens, q.device, sizes), 0.3)
    grads = torch.autograd.grad(o, (q, k, v), grad)
    o_ref, grads_ref = _sdpa_fp32(meta, (q, k, v), grad, scale=0.3)
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=2e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("head_dim", [8, 16], ids=["rope_before_attention", "rope_inside_attention"])
def test_the_model_on_triton_attention_matches_sdpa(monkeypatch, head_dim):
    # Head dim 16 fills the kernels' blocks: RoPE then runs inside the attention op (its backward
    # kernels rotate dQ and dK back); at 8 it runs before it.
    from foundry_padfree import triton_attention as ta

    calls = []
    apply = ta._VarlenAttention.apply
    monkeypatch.setattr(ta._VarlenAttention, "apply", lambda *a: calls.append(len(a) == 7) or apply(*a))
    batch = packed_lm_batch()
    ref_loss, ref_grads = loss_and_grads(tiny_model(attn_backend="sdpa", head_dim=head_dim).train(), batch)
    loss, grads = loss_and_grads(tiny_model(attn_backend="triton", head_dim=head_dim).train(), batch)
    assert calls == [head_dim == 16] * tiny_model().config.num_hidden_layers
    torch.testing.assert_close(loss, ref_loss, **FP32_TOL)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_triton_attention_takes_strided_views_without_copying(monkeypatch):
    # q, k and v as views into one fused projection output: token stride (N + 2K) * H.
    from foundry_padfree import triton_attention as ta

    meta, (q, k, v), grad = _attention_case([7, 30], 4, 2, 16, torch.float32)
    qkv = torch.cat([q.detach(), k.detach(), v.detach()], dim=1).requires_grad_()  # (T, N + 2K, H)
    views = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    assert not views[0].is_contiguous()
    copies = []
    contiguous = torch.Tensor.contiguous
    monkeypatch.setattr(
        torch.Tensor, "contiguous", lambda t, *a, **kw: copies.append(t.shape) or contiguous(t, *a, **kw)
    )
    tiles = ta.schedule(meta.doc_lens, q.device, ta.TileSizes(**SMALL_TILES))
    o = ta.varlen_attention(*views, tiles, 16**-0.5)
    (d_qkv,) = torch.autograd.grad(o, qkv, grad)
    monkeypatch.undo()
    assert copies == [], f"copied inputs of shapes {copies}"
    o_ref, grads_ref = _sdpa_fp32(meta, (q, k, v), grad)
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(d_qkv, torch.cat(grads_ref, dim=1), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["one_graph", "graph_per_layer"])
def test_compiled_layers_trace_the_triton_attention_without_a_graph_break(checkpointing, monkeypatch):
    # Inside torch.compile the kernels run as the `foundry_padfree::varlen_attention` operator: the
    # whole stack is one graph (one per layer under gradient checkpointing), the tile lists and
    # sizes its inputs. Same loss and gradients as eager; another layout and token count, and a
    # batch that takes the long-document tiles, reuse the graphs.
    from foundry_padfree import triton_attention as ta

    torch._dynamo.reset()
    batch = packed_lm_batch()
    eager_loss, eager_grads = loss_and_grads(tiny_model(attn_backend="triton").train(), batch)
    compiled = tiny_model(attn_backend="triton").train()
    if checkpointing:
        compiled.gradient_checkpointing_enable()
    compiled.compile_layers("aot_eager")
    counters = torch._dynamo.utils.counters
    counters.clear()
    loss, grads = loss_and_grads(compiled, batch)
    torch.testing.assert_close(loss, eager_loss, **FP32_TOL)
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert not counters["graph_break"], dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    # Checkpointing runs each layer once without grad and once again in backward: two graphs.
    assert graphs == (2 if checkpointing else 1), graphs
    loss_and_grads(compiled, {k: v[:, 3:] for k, v in batch.items()})  # fewer tokens
    assert counters["stats"]["unique_graphs"] == graphs
    loss_and_grads(compiled, {k: torch.cat([v, v], 1) for k, v in batch.items()})  # more tokens, more documents
    assert counters["stats"]["unique_graphs"] == graphs
    monkeypatch.setattr(ta, "LONG_DOC_TOKENS", 1)  # every batch now takes LONG_DOCS
    long_loss, _ = loss_and_grads(compiled, batch)
    assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(long_loss, eager_loss, **FP32_TOL)


def test_the_attention_operator_passes_opcheck():
    from foundry_padfree import triton_attention as ta

    meta, (q, k, v), _ = _attention_case([5, 33, 1], 4, 2, 16, torch.float32)
    tiles = ta.schedule(meta.doc_lens, q.device, ta.TileSizes(**SMALL_TILES))
    torch.library.opcheck(ta._attention_op, (q, k, v, *tiles[:3], tiles.sizes_cpu, 0.25))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_tied"])
def test_audit_sees_the_fused_eager_paths(K, tmp_path, dtype, monkeypatch):
    # Where kernels run (here interpreted; on CUDA compiled), the eager block calls the Triton
    # backend's `attend_rope` (RoPE inside the attention op), and a tied 16-bit weight embeds through
    # `_TiedEmbedding`, not the `embed_tokens` module: the strict audit must see both as they are.
    from foundry_padfree import modeling
    from foundry_padfree.callbacks import PadFreeAudit
    from foundry_padfree.modeling import _folds
    from tests.composer_helpers import composer_model, fit, logged, write_model_dir

    model = composer_model(write_model_dir(tmp_path / "model", tie_word_embeddings=True), attn_backend="triton")
    model.to(dtype)  # bf16 parameters: FSDP's PURE mixed precision
    decoder = model.model.model
    assert _folds(decoder.layers[0], torch.zeros(1, 32, dtype=dtype))
    assert (model.model._deferred_head_grad() is not None) == (dtype == torch.bfloat16)
    tied, folded = [], []  # and the audit must not push the model off them while it watches
    monkeypatch.setattr(
        modeling._TiedEmbedding, "apply", functools.partial(_counted, tied, modeling._TiedEmbedding.apply)
    )
    monkeypatch.setattr(modeling, "_folded_layer", functools.partial(_counted, folded, modeling._folded_layer))
    trainer = fit(model, [PadFreeAudit(interval=1, strict=True)], batches=1, microbatch=4)
    assert logged(trainer, "padfree/audit/passed") == [1.0]
    assert logged(trainer, "padfree/audit/varlen_layers") == [2.0]
    assert len(folded) == 2 and len(tied) == (dtype == torch.bfloat16)


def _counted(calls: list, fn, *args):
    calls.append(1)
    return fn(*args)


def test_fused_elementwise_kernels_take_views_and_no_tokens(K):
    # gate and up as halves of one [T, 2F] product: strided views, not contiguous tensors.
    gate_up = torch.randn(5, 2 * 24)
    gate, up = gate_up[:, :24], gate_up[:, 24:]
    grad = torch.randn(5, 24)
    torch.testing.assert_close(K.silu_mul(gate, up), torch.nn.functional.silu(gate) * up, **FP32_TOL)
    dgate, dup = K.silu_mul_backward(grad, gate, up)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    torch.autograd.backward(torch.nn.functional.silu(g) * u, grad)
    torch.testing.assert_close(dgate, g.grad, **FP32_TOL)
    torch.testing.assert_close(dup, u.grad, **FP32_TOL)
    # No tokens: RMSNorm's weight gradient is 0, not whatever memory held.
    x = torch.zeros(0, 16, requires_grad=True)
    w = torch.ones(16, requires_grad=True)
    (K.rms_norm(x, w, 1e-5) * 1.0).sum().backward()
    assert torch.equal(w.grad, torch.zeros(16))


@pytest.mark.parametrize("layout", ["one_graph", "wrapped_layers", "checkpointed"])
def test_audit_sees_the_compiled_layers(K, tmp_path, layout, monkeypatch):
    # Under `compile_layers` with the Triton backend the layers run inside compiled graphs, where no
    # hook fires: the audit records the graphs' calls with the metadata they get, passes a correct run
    # and fails a forward that prepares the metadata a second time. Layers in a wrapper (activation
    # checkpointing's, as Composer applies it; FSDP's) are called one by one, each a compiled layer:
    # the stack's graph would read their weights past the wrapper.
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from foundry_padfree import modeling
    from foundry_padfree.callbacks import PadFreeAudit, PadFreeCheckError
    from tests.composer_helpers import composer_model, fit, logged, write_model_dir

    def build():
        model = composer_model(write_model_dir(tmp_path / "model"), attn_backend="triton")
        if layout == "checkpointed":
            model.model.gradient_checkpointing_enable()
        if layout == "wrapped_layers":
            apply_activation_checkpointing(model.model, check_fn=lambda m: isinstance(m, modeling.PadFreeDecoderLayer))
        model.model.compile_layers("aot_eager")
        return model

    torch._dynamo.reset()
    calls = {"stack": 0, "layer": 0}

    def counted(name, compiled_for):
        def get(backend):
            calls[name] += 1
            return compiled_for(backend)

        return get

    monkeypatch.setattr(modeling, "_compiled_stack", counted("stack", modeling._compiled_stack))
    monkeypatch.setattr(modeling, "_compiled_layer", counted("layer", modeling._compiled_layer))
    trainer = fit(build(), [PadFreeAudit(interval=1, strict=True)], batches=1, microbatch=4)
    assert logged(trainer, "padfree/audit/passed") == [1.0]
    assert logged(trainer, "padfree/audit/varlen_layers") == [2.0]
    if layout == "one_graph":
        assert calls == {"stack": 1, "layer": 0}, calls
    else:  # the layers one by one (and again in backward, where they are checkpointed)
        assert calls["stack"] == 0 and calls["layer"] >= 2, calls

    forward_tokens = modeling.PadFreeLlamaModel.forward_tokens

    def prepares_twice(self, input_ids_T, meta, *args):
        self.attention_backend(input_ids_T.device).prepare(meta, 2, 8)  # metadata rebuilt beside the model's
        return forward_tokens(self, input_ids_T, meta, *args)

    monkeypatch.setattr(modeling.PadFreeLlamaModel, "forward_tokens", prepares_twice)
    with pytest.raises(PadFreeCheckError, match=r"the attention backend prepared metadata 2 times"):
        fit(build(), [PadFreeAudit(interval=1, strict=True)], batches=1, microbatch=4)
