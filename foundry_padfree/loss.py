"""Head + cross-entropy on packed tokens, chunked so `[T,V]` logits never exist at once.

Shape legend: T tokens that have a target, D hidden size, V vocabulary, C chunk of tokens.

The forward computes each chunk's logits, its loss and, when a gradient is wanted, the gradient
of the summed loss with respect to the hidden states and the head weight; only those gradients
(`[T,D]` and `[V,D]`) are kept for backward. Peak extra memory is a `[C,V]` fp32 block instead of
`[T,V]` fp32 logits (16 GiB for 32k tokens and a 128k vocabulary).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from foundry_padfree import kernels
from foundry_padfree.config import is_positive_int
from foundry_padfree.varlen import IGNORE_INDEX, bad_labels


def _nll_and_grad(logits_CV: Tensor, t_C: Tensor, valid_C: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Summed cross-entropy of a chunk and its gradient w.r.t. the logits (eager), rows of ignored
    targets not yet zeroed (the caller masks the `[C,D]` products instead of the `[C,V]` gradient).

    Two passes over `[C,V]`: `log_softmax(dtype=float32)` reads the low-precision logits once and
    writes fp32 log-probabilities; `exp` reads them and writes the gradient in the logits' dtype.
    The `-1` at each target is applied in fp32 on the `[C]` picked values and written over those
    entries, so the result equals casting fp32 `softmax - one_hot`.
    """
    logp_CV = torch.log_softmax(logits_CV, dim=-1, dtype=torch.float32)
    picked_C = logp_CV.gather(1, t_C[:, None]).squeeze(1)
    nll_sum = -torch.where(valid_C.bool(), picked_C, 0.0).sum()  # where, not *: an ignored row may pick -inf
    if not need_grad:
        return nll_sum, None
    g_CV = torch.empty_like(logits_CV)
    torch.exp(logp_CV, out=g_CV)
    g_CV.scatter_(1, t_C[:, None], (picked_C.exp() - 1.0).to(g_CV.dtype)[:, None])
    return nll_sum, g_CV


def _nll_and_grad_fused(logits_CV: Tensor, t_C: Tensor, valid_C: Tensor) -> tuple[Tensor, Tensor]:
    """`_nll_and_grad` written without in-place indexing, so that inductor fuses it into a reduction
    and one elementwise pass (the one-hot is an iota comparison)."""
    logp_CV = torch.log_softmax(logits_CV.float(), dim=-1)
    nll_sum = -torch.where(valid_C.bool(), logp_CV.gather(1, t_C[:, None]).squeeze(1), 0.0).sum()
    one_hot_CV = torch.arange(logits_CV.shape[1], device=logits_CV.device)[None, :] == t_C[:, None]
    g_CV = logp_CV.exp() - one_hot_CV.float()
    return nll_sum, g_CV.to(logits_CV.dtype)


@functools.cache
def _compiled_nll_and_grad(backend: str):
    return torch.compile(_nll_and_grad_fused, backend=backend)


@functools.cache
def _addmm_takes_out_dtype() -> bool:
    """Whether this torch's CUDA `addmm` accumulates bf16 products into an fp32 tensor in place."""
    try:
        a = torch.ones(2, 2, device="cuda", dtype=torch.bfloat16)
        acc = torch.zeros(2, 2, device="cuda")
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError):
        return False
    return bool((acc == 2).all())


def _accumulate_mm(acc_VD: Tensor, a_VC: Tensor, b_CD: Tensor, overwrite: bool = False) -> Tensor:
    """acc += a @ b in place, in acc's (fp32) precision, without a low-precision `[V,D]` product
    when torch can. In place: an out-of-place `addmm` would first copy the whole `[V,D]` fp32 acc.
    `overwrite`: acc = a @ b instead, without reading acc (which may be uninitialized)."""
    beta = 0.0 if overwrite else 1.0
    if a_VC.dtype == acc_VD.dtype:
        return acc_VD.addmm_(a_VC, b_CD, beta=beta)
    if acc_VD.is_cuda and _addmm_takes_out_dtype():
        return torch.addmm(acc_VD, a_VC, b_CD, beta=beta, out_dtype=acc_VD.dtype, out=acc_VD)
    return acc_VD.copy_(a_VC @ b_CD) if overwrite else acc_VD.add_(a_VC @ b_CD)


def linear_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype `nn.Linear` computes in on `device_type` for inputs of `dtype`: autocast's when
    autocast is on there, else `dtype`. For products written out by hand under autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype


class DeferredHeadGrad:
    """Hands the output head's weight gradient, fp32 and not yet scaled by the loss's gradient, from
    the loss's backward to the backward of an input embedding that shares the weight, which then
    writes the weight's whole gradient in one pass (`kernels.tied_embedding_grad`) instead of
    autograd adding two `[V,D]` gradients, one of them a mostly-zero embedding gradient. One per
    forward; autograd runs the loss's backward before the embedding's, which depends on it."""

    def __init__(self) -> None:
        self._pending: tuple[Tensor, Tensor] | None = None

    def put(self, head_grad_VD: Tensor, scale: Tensor) -> None:
        self._pending = (head_grad_VD, scale)

    def take(self) -> tuple[Tensor, Tensor] | None:
        """(fp32 head gradient, scale), or None when the loss was not part of this backward."""
        pending, self._pending = self._pending, None
        return pending


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        h_TD: Tensor,
        w_VD: Tensor,
        targets_T: Tensor,
        chunk: int,
        need_grad: bool,
        compile_backend: str | None,
        fused: bool,
        deferred: DeferredHeadGrad | None,
        all_targets: bool,
    ) -> Tensor:
        loss_sum = torch.zeros((), dtype=torch.float32, device=h_TD.device)
        grad_h_TD = torch.empty_like(h_TD) if need_grad else None
        # The first chunk's product overwrites the fp32 accumulator: no zero-fill of `[V,D]`.
        grad_w_VD = None
        if need_grad:
            grad_w_VD = (torch.empty_like if h_TD.shape[0] else torch.zeros_like)(w_VD, dtype=torch.float32)
        ctx.w_dtype, ctx.fused, ctx.deferred = w_VD.dtype, fused, deferred
        # Under autocast the head runs in the autocast dtype, as nn.Linear would; casts are explicit
        # below so that every product has one input dtype.
        device_type = h_TD.device.type
        dtype = linear_dtype(device_type, h_TD.dtype)
        with torch.autocast(device_type, enabled=False):
            h_TD, w_VD = h_TD.to(dtype), w_VD.to(dtype)
            for start in range(0, h_TD.shape[0], chunk):
                h_CD = h_TD[start : start + chunk]
                t_C = targets_T[start : start + chunk]
                valid_C = t_C != IGNORE_INDEX
                t_C = t_C.clamp(min=0)
                logits_CV = h_CD @ w_VD.t()
                if fused and need_grad and kernels.usable(logits_CV):
                    # In place: the gradient overwrites the logits, no other [C,V] tensor exists.
                    nll_sum = torch.where(valid_C.bool(), kernels.cross_entropy_grad_(logits_CV, t_C), 0.0).sum()
                    g_CV = logits_CV
                elif compile_backend is not None and need_grad:
                    for t in (logits_CV, t_C, valid_C):
                        torch._dynamo.maybe_mark_dynamic(t, 0)  # the last chunk is shorter
                    nll_sum, g_CV = _compiled_nll_and_grad(compile_backend)(logits_CV, t_C, valid_C)
                else:
                    nll_sum, g_CV = _nll_and_grad(logits_CV, t_C, valid_C, need_grad)
                del logits_CV
                loss_sum += nll_sum
                if need_grad:
                    # d(sum of losses)/d logits = softmax - one_hot(target), zero on ignored tokens:
                    # zeroed on the [C,D] sides of the two products, not on the [C,V] gradient
                    # (and not at all when the caller guarantees every target).
                    grad_h_CD = grad_h_TD[start : start + chunk]
                    if not all_targets:
                        keep_C1 = valid_C[:, None].to(h_CD.dtype)
                        torch.mul(g_CV @ w_VD, keep_C1, out=grad_h_CD)
                        h_CD = h_CD * keep_C1
                    elif grad_h_CD.dtype == g_CV.dtype:
                        torch.mm(g_CV, w_VD, out=grad_h_CD)
                    else:  # under autocast: h's dtype
                        grad_h_CD.copy_(g_CV @ w_VD)
                    grad_w_VD = _accumulate_mm(grad_w_VD, g_CV.t(), h_CD, overwrite=start == 0)
                # Freed before the next chunk's logits exist: one `[C,V]` block at a time.
                del g_CV
        ctx.save_for_backward(grad_h_TD, grad_w_VD)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        # The gradients were computed in the forward, as values: nothing here is differentiable.
        kernels.first_order_only("chunked output head and cross-entropy")
        grad_h_TD, grad_w_VD = ctx.saved_tensors
        grad_h = grad_h_TD * grad_loss.to(grad_h_TD.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1] and ctx.deferred is not None:  # the tied embedding's backward finishes it
            ctx.deferred.put(grad_w_VD, grad_loss)
        elif ctx.needs_input_grad[1] and ctx.fused and kernels.usable(grad_w_VD):
            grad_w = kernels.scale_cast(grad_w_VD, grad_loss, ctx.w_dtype)
        elif ctx.needs_input_grad[1]:  # scaled and cast in one pass over the fp32 `[V,D]`
            grad_w = torch.mul(grad_w_VD, grad_loss, out=torch.empty_like(grad_w_VD, dtype=ctx.w_dtype))
        return grad_h, grad_w, None, None, None, None, None, None, None


def linear_cross_entropy(
    h_TD: Tensor,
    weight_VD: Tensor,
    targets_T: Tensor,
    chunk: int = 4096,
    reduction: str = "mean",
    compile_backend: str | None = None,
    fused: bool = True,
    deferred_weight_grad: DeferredHeadGrad | None = None,
    all_targets: bool = False,
    targets_checked: bool = False,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of `h_TD @ weight_VD.T` against `targets_T`, computed `chunk` tokens at a time.

    Args:
        h_TD: (T, D), hidden states of the tokens to score.
        weight_VD: (V, D), the output head (tied or not).
        targets_T: (T,), integer, IGNORE_INDEX where a token has no target, else in [0, V).
        chunk: tokens per chunk; the largest transient is a `[chunk, V]` fp32 block.
        reduction: `mean` over tokens with a target (0 when there are none, so an empty
            microbatch contributes nothing instead of NaN) or `sum`.
        compile_backend: compute each chunk's softmax gradient with `torch.compile(backend=...)`
            (one fused pass over the logits instead of several), or eagerly when None. Same result.
        fused: compute it with the in-place Triton kernel instead where `kernels.usable` (CUDA):
            two reads and one write of each chunk's logits, no fp32 `[C,V]` temporary.
        deferred_weight_grad: hand `weight_VD`'s gradient to the backward of the input embedding
            that shares it instead of returning it (`DeferredHeadGrad`); that backward must run.
        all_targets: the caller guarantees that no target is IGNORE_INDEX (it passes only tokens
            with a target): the gradient products then skip masking their `[C,D]` inputs.
        targets_checked: the caller has checked every target already (the model: `unpad` checks
            the labels against the vocabulary), so they are not checked again here.

    Returns:
        (loss, number of tokens with a target), both 0-dim tensors on the device (no sync).

    Raises:
        ValueError: for a chunk that is not a positive int, or (on the host) a target outside
            [0, V) that is not IGNORE_INDEX; on a GPU such a target is a device-side assert.
    """
    _check_reduction(reduction)
    if not is_positive_int(chunk):
        raise ValueError(f"chunk={chunk!r} must be a positive number of tokens (e.g. 4096).")
    targets_T = targets_T.long()
    if not targets_checked:
        _check_targets(targets_T, weight_VD.shape[0])
    num_targets = (targets_T != IGNORE_INDEX).sum()
    need_grad = torch.is_grad_enabled() and (h_TD.requires_grad or weight_VD.requires_grad)
    loss_sum = _ChunkedLinearCrossEntropy.apply(
        h_TD, weight_VD, targets_T, chunk, need_grad, compile_backend, fused, deferred_weight_grad, all_targets
    )
    return _reduced(loss_sum, num_targets, reduction)


def _check_targets(targets_T: Tensor, num_classes: int) -> None:
    """Raise for a target outside [0, V) that is not IGNORE_INDEX: at once on the host, as a
    device-side assert on a GPU (no sync)."""
    bad_T = bad_labels(targets_T, num_classes)
    if targets_T.device.type != "cpu":
        torch._assert_async(~bad_T.any(), f"targets outside [0, {num_classes}) that are not {IGNORE_INDEX}")
    elif bool(bad_T.any()):
        t = int(torch.nonzero(bad_T)[0])
        raise ValueError(
            f"targets_T[{t}] = {int(targets_T[t])} is neither a class in [0, {num_classes}) nor "
            f"IGNORE_INDEX ({IGNORE_INDEX})."
        )


def module_cross_entropy(
    head: torch.nn.Module, h_TD: Tensor, targets_T: Tensor, reduction: str = "mean"
) -> tuple[Tensor, Tensor]:
    """`linear_cross_entropy` for a head that must run as a module (a LoRA or quantized wrapper, a
    hooked `nn.Linear`): `head(h_TD)`'s full `[T,V]` logits, cross-entropy in fp32 as stock Llama's
    loss. Same arguments and results, without chunking."""
    _check_reduction(reduction)
    num_targets = (targets_T != IGNORE_INDEX).sum()
    loss_sum = torch.nn.functional.cross_entropy(
        head(h_TD).float(), targets_T, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return _reduced(loss_sum, num_targets, reduction)


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss reduction={reduction!r} is not supported; use 'mean' or 'sum'.")


def _reduced(loss_sum: Tensor, num_targets: Tensor, reduction: str) -> tuple[Tensor, Tensor]:
    """(loss, count): the sum, or the mean over tokens with a target (0 when there are none)."""
    if reduction == "sum":
        return loss_sum, num_targets
    return loss_sum / num_targets.clamp(min=1), num_targets
