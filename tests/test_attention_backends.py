"""The CUDA-only backends' calls, checked on CPU against stand-ins with each library's signature.

`torch_varlen` and `flash_attn` run only on a GPU (and `torch.nn.attention.varlen` only from torch
2.10), so on CPU the test replaces each library function by a stand-in that has the real one's
signature for one release and computes attention per document with SDPA, honouring exactly the
arguments it is given: causal or not, GQA only where that release supports it, the scale. Our
backend must then equal the reference backend. This checks what the backend passes (the causal
option of each torch release, cu_seqlens, max_seqlen, scale, GQA handling), not the kernels,
which `test_gpu_kernels.py` runs on the GPU.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from foundry_padfree import attention
from foundry_padfree.varlen import unpad


def _reference(q, k, v, cu_q, cu_k, max_q, max_k, *, causal: bool, scale, gqa: bool):
    """Attention per document of `cu_q`/`cu_k`, by SDPA; refuses fewer K/V heads unless `gqa`."""
    assert cu_q.dtype == cu_k.dtype == torch.int32 and torch.equal(cu_q, cu_k)
    lens = cu_q.diff().tolist()
    assert max_q == max_k == max(lens), (max_q, max_k, lens)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        assert gqa, f"{k.shape[1]} K/V heads for {q.shape[1]} query heads on a release without GQA"
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        o = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=causal, scale=scale
        )
        out.append(o.transpose(0, 1))
    return torch.cat(out)


def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
    return _reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=is_causal, scale=None, gqa=False)


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):  # fmt: skip
    assert window_size in ((-1, -1), (-1, 0)), window_size
    causal = window_size == (-1, 0)
    return _reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=causal, scale=scale, gqa=True)


def varlen_attn_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False):  # fmt: skip
    causal = window_size == (-1, 0)
    return _reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=causal, scale=scale, gqa=enable_gqa)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, **kwargs):  # fmt: skip
    assert dropout_p == 0.0
    return _reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                      scale=softmax_scale, gqa=True)  # fmt: skip


def _inputs(kv_heads: int):
    lens = [5, 1, 9, 4]
    positions = torch.cat([torch.arange(n) for n in lens])[None]
    meta = unpad(torch.zeros_like(positions), position_ids=positions).meta
    T = sum(lens)
    q = torch.randn(T, 4, 8)
    k, v = torch.randn(T, kv_heads, 8), torch.randn(T, kv_heads, 8)
    return q, k, v, meta


@pytest.fixture
def fake_module(monkeypatch):
    def install(name: str, **functions) -> None:
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**functions))
        attention._torch_varlen_kwargs.cache_clear()

    yield install
    attention._torch_varlen_kwargs.cache_clear()


RELEASES = {"2.10": varlen_attn_2_10, "2.11": varlen_attn_2_11, "2.12": varlen_attn_2_12}


@pytest.mark.parametrize("release", list(RELEASES.values()), ids=list(RELEASES))
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("scale", [None, 0.1], ids=["default_scale", "scale"])
def test_torch_varlen_passes_each_release_what_it_needs(fake_module, release, kv_heads, scale):
    fake_module("torch.nn.attention.varlen", varlen_attn=release)
    q, k, v, meta = _inputs(kv_heads)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if release is varlen_attn_2_10 and scale != q.shape[-1] ** -0.5:
        with pytest.raises(ValueError, match=r"varlen_attn has no scale argument"):
            attention._torch_varlen_attend(q, k, v, meta, scale)
        return
    out = attention._torch_varlen_attend(q, k, v, meta, scale)
    torch.testing.assert_close(out, attention._sdpa_attend(q, k, v, meta, scale), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa"])
def test_flash_attn_call_matches_the_reference(fake_module, kv_heads):
    fake_module("flash_attn", flash_attn_varlen_func=flash_attn_varlen_func)
    q, k, v, meta = _inputs(kv_heads)
    out = attention._flash_attn_attend(q, k, v, meta, 0.2)
    torch.testing.assert_close(out, attention._sdpa_attend(q, k, v, meta, 0.2), atol=1e-6, rtol=1e-6)
