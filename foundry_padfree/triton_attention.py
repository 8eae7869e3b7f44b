"""Varlen causal attention in Triton, tiled for packed batches of short documents.

Shape legend: T tokens, N query heads, K key/value heads (N % K == 0, G = N // K), H head dim,
P tiles of a schedule.

FlashAttention's tiling (online softmax forward; backward in two passes that recompute the
probabilities: one per key block for dK/dV, one per query block for dQ), with four choices made
for batches of many short documents, where each document fills only a few tiles, so tile set-up and
the masked diagonal weigh more than on long sequences:

- Work is scheduled on the host, once per forward: `schedule` lists the tiles each kernel runs
  (tile start, document start, document end), longest first, from the document lengths the unpad
  step already copied to the host. No program is launched for a tile outside every document, and
  tiles start at their document's first token, so no tile straddles two documents.
- Small tiles (64 queries x 64 keys, `SHORT_DOCS`; 32 x 32 when heads are packed,
  `SHORT_DOCS_PACKED`): a document of a few hundred tokens wastes less of each tile, and only the
  blocks that cross the diagonal are masked. Batches of long documents get other tiles
  (`LONG_DOCS`, `LONG_DOCS_PACKED`).
- A dK/dV program owns one key/value head and loops over the G query heads that share it, so GQA
  needs no expanded `[T,N,H]` key gradients and no reduction afterwards.
- Query heads that share a key/value head are packed into one program (`TileSizes.pack`): the
  forward and dQ programs stack `pack` heads' rows of one token tile, the dK/dV steps `pack` heads'
  queries, so each key/value block loaded feeds `pack` times the product rows, and small token
  tiles still make large products. Row r of a packed block is token `r % BLOCK_M` of head
  `r // BLOCK_M`.

The backward runs the dQ kernel first: it also computes the softmax backward's row terms
(sum_h Out * dOut) of its rows, which the dK/dV kernel then reads, so they need no pass of their
own. Given RoPE's tables, the op takes q and k before RoPE and rotates them itself, and the two
backward kernels rotate dQ and dK back before storing them: RoPE's backward needs no pass of its own
either.

Log-sum-exps are kept in base 2 (`exp2` on scores scaled by `scale * log2(e)`), fp32, `[N,T]`.
Inputs are bf16, fp16 or fp32 (fp32 products in full precision, not TF32). With
`TRITON_INTERPRET=1` the kernels run on CPU tensors, which is how the tests check them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from foundry_padfree import kernels
from foundry_padfree.kernels import HAS_TRITON, triton

if HAS_TRITON:
    import triton.language as tl

_LOG2_E = 1.4426950408889634


class TileSizes(NamedTuple):
    """Tokens per tile, software-pipeline stages and packed heads of the three kernels. The presets
    were the fastest of sweeps on an H200 (head dim 64, 32/8 and 9/3 heads): the alpaca_eval length
    mix (`SHORT_DOCS`, and `SHORT_DOCS_PACKED` for groups of 4, 8, ... query heads per key/value
    head), and documents of 2k to 32k tokens (`LONG_DOCS`, `LONG_DOCS_PACKED`); and at head dim
    128 for wider heads (`WIDE_HEADS`). The interpreter tests shrink them."""

    fwd_m: int = 64  # query rows per forward program
    fwd_n: int = 64  # keys per forward step
    dkdv_n: int = 64  # keys per dK/dV program
    dkdv_m: int = 64  # query rows per dK/dV step
    dq_m: int = 64  # query rows per dQ program
    dq_n: int = 32  # keys per dQ step
    dkdv_stages: int = 2
    dq_stages: int = 2
    pack: int = 1  # query heads per program, at most (the largest power of two dividing G)


SHORT_DOCS = TileSizes()
# 4 heads' rows of 32-token tiles per forward and dQ program (128-row products on 32-token tiles,
# which waste less of each short document than 64-token tiles), 4 heads' 16 queries per dK/dV step.
SHORT_DOCS_PACKED = TileSizes(fwd_m=32, fwd_n=32, dkdv_m=16, dq_m=32, dkdv_stages=3, dq_stages=3, pack=4)
LONG_DOCS = TileSizes(fwd_m=128, dkdv_n=128, dkdv_m=32, dkdv_stages=3)
# Packed on long documents: 128-row forward and dQ products, 4 heads' 32 queries per dK/dV step.
LONG_DOCS_PACKED = TileSizes(fwd_m=32, dkdv_m=32, dq_m=32, dq_stages=3, pack=4)
# The presets' twins for heads wider than 64 (up to MAX_HEAD_DIM), from sweeps at head dim 128 (the
# 1B shape's 32/8 heads, as Llama-3-8B's, and 9/3): a dK/dV program's two [keys, head dim] fp32
# accumulators grow with the head dim, and fewer query rows per step keep them in registers (with 4
# packed heads' 32 queries at 128 dims, dK/dV on long documents ran 4x slower).
WIDE_HEADS = {
    SHORT_DOCS: SHORT_DOCS._replace(dkdv_m=16, dkdv_stages=3),
    SHORT_DOCS_PACKED: SHORT_DOCS_PACKED._replace(dkdv_n=128),
    LONG_DOCS: LONG_DOCS._replace(dkdv_n=64, dkdv_m=64, dkdv_stages=2),
    LONG_DOCS_PACKED: TileSizes(fwd_m=64, dkdv_m=16, dq_m=64, dq_stages=3, pack=4),
}
# The widest heads the kernels take: with these tiles, 192 and 256 need more shared memory than an
# H200 has. `auto` gives wider heads to FlashAttention's kernels (up to 256) or flex.
MAX_HEAD_DIM = 128
FWD_STAGES = 3  # software-pipeline stages of the forward kernel (every preset)
# Tokens whose documents are this long on average (sum len^2 / sum len) take the long-document tiles.
LONG_DOC_TOKENS = 2048


Rope = tuple[Tensor, Tensor] | None  # (cos, sin) tables (T, H), or none


class Schedules(NamedTuple):
    """Tile lists for the three kernels, on the device: (P, 4) int32 rows of (tile start, document
    start, document end, unused) in the token stream, longest work first. Rows are 16 bytes so that
    every list starts 16-byte aligned: Triton compiles a kernel variant per pointer alignment, and a
    list whose alignment changed from batch to batch would recompile mid-training."""

    fwd_P4: Tensor
    dkdv_P4: Tensor
    dq_P4: Tensor
    sizes: TileSizes
    # The same sizes as a host int64 tensor, for the operator below: an input of a compiled graph
    # rather than constants in it, so a batch that takes other tiles does not recompile it.
    sizes_cpu: Tensor


def _tiles(doc_lens: np.ndarray, starts: np.ndarray, block: int, queries: bool) -> np.ndarray:
    """(P, 4) int32 tiles of `block` tokens starting at each document's first token. Query tiles
    (`queries`) cost the keys before their end; key tiles the queries from their start on."""
    counts = -(-doc_lens // block)
    doc = np.repeat(np.arange(len(doc_lens)), counts)
    first_tile = np.repeat(np.cumsum(counts) - counts, counts)
    tile_start = starts[doc] + (np.arange(counts.sum()) - first_tile) * block
    doc_start, doc_end = starts[doc], starts[doc] + doc_lens[doc]
    work = np.minimum(tile_start + block, doc_end) - doc_start if queries else doc_end - tile_start
    order = np.argsort(-work, kind="stable")
    return np.stack([tile_start, doc_start, doc_end, np.zeros_like(doc_end)], axis=1)[order].astype(np.int32)


def schedule(
    doc_lens: tuple[int, ...],
    device: torch.device,
    sizes: TileSizes | None = None,
    group: int = 1,
    head_dim: int = 64,
) -> Schedules:
    """The tiles of every kernel for documents of `doc_lens` (host ints) packed back to back, for
    attention with `group` query heads per key/value head of `head_dim`.

    One host-to-device copy (no sync); built once per forward and shared by every layer. Without
    `sizes`, the tiles suit the batch: `LONG_DOCS` when its tokens sit in documents of
    `LONG_DOC_TOKENS` or more on (token-weighted) average, else `SHORT_DOCS`; their `_PACKED` twins
    when `group` is a multiple of the 4 heads they pack; their `WIDE_HEADS` twins for heads wider
    than 64."""
    lens = np.asarray(doc_lens, dtype=np.int64)
    if sizes is None:
        long_docs = (lens * lens).sum() >= LONG_DOC_TOKENS * max(1, lens.sum())
        packs = group % SHORT_DOCS_PACKED.pack == 0
        if long_docs:
            sizes = LONG_DOCS_PACKED if packs else LONG_DOCS
        else:
            sizes = SHORT_DOCS_PACKED if packs else SHORT_DOCS
        if head_dim > 64:
            sizes = WIDE_HEADS[sizes]
    starts = np.cumsum(lens) - lens
    kinds = [(sizes.fwd_m, True), (sizes.dkdv_n, False), (sizes.dq_m, True)]
    unique = list(dict.fromkeys(kinds))  # the forward and dQ tiles coincide when their sizes do
    parts = [_tiles(lens, starts, block, queries) for block, queries in unique]
    host = torch.from_numpy(np.concatenate(parts))
    if device.type == "cuda":
        host = host.pin_memory()
    all_P4 = host.to(device, non_blocking=True)
    bounds = np.cumsum([0] + [len(p) for p in parts])
    spans = {kind: slice(bounds[i], bounds[i + 1]) for i, kind in enumerate(unique)}
    # One view per kernel even where two share their tiles: torch.compile guards on whether two
    # inputs are the same object, and a batch whose tiles differ would recompile the graph.
    return Schedules(*(all_P4[spans[kind]] for kind in kinds), sizes, torch.tensor(sizes, dtype=torch.int64))


if HAS_TRITON:

    @triton.jit
    def _tile(TILES, tile):
        """(tile start, document start, document end) of row `tile` of a schedule."""
        return tl.load(TILES + tile * 4), tl.load(TILES + tile * 4 + 1), tl.load(TILES + tile * 4 + 2)

    @triton.jit
    def _program(head_programs):
        """(head program, tile) of this program in the 1-D grid of `head_programs` × tiles, all heads
        of a tile next to each other, tiles in schedule order (a grid axis other than x holds at most
        65,535 programs: a batch can have more tiles)."""
        pid = tl.program_id(0)
        return pid % head_programs, pid // head_programs

    @triton.jit
    def _load_rows(ptr, rows, head, stride_t, stride_h, offs_d, row_ok, d_ok):
        """The `[rows, BLOCK_D]` block of one head of a `(T, heads, H)` tensor, zeros where masked."""
        offsets = rows[:, None].to(tl.int64) * stride_t + head.to(tl.int64) * stride_h + offs_d[None, :]
        return tl.load(ptr + offsets, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    @triton.jit
    def _store_rows(ptr, x, rows, head, stride_t, stride_h, offs_d, row_ok, d_ok):
        offsets = rows[:, None].to(tl.int64) * stride_t + head.to(tl.int64) * stride_h + offs_d[None, :]
        tl.store(ptr + offsets, x.to(ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _load_packed(ptr, rows, heads, stride_t, stride_h, offs_d, row_ok, d_ok):
        """`_load_rows` with a head per row (`_packed_rows`)."""
        offsets = rows[:, None].to(tl.int64) * stride_t + heads[:, None].to(tl.int64) * stride_h + offs_d[None, :]
        return tl.load(ptr + offsets, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    @triton.jit
    def _store_packed(ptr, x, rows, heads, stride_t, stride_h, offs_d, row_ok, d_ok):
        offsets = rows[:, None].to(tl.int64) * stride_t + heads[:, None].to(tl.int64) * stride_h + offs_d[None, :]
        tl.store(ptr + offsets, x.to(ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _store_unrotated(
        ptr, x, offsets, COS, SIN, stride_ct, rows, row_ok, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr
    ):
        """Store `x`, the `[ROWS, HEAD_DIM]` fp32 gradient of rotated queries or keys, as the gradient
        of their input before RoPE: each row rotated back by its token's angle (the transpose of the
        rotation), in fp32 and rounded once. `offsets`: where each row starts in `ptr`; `COS`/`SIN`:
        (T, H) tables whose halves are equal (HF's `cat(f, f)`), so only the first half is read."""
        x1, x2 = tl.split(tl.permute(tl.reshape(x, [ROWS, 2, HEAD_DIM // 2]), (0, 2, 1)))
        offs_h = tl.arange(0, HEAD_DIM // 2)[None, :]
        table = rows[:, None].to(tl.int64) * stride_ct + offs_h
        c = tl.load(COS + table, mask=row_ok[:, None], other=0.0).to(tl.float32)
        s = tl.load(SIN + table, mask=row_ok[:, None], other=0.0).to(tl.float32)
        out = ptr + offsets[:, None] + offs_h
        tl.store(out, (x1 * c + x2 * s).to(ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(out + HEAD_DIM // 2, (x2 * c - x1 * s).to(ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _load_per_token(ptr, head, T, rows, row_ok):
        """Entries `rows` of head `head` (one, or one per row) of an `(N, T)` fp32 tensor (log-sum-exps,
        row terms)."""
        return tl.load(ptr + head.to(tl.int64) * T + rows, mask=row_ok, other=0.0)

    @triton.jit
    def _packed_rows(t0, n0, BLOCK_M: tl.constexpr, PACK: tl.constexpr):
        """Token and head of each row of a block packing PACK heads' BLOCK_M tokens from t0 (head n0 on)."""
        r = tl.arange(0, PACK * BLOCK_M)
        return t0 + r % BLOCK_M, n0 + r // BLOCK_M

    @triton.jit
    def _key_blocks(q0, ds, de, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """For the query tile at `q0` of the document [ds, de): the end of the keys it sees, and where
        the key blocks that need the causal mask begin (blocks that end at or before the tile's first
        query need none)."""
        return tl.minimum(q0 + BLOCK_M, de), ds + ((q0 - ds) // BLOCK_N) * BLOCK_N

    @triton.jit(do_not_specialize=["T"])  # T changes every batch: one compiled variant for all
    def _fwd_kernel(
        Q, K, V, Out, LSE, TILES,
        stride_qt, stride_qn, stride_kt, stride_kn, stride_vt, stride_vn, stride_ot, stride_on,
        T, scale_log2, head_programs,
        HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, PACK: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        head_program, tile = _program(head_programs)
        n0 = head_program * PACK
        q0, ds, de = _tile(TILES, tile)
        kh = n0 // GROUP
        offs_m, heads = _packed_rows(q0, n0, BLOCK_M, PACK)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM  # folds away when the head dim is a power of two
        m_ok = offs_m < de
        q = _load_packed(Q, offs_m, heads, stride_qt, stride_qn, offs_d, m_ok, d_ok)
        m_i = tl.full([PACK * BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([PACK * BLOCK_M], tl.float32)
        acc = tl.zeros([PACK * BLOCK_M, BLOCK_D], tl.float32)
        q_end, unmasked_end = _key_blocks(q0, ds, de, BLOCK_M, BLOCK_N)
        for start_n in range(ds, q_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < q_end
            k = _load_rows(K, offs_n, kh, stride_kt, stride_kn, offs_d, n_ok, d_ok)
            v = _load_rows(V, offs_n, kh, stride_vt, stride_vn, offs_d, n_ok, d_ok)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            if start_n >= unmasked_end:
                s = tl.where((offs_m[:, None] >= offs_n[None, :]) & n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        _store_packed(Out, acc / l_i[:, None], offs_m, heads, stride_ot, stride_on, offs_d, m_ok, d_ok)
        tl.store(LSE + heads.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=m_ok)

    @triton.jit(do_not_specialize=["T"])
    def _dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, TILES, COS, SIN,
        stride_qt, stride_qn, stride_kt, stride_kn, stride_vt, stride_vn, stride_dot, stride_don,
        stride_dkt, stride_dkn, stride_dvt, stride_dvn, stride_ct,
        T, scale_log2, scale, head_programs,
        HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, PACK: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, ROPE: tl.constexpr,
    ):  # fmt: skip
        kh, tile = _program(head_programs)
        k0, _, de = _tile(TILES, tile)
        offs_n = k0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM  # folds away when the head dim is a power of two
        n_ok = offs_n < de
        k = _load_rows(K, offs_n, kh, stride_kt, stride_kn, offs_d, n_ok, d_ok)
        v = _load_rows(V, offs_n, kh, stride_vt, stride_vn, offs_d, n_ok, d_ok)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        # Query blocks that start after this key block's last key need no causal mask.
        masked_end = k0 + BLOCK_N
        for g in range(0, GROUP, PACK):
            for start_m in range(k0, de, BLOCK_M):
                offs_m, heads = _packed_rows(start_m, kh * GROUP + g, BLOCK_M, PACK)
                m_ok = offs_m < de
                q = _load_packed(Q, offs_m, heads, stride_qt, stride_qn, offs_d, m_ok, d_ok)
                do = _load_packed(DO, offs_m, heads, stride_dot, stride_don, offs_d, m_ok, d_ok)
                lse = _load_per_token(LSE, heads, T, offs_m, m_ok)
                delta = _load_per_token(DELTA, heads, T, offs_m, m_ok)
                s_T = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2  # [keys, queries]
                if start_m < masked_end:
                    keep = (offs_m[None, :] >= offs_n[:, None]) & m_ok[None, :]
                    p_T = tl.where(keep, tl.exp2(s_T - lse[None, :]), 0.0)
                else:
                    p_T = tl.where(m_ok[None, :], tl.exp2(s_T - lse[None, :]), 0.0)
                dv += tl.dot(p_T.to(do.dtype), do, input_precision=PRECISION)
                dp_T = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                ds_T = p_T * (dp_T - delta[None, :])
                dk += tl.dot(ds_T.to(q.dtype), q, input_precision=PRECISION)
        if ROPE:  # keys were rotated by RoPE inside the op: the gradient of the unrotated keys
            dk_offsets = offs_n.to(tl.int64) * stride_dkt + kh.to(tl.int64) * stride_dkn
            _store_unrotated(DK, dk * scale, dk_offsets, COS, SIN, stride_ct, offs_n, n_ok, BLOCK_N, HEAD_DIM)
        else:
            _store_rows(DK, dk * scale, offs_n, kh, stride_dkt, stride_dkn, offs_d, n_ok, d_ok)
        _store_rows(DV, dv, offs_n, kh, stride_dvt, stride_dvn, offs_d, n_ok, d_ok)

    @triton.jit(do_not_specialize=["T"])
    def _dq_kernel(
        Q, K, V, Out, DO, LSE, DELTA, DQ, TILES, COS, SIN,
        stride_qt, stride_qn, stride_kt, stride_kn, stride_vt, stride_vn, stride_ot, stride_on, stride_dot, stride_don,
        stride_dqt, stride_dqn, stride_ct,
        T, scale_log2, scale, head_programs,
        HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, PACK: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, ROPE: tl.constexpr,
    ):  # fmt: skip
        head_program, tile = _program(head_programs)
        n0 = head_program * PACK
        q0, ds, de = _tile(TILES, tile)
        kh = n0 // GROUP
        offs_m, heads = _packed_rows(q0, n0, BLOCK_M, PACK)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM  # folds away when the head dim is a power of two
        m_ok = offs_m < de
        q = _load_packed(Q, offs_m, heads, stride_qt, stride_qn, offs_d, m_ok, d_ok)
        do = _load_packed(DO, offs_m, heads, stride_dot, stride_don, offs_d, m_ok, d_ok)
        lse = _load_per_token(LSE, heads, T, offs_m, m_ok)
        # The softmax backward's row terms, sum_h Out * dOut in fp32, from this program's rows (each
        # row of every document is one dQ program's), kept for the dK/dV kernel that runs after.
        o = _load_packed(Out, offs_m, heads, stride_ot, stride_on, offs_d, m_ok, d_ok)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + heads.to(tl.int64) * T + offs_m, delta, mask=m_ok)
        dq = tl.zeros([PACK * BLOCK_M, BLOCK_D], tl.float32)
        q_end, unmasked_end = _key_blocks(q0, ds, de, BLOCK_M, BLOCK_N)
        for start_n in range(ds, q_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < q_end
            k = _load_rows(K, offs_n, kh, stride_kt, stride_kn, offs_d, n_ok, d_ok)
            v = _load_rows(V, offs_n, kh, stride_vt, stride_vn, offs_d, n_ok, d_ok)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            if start_n >= unmasked_end:
                keep = (offs_m[:, None] >= offs_n[None, :]) & n_ok[None, :] & m_ok[:, None]
            else:
                keep = m_ok[:, None] & n_ok[None, :]
            p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds_ = p * (dp - delta[:, None])
            dq += tl.dot(ds_.to(k.dtype), k, input_precision=PRECISION)
        if ROPE:  # queries were rotated by RoPE inside the op: the gradient of the unrotated queries
            dq_offsets = offs_m.to(tl.int64) * stride_dqt + heads.to(tl.int64) * stride_dqn
            _store_unrotated(DQ, dq * scale, dq_offsets, COS, SIN, stride_ct, offs_m, m_ok, PACK * BLOCK_M, HEAD_DIM)
        else:
            _store_packed(DQ, dq * scale, offs_m, heads, stride_dqt, stride_dqn, offs_d, m_ok, d_ok)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs


def _block_d(head_dim: int) -> int:
    """Head dims pad to a power of two of at least 16 (the smallest product tile) inside the kernels."""
    return max(16, triton.next_power_of_2(head_dim))


def _unit_last_stride(x: Tensor) -> Tensor:
    """`x` as it is when its head dim is contiguous: the kernels take token and head strides, so
    q/k/v that are views into one projection or one fused buffer need no copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _warps(head_dim: int, block: int) -> int:
    return 8 if _block_d(head_dim) * block > 8192 else 4


def _pack(group: int, most: int) -> int:
    """Query heads per program: the largest power of two up to `most` that divides the group G."""
    pack = 1
    while pack * 2 <= most and group % (pack * 2) == 0:
        pack *= 2
    return pack


# (kernel, device, compile-time arguments) -> the most pipeline stages whose shared memory fits.
_STAGES_THAT_FIT: dict[tuple, int] = {}


def _launch(kernel, grid: tuple[int, ...], *args, num_stages: int, **constexprs) -> None:
    """`kernel[grid](*args, ...)` with fewer software-pipeline stages where this GPU's shared memory
    cannot hold `num_stages` of them. The presets were sized on an H200 (227 KB per block); an A100
    has 163 KB, other GPUs about 100 KB. Loading the compiled kernel fails before it runs, so a retry
    is safe; the stage count that fits is remembered per kernel, device and compile-time arguments
    (looked up only once some launch has not fit: no host work per launch otherwise)."""
    if _STAGES_THAT_FIT:
        num_stages = min(num_stages, _STAGES_THAT_FIT.get(_launch_key(kernel, args, constexprs), num_stages))
    while True:
        try:
            return kernel[grid](*args, num_stages=num_stages, **constexprs)
        except triton.runtime.errors.OutOfResources as e:
            if num_stages == 1 or "shared memory" not in str(e):
                what = "shared memory" if "shared memory" in str(e) else "resources"
                raise ValueError(
                    f"attn_backend='triton': {kernel.fn.__name__} at head dim {constexprs['HEAD_DIM']} needs more "
                    f"{what} than this GPU has ({e}); use attn_backend='torch_varlen', 'flash_attn' or 'flex'."
                ) from e
            num_stages -= 1
            _STAGES_THAT_FIT[_launch_key(kernel, args, constexprs)] = num_stages


def _launch_key(kernel, args: tuple, constexprs: dict) -> tuple:
    return (kernel.fn.__name__, args[0].device, *sorted(constexprs.items()))


def _forward(q_TNH: Tensor, k_TKH: Tensor, v_TKH: Tensor, fwd_P4: Tensor, s: TileSizes, scale: float):
    """Outputs (T, N, H) and base-2 log-sum-exps (N, T) fp32 of the forward kernel."""
    T, N, H = q_TNH.shape
    o_TNH = q_TNH.new_empty(T, N, H)
    lse_NT = torch.empty(N, T, dtype=torch.float32, device=q_TNH.device)
    if len(fwd_P4):
        pack, common = _common(q_TNH, k_TKH, s)
        _launch(
            _fwd_kernel, (N // pack * len(fwd_P4),),
            q_TNH, k_TKH, v_TKH, o_TNH, lse_NT, fwd_P4,
            *q_TNH.stride()[:2], *k_TKH.stride()[:2], *v_TKH.stride()[:2], *o_TNH.stride()[:2],
            T, scale * _LOG2_E, N // pack,
            BLOCK_M=s.fwd_m, BLOCK_N=s.fwd_n, num_warps=_warps(H, pack * s.fwd_m), num_stages=FWD_STAGES, **common,
        )  # fmt: skip
    return o_TNH, lse_NT


def _backward(
    do_TNH, q_TNH, k_TKH, v_TKH, o_TNH, lse_NT, dkdv_P4, dq_P4, s: TileSizes, scale: float, rope: Rope = None
):  # fmt: skip
    """dQ (T, N, H), dK and dV (T, K, H) from the forward's inputs, outputs and log-sum-exps. With
    `rope` (the (T, H) cos and sin tables that rotated q and k), dQ and dK are the gradients of q and
    k before the rotation."""
    do_TNH = _unit_last_stride(do_TNH)
    if q_TNH.shape[0] == 0:
        return q_TNH.new_empty(q_TNH.shape), k_TKH.new_empty(k_TKH.shape), v_TKH.new_empty(v_TKH.shape)
    dq_TNH, delta_NT = _dq(do_TNH, q_TNH, k_TKH, v_TKH, o_TNH, lse_NT, dq_P4, s, scale, rope)
    dk_TKH, dv_TKH = _dkdv(do_TNH, q_TNH, k_TKH, v_TKH, lse_NT, delta_NT, dkdv_P4, s, scale, rope)
    return dq_TNH, dk_TKH, dv_TKH


def _rope_tables(rope: Rope, like: Tensor) -> tuple[Tensor, Tensor, int]:
    """The kernels' COS, SIN and token stride of the tables; `like` stands in for both without RoPE."""
    if rope is None:
        return like, like, 0
    cos_TH, sin_TH = rope
    return cos_TH, sin_TH, cos_TH.stride(0)


def _common(q_TNH: Tensor, k_TKH: Tensor, s: TileSizes) -> tuple[int, dict]:
    """Heads packed per program, and the compile-time arguments every attention kernel shares."""
    N, H, K = q_TNH.shape[1], q_TNH.shape[2], k_TKH.shape[1]
    pack = _pack(N // K, s.pack)
    return pack, dict(HEAD_DIM=H, GROUP=N // K, PACK=pack, BLOCK_D=_block_d(H), PRECISION=_precision(q_TNH.dtype))


def _dkdv(do_TNH, q_TNH, k_TKH, v_TKH, lse_NT, delta_NT, dkdv_P4, s: TileSizes, scale: float, rope: Rope = None):
    """dK and dV (T, K, H): the dK/dV kernel alone."""
    T, _, H = q_TNH.shape
    dk_TKH, dv_TKH = k_TKH.new_empty(k_TKH.shape), v_TKH.new_empty(v_TKH.shape)
    _, common = _common(q_TNH, k_TKH, s)
    cos_TH, sin_TH, stride_ct = _rope_tables(rope, q_TNH)
    _launch(
        _dkdv_kernel, (k_TKH.shape[1] * len(dkdv_P4),),
        q_TNH, k_TKH, v_TKH, do_TNH, lse_NT, delta_NT, dk_TKH, dv_TKH, dkdv_P4, cos_TH, sin_TH,
        *q_TNH.stride()[:2], *k_TKH.stride()[:2], *v_TKH.stride()[:2], *do_TNH.stride()[:2],
        *dk_TKH.stride()[:2], *dv_TKH.stride()[:2], stride_ct, T, scale * _LOG2_E, scale, k_TKH.shape[1],
        BLOCK_M=s.dkdv_m, BLOCK_N=s.dkdv_n, num_warps=_warps(H, s.dkdv_n), num_stages=s.dkdv_stages,
        ROPE=rope is not None, **common,
    )  # fmt: skip
    return dk_TKH, dv_TKH


def _dq(do_TNH, q_TNH, k_TKH, v_TKH, o_TNH, lse_NT, dq_P4, s: TileSizes, scale: float, rope: Rope = None):
    """dQ (T, N, H) and the (N, T) fp32 row terms of the softmax backward, sum_h Out * dOut: the dQ
    kernel alone (the dK/dV kernel takes the row terms)."""
    T, N, H = q_TNH.shape
    dq_TNH = q_TNH.new_empty(q_TNH.shape)
    delta_NT = torch.empty(N, T, dtype=torch.float32, device=q_TNH.device)
    pack, common = _common(q_TNH, k_TKH, s)
    cos_TH, sin_TH, stride_ct = _rope_tables(rope, q_TNH)
    _launch(
        _dq_kernel, (N // pack * len(dq_P4),),
        q_TNH, k_TKH, v_TKH, o_TNH, do_TNH, lse_NT, delta_NT, dq_TNH, dq_P4, cos_TH, sin_TH,
        *q_TNH.stride()[:2], *k_TKH.stride()[:2], *v_TKH.stride()[:2], *o_TNH.stride()[:2], *do_TNH.stride()[:2],
        *dq_TNH.stride()[:2], stride_ct, T, scale * _LOG2_E, scale, N // pack,
        BLOCK_M=s.dq_m, BLOCK_N=s.dq_n, num_warps=_warps(H, pack * s.dq_m), num_stages=s.dq_stages,
        ROPE=rope is not None, **common,
    )  # fmt: skip
    return dq_TNH, delta_NT


class _VarlenAttention(torch.autograd.Function):
    """The eager path; under torch.compile `varlen_attention` calls the operator below instead.
    With RoPE tables, q and k come in unrotated: the forward rotates them (`kernels.rope`) and keeps
    the rotated ones, and the backward kernels rotate their dQ and dK back before storing them."""

    @staticmethod
    def forward(ctx, q_TNH, k_TKH, v_TKH, tiles: Schedules, scale: float, cos_TH=None, sin_TH=None) -> Tensor:
        rope = () if cos_TH is None else (cos_TH, sin_TH)
        if rope:
            q_TNH, k_TKH = kernels.rope(q_TNH, *rope), kernels.rope(k_TKH, *rope)
        o_TNH, lse_NT = _forward(q_TNH, k_TKH, v_TKH, tiles.fwd_P4, tiles.sizes, scale)
        ctx.save_for_backward(q_TNH, k_TKH, v_TKH, o_TNH, lse_NT, *rope)
        ctx.tiles, ctx.scale = tiles, scale
        return o_TNH

    @staticmethod
    def backward(ctx, do_TNH: Tensor):
        kernels.first_order_only("Triton attention")
        t = ctx.tiles
        q_TNH, k_TKH, v_TKH, o_TNH, lse_NT, *rope = ctx.saved_tensors
        grads = _backward(
            do_TNH, q_TNH, k_TKH, v_TKH, o_TNH, lse_NT, t.dkdv_P4, t.dq_P4, t.sizes, ctx.scale, tuple(rope) or None
        )
        return *grads, None, None, None, None


if HAS_TRITON:
    # The same kernels as operators that torch.compile traces into its graphs (it cannot trace an
    # autograd.Function holding a `Schedules`): compiled layers then need no graph break around
    # attention, which saves host work per layer, and the tile lists are ordinary graph inputs.

    @torch.library.custom_op("foundry_padfree::varlen_attention", mutates_args=())
    def _attention_op(
        q_TNH: Tensor, k_TKH: Tensor, v_TKH: Tensor, fwd_P4: Tensor, dkdv_P4: Tensor, dq_P4: Tensor,
        sizes_cpu: Tensor, scale: float,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        return _forward(q_TNH, k_TKH, v_TKH, fwd_P4, TileSizes(*sizes_cpu.tolist()), scale)

    @_attention_op.register_fake
    def _(q_TNH, k_TKH, v_TKH, fwd_P4, dkdv_P4, dq_P4, sizes_cpu, scale):
        T, N, H = q_TNH.shape
        return q_TNH.new_empty(T, N, H), q_TNH.new_empty(N, T, dtype=torch.float32)

    @torch.library.custom_op("foundry_padfree::varlen_attention_backward", mutates_args=())
    def _attention_backward_op(
        do_TNH: Tensor, q_TNH: Tensor, k_TKH: Tensor, v_TKH: Tensor, o_TNH: Tensor, lse_NT: Tensor,
        dkdv_P4: Tensor, dq_P4: Tensor, sizes_cpu: Tensor, scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        sizes = TileSizes(*sizes_cpu.tolist())
        return _backward(do_TNH, q_TNH, k_TKH, v_TKH, o_TNH, lse_NT, dkdv_P4, dq_P4, sizes, scale)

    @_attention_backward_op.register_fake
    def _(do_TNH, q_TNH, k_TKH, v_TKH, o_TNH, lse_NT, dkdv_P4, dq_P4, sizes_cpu, scale):
        return q_TNH.new_empty(q_TNH.shape), k_TKH.new_empty(k_TKH.shape), v_TKH.new_empty(v_TKH.shape)

    def _setup_context(ctx, inputs, output):
        q_TNH, k_TKH, v_TKH, _, dkdv_P4, dq_P4, sizes_cpu, scale = inputs
        ctx.save_for_backward(q_TNH, k_TKH, v_TKH, *output, dkdv_P4, dq_P4, sizes_cpu)
        ctx.scale = scale

    def _attention_op_backward(ctx, do_TNH: Tensor, _dlse):
        dq_TNH, dk_TKH, dv_TKH = _attention_backward_op(do_TNH, *ctx.saved_tensors, ctx.scale)
        return dq_TNH, dk_TKH, dv_TKH, None, None, None, None, None

    _attention_op.register_autograd(_attention_op_backward, setup_context=_setup_context)


def check_inputs(q_TNH: Tensor, k_TKH: Tensor, v_TKH: Tensor) -> None:
    """Raise for what the kernels cannot take, naming the value and the way out."""
    H = q_TNH.shape[-1]
    if H > MAX_HEAD_DIM:
        raise ValueError(
            f"attn_backend='triton' takes head dims up to {MAX_HEAD_DIM}, got {H}; use attn_backend='auto' "
            "(FlashAttention's kernels up to 256, else flex), 'torch_varlen', 'flash_attn', 'flex' or 'sdpa'."
        )
    if q_TNH.shape[1] % k_TKH.shape[1]:
        raise ValueError(
            f"{q_TNH.shape[1]} query heads are not a multiple of {k_TKH.shape[1]} key/value heads "
            "(num_attention_heads must be divisible by num_key_value_heads)."
        )
    if not (q_TNH.dtype == k_TKH.dtype == v_TKH.dtype) or q_TNH.dtype not in (
        torch.bfloat16, torch.float16, torch.float32,
    ):  # fmt: skip
        raise ValueError(
            f"attn_backend='triton' needs q, k, v of one dtype among bf16/fp16/fp32, got "
            f"{q_TNH.dtype}, {k_TKH.dtype}, {v_TKH.dtype}; cast them to one (`.to()`, or run under autocast)."
        )
    T = q_TNH.shape[0]
    if k_TKH.shape != v_TKH.shape or k_TKH.shape[0] != T or k_TKH.shape[-1] != H:
        raise ValueError(
            f"q {tuple(q_TNH.shape)}, k {tuple(k_TKH.shape)}, v {tuple(v_TKH.shape)}: k and v must be "
            "(T, K, H) for the T tokens and head dim H of q (T, N, H)."
        )


def _rope_fusable(head_dim: int) -> bool:
    """Whether the backward kernels can rotate dQ and dK back themselves (`varlen_attention`'s
    `rope`): head dims that fill their blocks exactly (powers of two from 16)."""
    return head_dim == _block_d(head_dim)


def _check_rope(q_TNH: Tensor, rope: tuple[Tensor, Tensor]) -> None:
    T, _, H = q_TNH.shape
    for name, table in zip(("cos", "sin"), rope):
        if table.shape != (T, H):
            raise ValueError(
                f"RoPE {name} table of shape {tuple(table.shape)} for {T} tokens of head dim {H}; it needs "
                f"({T}, {H}): one row per token, as the model's rotary embedding makes."
            )


def _rotate(x_TNH: Tensor, cos_TH: Tensor, sin_TH: Tensor) -> Tensor:
    """RoPE outside the attention op, for what the kernels cannot rotate back themselves: the
    model's own (the RoPE kernel where usable, else PyTorch's formula)."""
    from foundry_padfree.modeling import _apply_rope  # here: the model module imports this one

    return _apply_rope(x_TNH, cos_TH, sin_TH, fused=True)


def varlen_attention(
    q_TNH: Tensor, k_TKH: Tensor, v_TKH: Tensor, tiles: Schedules, scale: float, rope: Rope = None
) -> Tensor:  # fmt: skip
    """Causal attention of each document over its own tokens.

    Args:
        q_TNH: (T, N, H) queries; k_TKH, v_TKH: (T, K, H) keys and values; one dtype.
        tiles: `schedule(meta.doc_lens, device)` for the documents packed in T.
        scale: softmax scale (usually H ** -0.5).
        rope: optional (cos, sin) tables (T, H), halves equal (HF's layout): q and k are then taken
            before RoPE and rotated here (the tables cast to q's dtype), and in eager runs the
            backward kernels write the gradients of the unrotated q and k themselves, with no RoPE
            backward pass of its own (head dims that are powers of two; otherwise RoPE runs on
            its own first).

    Returns:
        (T, N, H) outputs in the inputs' dtype.
    """
    if rope is not None:
        _check_rope(q_TNH, rope)
        rope = tuple(t.to(q_TNH.dtype) for t in rope)  # RoPE in q's dtype, as HF's Llama applies it
        fused = _rope_fusable(q_TNH.shape[-1]) and kernels.usable(q_TNH) and q_TNH.dtype == k_TKH.dtype
        if not fused:
            q_TNH, k_TKH, rope = _rotate(q_TNH, *rope), _rotate(k_TKH, *rope), None
    check_inputs(q_TNH, k_TKH, v_TKH)
    q_TNH, k_TKH, v_TKH = (_unit_last_stride(t) for t in (q_TNH, k_TKH, v_TKH))
    if torch.compiler.is_compiling():
        o_TNH, _ = _attention_op(q_TNH, k_TKH, v_TKH, tiles.fwd_P4, tiles.dkdv_P4, tiles.dq_P4, tiles.sizes_cpu, scale)
        return o_TNH
    if rope is not None:
        return _VarlenAttention.apply(q_TNH, k_TKH, v_TKH, tiles, scale, *(t.contiguous() for t in rope))
    return _VarlenAttention.apply(q_TNH, k_TKH, v_TKH, tiles, scale)
