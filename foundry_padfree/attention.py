"""Varlen causal attention behind one small interface.

Shape legend: T real tokens, N query heads, K key/value heads (N % K == 0), H head dim.

Every backend computes, for each document of `meta.cu_seqlens_N1`, causal attention of its
tokens over its own tokens only:

    attend(q_TNH, k_TKH, v_TKH, meta, scale) -> o_TNH

- `triton`: our Triton kernels (`triton_attention`), tiled for many short documents, head dims
  up to 128; CUDA, or any device under `TRITON_INTERPRET=1` (tests).
- `flash_attn`: flash-attn's `flash_attn_varlen_func` (CUDA, when installed).
- `torch_varlen`: `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA). Its signature
  changed between releases; `_torch_varlen_kwargs` reads it once.
- `flex`: `flex_attention` with a document-causal block mask built once per forward (CUDA).
- `sdpa`: the reference, `scaled_dot_product_attention` run per document. Pure PyTorch, any device.

`prepare(meta)` runs once per forward, before the first layer, for what a backend derives from the
metadata (flex's block mask, the Triton kernels' tile lists); layers then all receive the same object.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from foundry_padfree import kernels, triton_attention
from foundry_padfree.varlen import VarlenMeta


class Backend(NamedTuple):
    name: str
    attend: Callable[[Tensor, Tensor, Tensor, VarlenMeta, float], Tensor]
    # (meta, query heads per key/value head, head dim) -> meta; once per forward, see the module
    # docstring.
    prepare: Callable[[VarlenMeta, int, int], VarlenMeta] = lambda meta, group=1, head_dim=64: meta
    # `attend` from `meta.attn_extra` alone (q, k, v, attn_extra, scale), for backends whose
    # prepared metadata is all tensors: torch.compile traces it inside a layer's graph.
    traceable: Callable[[Tensor, Tensor, Tensor, object, float], Tensor] | None = None
    max_head_dim: int | None = None  # the largest head dim its kernels take (None: any)
    # `attend` taking q and k before RoPE, and the (T, H) cos/sin tables (q, k, v, cos, sin, meta,
    # scale), for a backend that rotates them itself (eager runs: the backward then needs no RoPE
    # pass of its own). None: RoPE is applied before `attend`.
    attend_rope: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, VarlenMeta, float], Tensor] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None  # the dtypes its kernels take (None: any)

    def takes(self, head_dim: int | None, dtype: torch.dtype | None = None) -> bool:
        """Whether its kernels take heads of `head_dim` in `dtype` (None: not asked)."""
        fits = head_dim is None or self.max_head_dim is None or head_dim <= self.max_head_dim
        return fits and (dtype is None or self.dtypes is None or dtype in self.dtypes)


def _repeat_kv(x_TKH: Tensor, groups: int) -> Tensor:
    return x_TKH if groups == 1 else x_TKH.repeat_interleave(groups, dim=1)


def _sdpa_attend(q_TNH: Tensor, k_TKH: Tensor, v_TKH: Tensor, meta: VarlenMeta, scale: float) -> Tensor:
    groups = q_TNH.shape[1] // k_TKH.shape[1]
    k_TNH, v_TNH = _repeat_kv(k_TKH, groups), _repeat_kv(v_TKH, groups)
    outs = []
    start = 0
    for length in meta.doc_lens:  # host-side lengths: no sync per document
        doc = slice(start, start + length)
        o_NLH = F.scaled_dot_product_attention(
            q_TNH[doc].transpose(0, 1),
            k_TNH[doc].transpose(0, 1),
            v_TNH[doc].transpose(0, 1),
            is_causal=True,
            scale=scale,
        )
        outs.append(o_NLH.transpose(0, 1))
        start += length
    return torch.cat(outs)


def _flash_attn_attend(q_TNH: Tensor, k_TKH: Tensor, v_TKH: Tensor, meta: VarlenMeta, scale: float) -> Tensor:
    from flash_attn import flash_attn_varlen_func

    cu = meta.cu_seqlens_N1
    return flash_attn_varlen_func(
        q_TNH, k_TKH, v_TKH, cu, cu, meta.max_seqlen, meta.max_seqlen, softmax_scale=scale, causal=True
    )


@functools.cache
def _torch_varlen_kwargs(gqa: bool) -> tuple[dict, bool, bool]:
    """Keyword arguments that make `varlen_attn` causal on this torch, and whether K/V must be
    repeated for GQA. torch 2.10 takes `is_causal=True`; 2.11 drops it for `window_size=(-1, 0)`
    (and takes fewer K/V heads as they are); 2.12 adds `enable_gqa`."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kwargs: dict = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    elif "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        raise RuntimeError(f"torch {torch.__version__} varlen_attn has no causal option: {list(params)}")
    repeat = False
    if gqa:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        elif "window_size" not in params:
            repeat = True
    return kwargs, repeat, "scale" in params


def _torch_varlen_attend(q_TNH: Tensor, k_TKH: Tensor, v_TKH: Tensor, meta: VarlenMeta, scale: float) -> Tensor:
    from torch.nn.attention.varlen import varlen_attn

    groups = q_TNH.shape[1] // k_TKH.shape[1]
    kwargs, repeat, takes_scale = _torch_varlen_kwargs(groups > 1)
    if repeat:
        k_TKH, v_TKH = _repeat_kv(k_TKH, groups), _repeat_kv(v_TKH, groups)
    if takes_scale:
        kwargs = {**kwargs, "scale": scale}
    elif scale != q_TNH.shape[-1] ** -0.5:
        raise ValueError(f"torch {torch.__version__} varlen_attn has no scale argument; scale={scale} unsupported.")
    cu = meta.cu_seqlens_N1
    return varlen_attn(q_TNH, k_TKH, v_TKH, cu, cu, meta.max_seqlen, meta.max_seqlen, **kwargs)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _flex_prepare(meta: VarlenMeta, group: int = 1, head_dim: int = 64) -> VarlenMeta:
    from torch.nn.attention.flex_attention import create_block_mask

    doc_T = meta.doc_ids_T()

    def document_causal(b, h, q_idx, kv_idx):
        # In a partial last block flex's kernels wrap indices modulo T before calling this
        # (`get_bounded_indices`), so doc_T is never read past its end.
        return (doc_T[q_idx] == doc_T[kv_idx]) & (q_idx >= kv_idx)

    T = meta.num_tokens
    block_mask = create_block_mask(document_causal, None, None, T, T, device=doc_T.device)
    return meta._replace(attn_extra=block_mask)


def _flex_attend(q_TNH: Tensor, k_TKH: Tensor, v_TKH: Tensor, meta: VarlenMeta, scale: float) -> Tensor:
    assert meta.attn_extra is not None, "flex backend used without prepare(meta): no block mask"
    flex = _compiled_flex() if q_TNH.is_cuda else _eager_flex()
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q_TNH, k_TKH, v_TKH))  # [1, heads, T, H]
    o_1NTH = flex(q, k, v, block_mask=meta.attn_extra, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return o_1NTH.squeeze(0).transpose(0, 1)


def _triton_prepare(meta: VarlenMeta, group: int = 1, head_dim: int = 64) -> VarlenMeta:
    device = meta.cu_seqlens_N1.device
    schedules = triton_attention.schedule(meta.doc_lens, device, group=group, head_dim=head_dim)
    return meta._replace(attn_extra=schedules)


def _triton_attend(q_TNH: Tensor, k_TKH: Tensor, v_TKH: Tensor, meta: VarlenMeta, scale: float) -> Tensor:
    _check_triton_meta(q_TNH, meta)
    return triton_attention.varlen_attention(q_TNH, k_TKH, v_TKH, meta.attn_extra, scale)


def _check_triton_meta(q_TNH: Tensor, meta: VarlenMeta) -> None:
    """The tiles were built for this batch's documents (`prepare`); the kernels write where they say."""
    assert isinstance(meta.attn_extra, triton_attention.Schedules), "triton backend used without prepare(meta)"
    if q_TNH.shape[0] != meta.indices_T.shape[0]:
        raise ValueError(
            f"q has {q_TNH.shape[0]} tokens but the varlen metadata describes {meta.indices_T.shape[0]}; "
            "pass the metadata `unpad` built for these tokens (and `backend.prepare` of it)."
        )


def _triton_attend_rope(
    q_TNH: Tensor, k_TKH: Tensor, v_TKH: Tensor, cos_TH: Tensor, sin_TH: Tensor, meta: VarlenMeta, scale: float
) -> Tensor:  # fmt: skip
    _check_triton_meta(q_TNH, meta)
    return triton_attention.varlen_attention(q_TNH, k_TKH, v_TKH, meta.attn_extra, scale, rope=(cos_TH, sin_TH))


def _eager_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


_HALF = (torch.float16, torch.bfloat16)
BACKENDS: dict[str, Backend] = {
    "triton": Backend(
        "triton",
        _triton_attend,
        _triton_prepare,
        triton_attention.varlen_attention,
        triton_attention.MAX_HEAD_DIM,
        _triton_attend_rope,
        (*_HALF, torch.float32),
    ),
    "flash_attn": Backend("flash_attn", _flash_attn_attend, max_head_dim=256, dtypes=_HALF),
    "torch_varlen": Backend("torch_varlen", _torch_varlen_attend, max_head_dim=256, dtypes=_HALF),  # FlashAttention-2
    "flex": Backend("flex", _flex_attend, _flex_prepare),
    "sdpa": Backend("sdpa", _sdpa_attend),
}


def available_backends(
    device: torch.device | str = "cuda", head_dim: int | None = None, dtype: torch.dtype | None = None
) -> list[str]:
    """Backends that can run on `device` with what is installed, best first (`auto` takes the first),
    and that take heads of `head_dim` in `dtype` (None: any)."""
    device = torch.device(device)
    names = []
    if device.type == "cuda" and torch.cuda.is_available():
        if kernels.HAS_TRITON:
            names.append("triton")  # faster than FlashAttention-2 on short-document mixes: docs/BENCHMARKS.md
        if importlib.util.find_spec("flash_attn") is not None:
            names.append("flash_attn")
        if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
            names.append("torch_varlen")
        names.append("flex")
    names.append("sdpa")
    if "flex" not in names:
        names.append("flex")  # eager flex off CUDA: slow, but it lets CPU tests check its mask
    if "triton" not in names and kernels.HAS_TRITON and kernels.INTERPRET:
        names.append("triton")  # Triton's interpreter: slow, but it lets CPU tests check the kernels
    return [name for name in names if BACKENDS[name].takes(head_dim, dtype)]


def resolve_backend(
    name: str, device: torch.device | str, head_dim: int | None = None, dtype: torch.dtype | None = None
) -> Backend:
    """The backend named by config (`auto`: the best of `available_backends(device, head_dim, dtype)`,
    `dtype` being the one attention runs in: FlashAttention's kernels take 16-bit inputs only)."""
    if name == "auto":
        return BACKENDS[available_backends(device, head_dim, dtype)[0]]
    if name not in BACKENDS:
        raise ValueError(f"attn_backend={name!r} is not a known backend; use auto or one of {sorted(BACKENDS)}.")
    if not BACKENDS[name].takes(head_dim):
        raise ValueError(
            f"attn_backend={name!r} takes head dims up to {BACKENDS[name].max_head_dim}, got {head_dim}; "
            f"use auto or one of {', '.join(available_backends(device, head_dim))}."
        )
    if name not in available_backends(device):
        raise ValueError(
            f"attn_backend={name!r} cannot run on {device} here (available: "
            f"{', '.join(available_backends(device))}); pick one of those or auto."
        )
    if not BACKENDS[name].takes(head_dim, dtype):
        raise ValueError(
            f"attn_backend={name!r} takes {'/'.join(str(d).removeprefix('torch.') for d in BACKENDS[name].dtypes)} "
            f"inputs, and attention would run in {dtype}; train in bf16 (amp_bf16, or bf16 weights), or use "
            f"auto or one of {', '.join(available_backends(device, head_dim, dtype))}."
        )
    return BACKENDS[name]
