"""The chunked head + cross-entropy equals F.cross_entropy on full logits, values and gradients."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from foundry_padfree import loss
from foundry_padfree.loss import linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_matches_full_logits_cross_entropy(chunk):
    h = torch.randn(13, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 11, (13,))
    targets[[2, 5, 6]] = -100
    loss, count = linear_cross_entropy(h, w, targets, chunk=chunk)
    ref = F.cross_entropy(h @ w.t(), targets, ignore_index=-100)
    torch.testing.assert_close(loss, ref)
    assert int(count) == 10
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref.backward()
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast_bf16"])
def test_all_targets_skips_only_the_masking(autocast):
    # Every token has a target: the unmasked products give the masked ones' loss and gradients.
    h = torch.randn(13, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 11, (13,))
    results = []
    for all_targets in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = linear_cross_entropy(h, w, targets, chunk=5, all_targets=all_targets)
        results.append((loss, *torch.autograd.grad(loss, (h, w))))
    for masked, unmasked in zip(*results):
        assert unmasked.dtype == masked.dtype
        torch.testing.assert_close(unmasked, masked, rtol=0, atol=0)


def test_sum_reduction_and_no_targets():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(5, 8)
    targets = torch.tensor([1, 2, 3, 4])
    loss, _ = linear_cross_entropy(h, w, targets, chunk=2, reduction="sum")
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.t(), targets, reduction="sum"))
    empty, count = linear_cross_entropy(h, w, torch.full((4,), -100), chunk=2)
    assert empty.item() == 0.0 and int(count) == 0  # an empty microbatch adds nothing, not NaN
    empty.backward()
    assert torch.all(h.grad == 0)
    w.requires_grad_()  # no token at all: no chunk runs, the head's gradient is still zeros
    none, count = linear_cross_entropy(h[:0], w, targets[:0], chunk=2)
    none.backward()
    assert none.item() == 0.0 and int(count) == 0 and torch.all(w.grad == 0)


def test_unknown_reduction():
    with pytest.raises(ValueError, match=r"loss reduction='none' is not supported"):
        linear_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.zeros(2, dtype=torch.long), reduction="none")


def test_no_grad_path_skips_gradients():
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    targets = torch.randint(0, 5, (6,))
    with torch.no_grad():
        loss, _ = linear_cross_entropy(h, w, targets)
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.t(), targets))


def test_one_chunk_of_logits_at_a_time():
    # When a chunk's logits are made, no `[C,V]` tensor of an earlier chunk may still be alive:
    # the peak is one chunk's block (plus its temporaries), whatever the number of chunks.
    V = 11
    live: list[weakref.ref] = []
    alive_at_logits: list[int] = []

    class TrackRowsOfV(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else (out,):
                new_block = isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs  # not a view
                if new_block and t.dim() == 2 and t.shape[-1] == V:
                    if func is torch.ops.aten.mm.default:  # a chunk's logits
                        alive_at_logits.append(sum(r() is not None for r in live))
                    live.append(weakref.ref(t))
            return out

    h = torch.randn(13, 8, requires_grad=True)
    w = torch.randn(V, 8, requires_grad=True)
    targets = torch.randint(0, V, (13,))
    with TrackRowsOfV():
        loss, _ = linear_cross_entropy(h, w, targets, chunk=4)
    assert alive_at_logits == [0, 0, 0, 0]
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.t(), targets))


def test_an_ignored_row_does_not_bring_its_logits_into_the_loss():
    # An ignored row's clamped target (class 0) may have a logit of -inf; masking by multiplication
    # would give -inf * 0 = nan.
    logits = torch.randn(3, 7)
    logits[1, 0] = float("-inf")
    targets = torch.tensor([4, 0, 2])
    valid = torch.tensor([True, False, True])
    nll, _ = loss._nll_and_grad(logits, targets, valid, need_grad=False)
    ref = torch.nn.functional.cross_entropy(logits[valid], targets[valid], reduction="sum")
    torch.testing.assert_close(nll, ref)
