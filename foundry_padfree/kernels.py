"""Fused Triton kernels for the elementwise parts of a Llama block, for eager CUDA runs.

Shape legend: T tokens, D hidden size, N heads, H head dim, F MLP width, C tokens of a loss chunk,
V vocabulary.

Run eagerly, each of RMSNorm, RoPE, SiLU-gated MLP and the cross-entropy gradient is a chain of
small PyTorch kernels, each reading and writing a `[T,D]`/`[T,F]`/`[C,V]` tensor (about a quarter
of a 1B-parameter model's eager step on an H200 goes there). Here each is one kernel forward and
one backward, computing in fp32 and rounding where the PyTorch formulas round, so results match
them to within one unit of the output dtype. `torch.compile` fuses the same formulas itself, so
the model uses these only outside compiled code (`usable`).

Every function here takes contiguous tensors and falls back to nothing: callers check `usable`.
With `TRITON_INTERPRET=1` set before import, the kernels run on CPU tensors (slowly), which is how
the tests check them without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - torch's CUDA wheels ship Triton; CPU-only installs may not
    triton = tl = None


def usable(x: Tensor) -> bool:
    """Whether the Triton kernels can run on `x`: Triton installed, `x` on CUDA (or any device
    under `TRITON_INTERPRET=1`), and not inside `torch.compile`, which fuses the PyTorch formulas."""
    return HAS_TRITON and (x.is_cuda or INTERPRET) and not torch.compiler.is_compiling()


def _row_warps(block: int) -> int:
    return 4 if block < 2048 else 8 if block < 8192 else 16


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---------------------------------------------------------------------------------------------
# RMSNorm: y = w * (x * rstd).to(x.dtype), rstd = 1 / sqrt(mean(x^2) + eps), as LlamaRMSNorm.

if HAS_TRITON:

    @triton.jit
    def _rms_norm_fwd_kernel(X, W, Y, RSTD, X_COPY, D, eps, COPY: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x_in = tl.load(X + row * D + cols, mask=mask, other=0.0)
        if COPY:  # the input's copy for the residual stream, from the read the norm makes anyway
            tl.store(X_COPY + row * D + cols, x_in, mask=mask)
        x = x_in.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        n = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * D + cols, (w * n).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    # T changes every batch: one compiled variant for all (Triton would specialize on T % 16).
    @triton.jit(do_not_specialize=["T", "rows_per_program"])
    def _rms_norm_bwd_kernel(
        DY, X, W, RSTD, DRES, DX, DW_PARTIAL, T, D, rows_per_program, HAS_DRES: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
        first = pid.to(tl.int64) * rows_per_program
        for i in range(rows_per_program):
            row = first + i
            if row < T:
                dy = tl.load(DY + row * D + cols, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + row)
                n = x * rstd
                dw += dy * n.to(X.dtype.element_ty).to(tl.float32)
                # dL/dn rounded to x's dtype, as `(grad * weight).to(x.dtype)` in the PyTorch backward.
                g = (dy * w).to(X.dtype.element_ty).to(tl.float32)
                dx = rstd * (g - n * (tl.sum(g * n, axis=0) / D))
                if HAS_DRES:  # the gradient reaching x along the residual stream, added in fp32
                    dx += tl.load(DRES + row * D + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW_PARTIAL + pid * D + cols, dw, mask=mask)


def first_order_only(what: str) -> None:
    """Raise in a hand-written backward asked to build a graph of its own (`create_graph=True`, for
    second-order gradients: Hessian-vector products, gradient penalties). Its kernels and the values
    it saved in the forward have no derivative, so autograd would otherwise go on with second-order
    gradients that miss every path through it. Autograd runs a backward with grad mode on only then."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"second-order gradients (backward or autograd.grad with create_graph=True) are not supported by "
            f"foundry_padfree's {what}: its backward is hand-written and has no derivative. Compute them with "
            "stock transformers.LlamaForCausalLM (save_pretrained writes a checkpoint it loads) and an attention "
            "implementation with double backward (attn_implementation='eager')."
        )


class _RMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: Tensor, weight_D: Tensor, eps: float, pass_input: bool):
        D = x_TD.shape[-1]
        x2_TD = x_TD.reshape(-1, D).contiguous()
        T = x2_TD.shape[0]
        # In x's shape, contiguous: outputs that are not views, so that the caller may update them in place.
        y_TD = torch.empty(x_TD.shape, dtype=torch.promote_types(x_TD.dtype, weight_D.dtype), device=x_TD.device)
        rstd_T = torch.empty(T, dtype=torch.float32, device=x_TD.device)
        copy_TD = torch.empty(x_TD.shape, dtype=x_TD.dtype, device=x_TD.device) if pass_input else y_TD
        block = triton.next_power_of_2(D)
        if T:
            _rms_norm_fwd_kernel[(T,)](
                x2_TD, weight_D, y_TD, rstd_T, copy_TD, D, eps,
                COPY=pass_input, BLOCK_D=block, num_warps=_row_warps(block),
            )  # fmt: skip
        ctx.save_for_backward(x2_TD, weight_D, rstd_T)
        ctx.x_shape = x_TD.shape
        ctx.set_materialize_grads(False)
        return (y_TD, copy_TD) if pass_input else y_TD

    @staticmethod
    def backward(ctx, grad_TD: Tensor | None, grad_input_TD: Tensor | None = None):
        first_order_only("RMSNorm")
        x_TD, weight_D, rstd_T = ctx.saved_tensors
        T, D = x_TD.shape
        if grad_TD is None:  # only the passed-through input was used
            return grad_input_TD, None, None, None
        grad_TD = grad_TD.reshape(T, D).contiguous()
        has_dres = grad_input_TD is not None
        dres_TD = grad_input_TD.reshape(T, D).contiguous() if has_dres else grad_TD
        grad_x_TD = torch.empty_like(x_TD)
        programs = max(1, min(T, 4 * _num_sms(x_TD.device)))
        rows_per_program = triton.cdiv(T, programs) if T else 1
        # Every program writes its row of partial sums: no zero-fill (none runs without tokens).
        dw_partial_PD = (torch.empty if T else torch.zeros)(programs, D, dtype=torch.float32, device=x_TD.device)
        block = triton.next_power_of_2(D)
        if T:
            _rms_norm_bwd_kernel[(programs,)](
                grad_TD, x_TD, weight_D, rstd_T, dres_TD, grad_x_TD, dw_partial_PD, T, D, rows_per_program,
                HAS_DRES=has_dres, BLOCK_D=block, num_warps=_row_warps(block),
            )  # fmt: skip
        grad_w = dw_partial_PD.sum(0).to(weight_D.dtype)
        return grad_x_TD.view(ctx.x_shape), grad_w, None, None


def rms_norm(x_TD: Tensor, weight_D: Tensor, eps: float, pass_input: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """LlamaRMSNorm of `x_TD` (..., D) with weight (D,): one kernel forward, one backward, which
    keeps only `x` and the `[T]` fp32 inverse norms.

    `pass_input`: return `(y, x)`, where `x` is a copy of the input that the forward kernel writes
    from the read it makes anyway, for a caller that uses the input again (the residual stream) and
    may update it in place (`addmm_` of the next residual add, without a copy of its own). The
    gradient reaching that second use is added to the norm's input gradient inside the backward
    kernel, instead of autograd adding the two in a pass of its own."""
    return _RMSNormTriton.apply(x_TD, weight_D, eps, pass_input)


# ---------------------------------------------------------------------------------------------
# SiLU-gated product: h = silu(gate) * up, silu rounded to the inputs' dtype first, as in PyTorch.

if HAS_TRITON:

    @triton.jit
    def _silu_mul_fwd_kernel(G, U, H, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(G.dtype.element_ty).to(tl.float32)
        tl.store(H + offs, (s * u).to(H.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_bwd_kernel(DH, G, U, DG, DU, H, numel, STORE_H: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        e = 1.0 + tl.exp(-g)
        sig = 1.0 / e
        s = (g / e).to(G.dtype.element_ty).to(tl.float32)  # silu as the forward computes it
        # As ATen: silu_backward(dh * up, gate) and dh * silu(gate), each product rounded.
        dhu = (dh * u).to(DG.dtype.element_ty).to(tl.float32)
        tl.store(DG + offs, (dhu * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + offs, (dh * s).to(DU.dtype.element_ty), mask=mask)
        if STORE_H:  # the forward's product, recomputed from the same loads
            tl.store(H + offs, (s * u).to(H.dtype.element_ty), mask=mask)


_ELEMENTWISE_BLOCK = 2048


def silu_mul(gate_TF: Tensor, up_TF: Tensor) -> Tensor:
    """`silu(gate) * up` for two tensors of one shape and dtype (no autograd)."""
    gate_TF, up_TF = gate_TF.contiguous(), up_TF.contiguous()  # the kernel reads flat memory
    h_TF = torch.empty_like(gate_TF)
    n = gate_TF.numel()
    if n:
        grid = (triton.cdiv(n, _ELEMENTWISE_BLOCK),)
        _silu_mul_fwd_kernel[grid](gate_TF, up_TF, h_TF, n, BLOCK=_ELEMENTWISE_BLOCK, num_warps=8)
    return h_TF


def silu_mul_backward(
    grad_TF: Tensor, gate_TF: Tensor, up_TF: Tensor, with_product: bool = False
) -> tuple[Tensor, ...]:
    """Gradients of `silu(gate) * up` with respect to gate and up, in one pass; with `with_product`,
    also the product `silu(gate) * up` itself (as `silu_mul` computes it), from the same reads."""
    grad_TF, gate_TF, up_TF = grad_TF.contiguous(), gate_TF.contiguous(), up_TF.contiguous()  # flat memory
    grad_gate_TF, grad_up_TF = torch.empty_like(gate_TF), torch.empty_like(up_TF)
    h_TF = torch.empty_like(gate_TF) if with_product else grad_gate_TF
    n = gate_TF.numel()
    if n:
        grid = (triton.cdiv(n, _ELEMENTWISE_BLOCK),)
        _silu_mul_bwd_kernel[grid](
            grad_TF, gate_TF, up_TF, grad_gate_TF, grad_up_TF, h_TF, n,
            STORE_H=with_product, BLOCK=_ELEMENTWISE_BLOCK, num_warps=8,
        )  # fmt: skip
    return (grad_gate_TF, grad_up_TF, h_TF) if with_product else (grad_gate_TF, grad_up_TF)


# ---------------------------------------------------------------------------------------------
# RoPE on (T, N, H) heads: y = x * cos + rotate_half(x) * sin. The tables are `cat(f, f)` along H
# (HF's layout), so only their first half is read.

if HAS_TRITON:

    @triton.jit
    def _rope_kernel(
        X, COS, SIN, Y, N, H2, stride_xt, stride_xn, stride_ct, sign,
        BLOCK_N: tl.constexpr, BLOCK_H2: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0).to(tl.int64)
        heads = tl.arange(0, BLOCK_N)[:, None]
        dims = tl.arange(0, BLOCK_H2)[None, :]
        mask = (heads < N) & (dims < H2)
        c = tl.load(COS + t * stride_ct + dims, mask=dims < H2, other=0.0).to(tl.float32)
        s = sign * tl.load(SIN + t * stride_ct + dims, mask=dims < H2, other=0.0).to(tl.float32)
        x_ptr = X + t * stride_xt + heads * stride_xn + dims
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + H2, mask=mask, other=0.0).to(tl.float32)
        # Each product rounded to the output dtype before the sum, as the PyTorch formula does.
        dtype = Y.dtype.element_ty
        y1 = (x1 * c).to(dtype).to(tl.float32) - (x2 * s).to(dtype).to(tl.float32)
        y2 = (x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)
        y_ptr = Y + t * (N * 2 * H2) + heads * (2 * H2) + dims
        tl.store(y_ptr, y1.to(dtype), mask=mask)
        tl.store(y_ptr + H2, y2.to(dtype), mask=mask)


def _rope(x_TNH: Tensor, cos_TH: Tensor, sin_TH: Tensor, sign: float) -> Tensor:
    T, N, H = x_TNH.shape
    if x_TNH.stride(-1) != 1 or cos_TH.stride(-1) != 1 or cos_TH.stride() != sin_TH.stride():
        x_TNH, cos_TH, sin_TH = x_TNH.contiguous(), cos_TH.contiguous(), sin_TH.contiguous()
    y_TNH = torch.empty((T, N, H), dtype=torch.promote_types(x_TNH.dtype, cos_TH.dtype), device=x_TNH.device)
    if T:
        block_n, block_h2 = triton.next_power_of_2(N), triton.next_power_of_2(H // 2)
        _rope_kernel[(T,)](
            x_TNH, cos_TH, sin_TH, y_TNH, N, H // 2, x_TNH.stride(0), x_TNH.stride(1), cos_TH.stride(0), sign,
            BLOCK_N=block_n, BLOCK_H2=block_h2, num_warps=4 if block_n * block_h2 <= 1024 else 8,
        )  # fmt: skip
    return y_TNH


class _RoPETriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TNH: Tensor, cos_TH: Tensor, sin_TH: Tensor) -> Tensor:
        ctx.save_for_backward(cos_TH, sin_TH)
        ctx.x_dtype = x_TNH.dtype
        return _rope(x_TNH, cos_TH, sin_TH, 1.0)

    @staticmethod
    def backward(ctx, grad_TNH: Tensor) -> tuple[Tensor, None, None]:
        first_order_only("RoPE kernel")
        # The transpose of the rotation is the rotation by -angle.
        cos_TH, sin_TH = ctx.saved_tensors
        return _rope(grad_TNH, cos_TH, sin_TH, -1.0).to(ctx.x_dtype), None, None


def rope(x_TNH: Tensor, cos_TH: Tensor, sin_TH: Tensor) -> Tensor:
    """`x * cos + rotate_half(x) * sin` for x (T, N, H) and tables (T, H) whose halves along H are
    equal (HF's `cat((freqs, freqs), -1)`); the tables get no gradient."""
    if x_TNH.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even head dim, got {x_TNH.shape[-1]}.")
    return _RoPETriton.apply(x_TNH, cos_TH, sin_TH)


# ---------------------------------------------------------------------------------------------
# Cross-entropy gradient in place: logits [C,V] -> softmax - one_hot(target), plus per-row NLL.

if HAS_TRITON:

    @triton.jit
    def _cross_entropy_grad_kernel(LOGITS, TARGETS, NLL, V, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * V
        target = tl.load(TARGETS + row)
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # While every logit so far is -inf, rescale by exp(. - 0): exp(-inf - -inf) would be NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
            m = m_new
        lse = m + tl.log(s)
        x_target = tl.load(base + target).to(tl.float32)
        tl.store(NLL + row, lse - x_target)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(base + cols, g.to(LOGITS.dtype.element_ty), mask=cols < V)


def cross_entropy_grad_(logits_CV: Tensor, targets_C: Tensor) -> Tensor:
    """Overwrite `logits_CV` (C, V), contiguous, with `softmax - one_hot(targets_C)` and return the
    (C,) fp32 negative log-likelihoods. `targets_C`: (C,), int64 in [0, V). Two reads and one write
    of the logits, and no `[C,V]` fp32 temporary."""
    C, V = logits_CV.shape
    if not logits_CV.is_contiguous():
        raise ValueError("cross_entropy_grad_ needs contiguous logits (it writes them in place).")
    nll_C = torch.empty(C, dtype=torch.float32, device=logits_CV.device)
    if C:
        _cross_entropy_grad_kernel[(C,)](logits_CV, targets_C, nll_C, V, BLOCK_V=4096, num_warps=8)
    return nll_C


# ---------------------------------------------------------------------------------------------
# Scale and cast: y = (x * s).to(dtype), s a 0-dim tensor on the device (read there: no sync).

if HAS_TRITON:

    @triton.jit
    def _scale_cast_kernel(X, S, Y, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(X + offs, mask=mask, other=0.0)
        s = tl.load(S).to(x.dtype)
        tl.store(Y + offs, (x * s).to(Y.dtype.element_ty), mask=mask)


def scale_cast(x: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """`(x * scale).to(dtype)` in one pass, for a contiguous `x` and a 0-dim `scale` of x's dtype:
    the product in x's precision, then one rounding, as `torch.mul(x, scale, out=<dtype tensor>)`.
    (That call runs ATen's unvectorized mixed-dtype loop, ~3x this kernel's time on a `[V,D]` fp32
    weight gradient.)"""
    if not x.is_contiguous():
        raise ValueError("scale_cast needs a contiguous input.")
    y = torch.empty_like(x, dtype=dtype)
    n = x.numel()
    if n:
        grid = (triton.cdiv(n, _ELEMENTWISE_BLOCK),)
        _scale_cast_kernel[grid](x, scale.to(x.dtype), y, n, BLOCK=_ELEMENTWISE_BLOCK, num_warps=8)
    return y


# ---------------------------------------------------------------------------------------------
# Weight gradient of an embedding tied to the output head: y = (head * s + E).to(dtype), E[v] the
# sum of the embedding output's gradient rows of the tokens whose id is v.

_SCAN_CHUNK = 32  # sorted token positions per scanned chunk (`_chunk_scan_kernel`)

if HAS_TRITON:

    @triton.jit(do_not_specialize=["T"])
    def _chunk_scan_kernel(G, ORDER, SCAN, T, D, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
        """SCAN[i] = sum of G[ORDER[j]] over j from the start of i's chunk of CHUNK positions to i, fp32."""
        pos = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        ok = pos < T
        mask = ok[:, None] & (cols < D)[None, :]
        token = tl.load(ORDER + pos, mask=ok, other=0).to(tl.int64)
        g = tl.load(G + token[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(SCAN + pos[:, None] * D + cols[None, :], tl.cumsum(g, axis=0), mask=mask)

    @triton.jit
    def _tied_embedding_grad_kernel(
        HEAD, S, STARTS, SCAN, Y, D, padding_idx, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        y = tl.load(HEAD + row * D + cols, mask=mask, other=0.0).to(tl.float32) * tl.load(S)
        start = tl.load(STARTS + row)
        end = tl.where(row == padding_idx, start, tl.load(STARTS + row + 1))
        if end > start:
            # The sorted positions [start, end) hold this row's tokens: per chunk they span, the scan
            # at their last position there, less the scan just before `start` in the first chunk.
            for chunk in range(start // CHUNK, (end - 1) // CHUNK + 1):
                last = tl.minimum(end, (chunk + 1) * CHUNK) - 1
                y += tl.load(SCAN + last * D + cols, mask=mask, other=0.0)
            if start % CHUNK != 0:
                y -= tl.load(SCAN + (start - 1) * D + cols, mask=mask, other=0.0)
        tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=mask)


def tied_embedding_grad(
    head_grad_VD: Tensor, scale: Tensor, ids_T: Tensor, grad_TD: Tensor, padding_idx: int | None, dtype: torch.dtype
) -> Tensor:
    """The gradient of a `[V,D]` weight shared by the input embedding and the output head, in one
    pass over `[V,D]`: `(head_grad_VD * scale + E).to(dtype)`, where row v of the embedding's
    gradient E sums the rows of `grad_TD` (T, D) whose token `ids_T` (T,) is v (none for
    `padding_idx`, as `nn.Embedding` leaves that row). `head_grad_VD`: contiguous fp32, `scale`: a
    0-dim tensor.

    E is never built densely: the tokens are sorted by id (stably, so the sums are deterministic),
    `_SCAN_CHUNK` sorted rows at a time are summed cumulatively in fp32, and each vocabulary row
    adds the scans at its tokens' ends; a frequent token costs one load per chunk it spans. PyTorch
    instead writes a zero-filled `[V,D]` embedding gradient and then adds the two gradients."""
    if not head_grad_VD.is_contiguous() or head_grad_VD.dtype != torch.float32:
        raise ValueError("tied_embedding_grad needs the head's gradient as a contiguous fp32 tensor.")
    V, D = head_grad_VD.shape
    T = ids_T.numel()
    ids_T, grad_TD = ids_T.reshape(T), grad_TD.reshape(T, D).contiguous()
    order_T = torch.argsort(ids_T, stable=True)
    starts = torch.searchsorted(ids_T[order_T], torch.arange(V + 1, device=ids_T.device, dtype=ids_T.dtype))
    scan_TD = torch.empty(T, D, dtype=torch.float32, device=grad_TD.device)
    if T:
        grid = (triton.cdiv(T, _SCAN_CHUNK), triton.cdiv(D, 256))
        _chunk_scan_kernel[grid](grad_TD, order_T, scan_TD, T, D, CHUNK=_SCAN_CHUNK, BLOCK_D=256, num_warps=4)
    y_VD = torch.empty_like(head_grad_VD, dtype=dtype)
    if V:
        block = triton.next_power_of_2(D)
        _tied_embedding_grad_kernel[(V,)](
            head_grad_VD, scale.to(torch.float32), starts, scan_TD, y_VD, D, -1 if padding_idx is None else padding_idx,
            CHUNK=_SCAN_CHUNK, BLOCK_D=block, num_warps=_row_warps(block),
        )  # fmt: skip
    return y_VD
