"""The Triton attention's tile schedule and input checks (plain CPU; the kernels themselves run in
`tests/interpreted_kernels.py` under Triton's interpreter and in `tests/test_gpu_kernels.py`)."""

from __future__ import annotations

import types

import pytest
import torch

from foundry_padfree import triton_attention as ta


def test_schedule_tiles_each_document_from_its_first_token_longest_work_first():
    sizes = ta.TileSizes(fwd_m=16, fwd_n=16, dkdv_n=32, dkdv_m=16, dq_m=16, dq_n=16)
    tiles = ta.schedule((5, 33, 1), torch.device("cpu"), sizes)
    # Documents [0,5), [5,38), [38,39). Query tiles cost the keys up to their end: 33, 21, 16, 5, 1.
    assert tiles.fwd_P4.tolist() == [[37, 5, 38, 0], [21, 5, 38, 0], [5, 5, 38, 0], [0, 0, 5, 0], [38, 38, 39, 0]]
    assert tiles.dq_P4.tolist() == tiles.fwd_P4.tolist()
    # Key tiles of 32 cost the queries from their start on: 33, 5, 1, 1.
    assert tiles.dkdv_P4.tolist() == [[5, 5, 38, 0], [0, 0, 5, 0], [37, 5, 38, 0], [38, 38, 39, 0]]
    assert all(t.dtype == torch.int32 for t in tiles[:3])
    # Each list starts 16-byte aligned (one compiled kernel variant whatever the batch).
    assert all(t.data_ptr() % 16 == 0 for t in tiles[:3])


@pytest.mark.parametrize("block", [16, 64])
def test_schedule_covers_every_token_once(block):
    g = torch.Generator().manual_seed(0)
    lens = tuple(int(n) for n in torch.randint(1, 300, (40,), generator=g))
    tiles = ta.schedule(lens, torch.device("cpu"), ta.TileSizes(fwd_m=block, dkdv_n=block, dq_m=block))
    covered = torch.zeros(sum(lens), dtype=torch.long)
    starts = {s: s + n for s, n in zip(torch.tensor((0, *lens)).cumsum(0).tolist(), lens)}
    for start, doc_start, doc_end, _ in tiles.fwd_P4.tolist():
        assert starts[doc_start] == doc_end and doc_start <= start < doc_end
        covered[start : min(start + block, doc_end)] += 1
    assert covered.eq(1).all()


def test_schedule_picks_long_document_tiles_from_the_length_mix():
    cpu = torch.device("cpu")
    assert ta.schedule((300, 500, 40) * 10, cpu).sizes == ta.SHORT_DOCS
    assert ta.schedule((2048,) * 4, cpu).sizes == ta.LONG_DOCS
    assert ta.schedule((8192, 50, 50), cpu).sizes == ta.LONG_DOCS  # most tokens sit in the long one


@pytest.mark.parametrize("group, packed", [(1, False), (3, False), (2, False), (6, False), (4, True), (8, True)])
def test_schedule_packs_heads_of_groups_of_four(group, packed):
    cpu = torch.device("cpu")
    short, long = (ta.SHORT_DOCS_PACKED, ta.LONG_DOCS_PACKED) if packed else (ta.SHORT_DOCS, ta.LONG_DOCS)
    assert ta.schedule((300, 500, 40) * 10, cpu, group=group).sizes == short
    assert ta.schedule((2048,) * 4, cpu, group=group).sizes == long
    for head_dim, wide in ((32, False), (64, False), (80, True), (128, True)):  # wider heads: their twins
        sizes = ta.schedule((2048,) * 4, cpu, group=group, head_dim=head_dim).sizes
        assert sizes == (ta.WIDE_HEADS[long] if wide else long)
        assert sizes.pack == long.pack


def test_every_preset_has_a_wide_head_twin_with_the_same_packing():
    presets = (ta.SHORT_DOCS, ta.SHORT_DOCS_PACKED, ta.LONG_DOCS, ta.LONG_DOCS_PACKED)
    assert set(ta.WIDE_HEADS) == set(presets)
    assert all(ta.WIDE_HEADS[p].pack == p.pack and ta.WIDE_HEADS[p] != p for p in presets)


def test_heads_per_program_is_the_largest_power_of_two_dividing_the_group():
    assert [ta._pack(g, 4) for g in (1, 2, 3, 4, 6, 7, 8, 12)] == [1, 2, 1, 4, 2, 1, 4, 4]
    assert [ta._pack(g, 1) for g in (1, 4, 8)] == [1, 1, 1]


def test_bad_inputs_name_the_value_and_the_way_out():
    q = torch.zeros(4, 2, 256)
    with pytest.raises(ValueError, match="head dims up to 128, got 256"):
        ta.check_inputs(q, q, q)
    q, k = torch.zeros(4, 3, 16), torch.zeros(4, 2, 16)
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2"):
        ta.check_inputs(q, k, k)
    q = torch.zeros(4, 2, 16)
    with pytest.raises(ValueError, match=r"one dtype.*cast them to one"):
        ta.check_inputs(q, q.half(), q)
    for k, v in ((q[:3], q[:3]), (q, q[:, :1]), (q[..., :8], q[..., :8])):  # tokens, heads, head dim
        with pytest.raises(ValueError, match=r"k and v must be \(T, K, H\)"):
            ta.check_inputs(q, k, v)


def test_the_backend_refuses_metadata_of_other_tokens():
    from foundry_padfree.attention import BACKENDS
    from foundry_padfree.varlen import unpad

    backend = BACKENDS["triton"]
    documents = torch.tensor([[0] * 5 + [1] * 9])
    meta = backend.prepare(unpad(torch.ones(1, 14, dtype=torch.long), sequence_id=documents).meta)
    q = torch.zeros(20, 2, 16)
    with pytest.raises(ValueError, match="q has 20 tokens but the varlen metadata describes 14"):
        backend.attend(q, q, q, meta, 0.25)


class _FakeKernel:
    """A launch that fails like Triton's loader where the GPU's shared memory holds `fits` stages."""

    def __init__(self, fits: int):
        self.fn, self.fits, self.stages = types.SimpleNamespace(__name__="_fake_kernel"), fits, []

    def __getitem__(self, grid):
        from triton.runtime.errors import OutOfResources

        def run(*args, num_stages: int, **constexprs):
            self.stages.append(num_stages)
            if num_stages > self.fits:
                raise OutOfResources(100_000 * num_stages, 232_448, "shared memory")

        return run


def test_a_launch_takes_fewer_stages_where_shared_memory_runs_out(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(ta, "_STAGES_THAT_FIT", {})
    x = torch.zeros(1)
    kernel = _FakeKernel(fits=1)
    ta._launch(kernel, (1, 1), x, num_stages=3, HEAD_DIM=128)
    ta._launch(kernel, (1, 1), x, num_stages=3, HEAD_DIM=128)  # remembered: straight to what fits
    assert kernel.stages == [3, 2, 1, 1]
    with pytest.raises(ValueError, match=r"_fake_kernel at head dim 128 needs more shared memory .*'torch_varlen'"):
        ta._launch(_FakeKernel(fits=0), (1, 1), x, num_stages=2, HEAD_DIM=128)
