"""The fused Triton kernels against the PyTorch formulas they replace, on CPU through Triton's
interpreter (`tests/interpreted_kernels.py`), and the MLP recomputation against keeping the product."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from foundry_padfree.modeling import _SharedInputLinears
from tests.conftest import loss_and_grads, packed_lm_batch, tiny_model

FP32_TOL = dict(atol=2e-6, rtol=2e-6)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_kernels_under_the_triton_interpreter():
    # Triton decides at import whether kernels compile or interpret, so this runs in a new process.
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/interpreted_kernels.py"],
        cwd=root,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast_bf16"])
def test_recompute_mlp_gives_the_gradients_of_keeping_the_product(autocast):
    batch = packed_lm_batch()
    results = []
    for recompute in (False, True):
        model = tiny_model(recompute_mlp=recompute, mlp_bias=True).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            results.append(loss_and_grads(model, batch))
    (loss_keep, grads_keep), (loss_re, grads_re) = results
    # Under autocast the same bf16 ops run in the same order: bit-identical (an absolute tolerance
    # would have to exceed the MLP gradients themselves, ~5e-3 here, to allow bf16 rounding).
    tol = dict(atol=0, rtol=0) if autocast else FP32_TOL
    grad_tol = dict(atol=0, rtol=0) if autocast else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss_re, loss_keep, **tol)
    for name, g in grads_re.items():
        assert g.dtype == grads_keep[name].dtype == torch.float32, name
        torch.testing.assert_close(g, grads_keep[name], **grad_tol, msg=name)


@pytest.mark.parametrize("recompute", [False, True])
def test_compiled_layers_match_eager_with_and_without_mlp_recompute(recompute):
    # Inside torch.compile the recomputation is a checkpointed region instead of the autograd
    # Function: same loss and gradients as eager. `aot_eager` traces the same graphs as inductor.
    torch._dynamo.reset()
    batch = packed_lm_batch()
    eager_loss, eager_grads = loss_and_grads(tiny_model(recompute_mlp=recompute).train(), batch)
    compiled = tiny_model(recompute_mlp=recompute).train()
    compiled.compile_layers("aot_eager")
    loss, grads = loss_and_grads(compiled, batch)
    torch.testing.assert_close(loss, eager_loss, **FP32_TOL)
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("frozen", ["nothing", "input", "one_weight"])
def test_shared_input_linears_give_autograd_gradients(frozen):
    torch.manual_seed(0)
    x = torch.randn(13, 8, requires_grad=frozen != "input")
    weights = [torch.randn(o, 8, requires_grad=(frozen, i) != ("one_weight", 1)) for i, o in enumerate((8, 4, 4))]
    grads = [torch.randn(13, o) for o in (8, 4, 4)]
    outputs = _SharedInputLinears.apply(x, *weights)
    wanted = [t for t in (x, *weights) if t.requires_grad]
    ours = torch.autograd.grad(outputs, wanted, grads)
    reference = torch.autograd.grad([x @ w.t() for w in weights], wanted, grads)
    for a, b in zip(outputs, [x @ w.t() for w in weights]):
        torch.testing.assert_close(a, b, **FP32_TOL)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, **FP32_TOL)


@pytest.mark.parametrize(
    "case, folds",
    [("default", True), ("recompute_mlp=False", True), ("autocast_bf16", False), ("mlp_bias", False),
     ("attention_bias", False), ("gelu", False), ("fused_kernels=False", False)],
)  # fmt: skip
def test_the_eager_block_folds_its_residual_adds_only_where_it_may(case, folds, folded_layers):
    # Folded: the residual adds in the o/down products' epilogues and the residual gradient inside the
    # norms' backward. Same loss and gradients as the block's formula (fused_kernels=False, fp32).
    overrides = {"mlp_bias": dict(mlp_bias=True), "attention_bias": dict(attention_bias=True),
                 "fused_kernels=False": dict(fused_kernels=False), "gelu": dict(hidden_act="gelu"),
                 "recompute_mlp=False": dict(recompute_mlp=False)}.get(case, {})  # fmt: skip
    batch = packed_lm_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast_bf16"):
        loss, grads = loss_and_grads(tiny_model(**overrides).train(), batch)
    assert len(folded_layers) == (2 if folds else 0), case
    if folds:
        ref_loss, ref_grads = loss_and_grads(tiny_model(**overrides, fused_kernels=False).train(), batch)
        torch.testing.assert_close(loss, ref_loss, **FP32_TOL)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_block_folds_under_autocast_when_weights_are_already_in_its_dtype(folded_layers):
    # bf16 weights under bf16 autocast (FSDP's PURE mixed precision with amp_bf16): the residual
    # stream and the products share one dtype, so the block folds; results as the block's formula
    # under the same autocast, within bf16 rounding.
    batch = packed_lm_batch()
    results = []
    for fused in (True, False):
        model = tiny_model(fused_kernels=fused).to(torch.bfloat16).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(loss_and_grads(model, batch))
    assert len(folded_layers) == 2
    (loss, grads), (ref_loss, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, atol=2e-2, rtol=1e-2)
    for name, g in grads.items():
        assert g.dtype == torch.bfloat16, name
        scale = ref_grads[name].float().abs().max().item()
        assert (g.float() - ref_grads[name].float()).abs().max().item() <= 0.05 * scale + 1e-3, name
