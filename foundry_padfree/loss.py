"""Head + cross-entropy on packed tokens, chunked so `[T,V]` logits never exist at once.

Shape legend: T tokens that have a target, D hidden size, V vocabulary, C chunk of tokens.

The forward computes each chunk's logits, its loss and, when a gradient is wanted, the gradient
of the summed loss with respect to the hidden states and the head weight; only those gradients
(`[T,D]` and `[V,D]`) are kept for backward. Peak extra memory is a `[C,V]` fp32 block instead of
`[T,V]` fp32 logits (16 GiB for 32k tokens and a 128k vocabulary).
"""

from __future__ import annotations

import torch
from torch import Tensor

from foundry_padfree.varlen import IGNORE_INDEX


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TD: Tensor, w_VD: Tensor, targets_T: Tensor, chunk: int, need_grad: bool) -> Tensor:
        loss_sum = torch.zeros((), dtype=torch.float32, device=h_TD.device)
        grad_h_TD = torch.empty_like(h_TD) if need_grad else None
        grad_w_VD = torch.zeros_like(w_VD, dtype=torch.float32) if need_grad else None
        for start in range(0, h_TD.shape[0], chunk):
            h_CD = h_TD[start : start + chunk]
            t_C = targets_T[start : start + chunk]
            valid_C = t_C != IGNORE_INDEX
            t_C = t_C.clamp(min=0)
            logits_CV = (h_CD @ w_VD.t()).float()
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            picked_C = logits_CV.gather(1, t_C[:, None]).squeeze(1)
            loss_sum += ((lse_C - picked_C) * valid_C).sum()
            if need_grad:
                # d(sum of losses)/d logits = softmax - one_hot(target), zero on ignored tokens.
                g_CV = logits_CV.sub_(lse_C[:, None]).exp_()
                g_CV[torch.arange(len(t_C), device=g_CV.device), t_C] -= 1.0
                g_CV *= valid_C[:, None]
                g_CV = g_CV.to(h_CD.dtype)
                grad_h_TD[start : start + chunk] = g_CV @ w_VD.to(h_CD.dtype)
                grad_w_VD += (g_CV.t() @ h_CD).float()
        ctx.save_for_backward(grad_h_TD, grad_w_VD)
        ctx.w_dtype = w_VD.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_h_TD, grad_w_VD = ctx.saved_tensors
        grad_h = grad_h_TD * grad_loss.to(grad_h_TD.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (grad_w_VD * grad_loss).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(
    h_TD: Tensor,
    weight_VD: Tensor,
    targets_T: Tensor,
    chunk: int = 4096,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of `h_TD @ weight_VD.T` against `targets_T`, computed `chunk` tokens at a time.

    Args:
        h_TD: (T, D), hidden states of the tokens to score.
        weight_VD: (V, D), the output head (tied or not).
        targets_T: (T,), int64, IGNORE_INDEX where a token has no target.
        chunk: tokens per chunk; the largest transient is a `[chunk, V]` fp32 block.
        reduction: `mean` over tokens with a target (0 when there are none, so an empty
            microbatch contributes nothing instead of NaN) or `sum`.

    Returns:
        (loss, number of tokens with a target), both 0-dim tensors on the device (no sync).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss reduction={reduction!r} is not supported; use 'mean' or 'sum'.")
    num_targets = (targets_T != IGNORE_INDEX).sum()
    need_grad = torch.is_grad_enabled() and (h_TD.requires_grad or weight_VD.requires_grad)
    loss_sum = _ChunkedLinearCrossEntropy.apply(h_TD, weight_VD, targets_T, chunk, need_grad)
    if reduction == "sum":
        return loss_sum, num_targets
    return loss_sum / num_targets.clamp(min=1), num_targets
