"""The verification callbacks through Composer on a GPU (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from composer.devices import DeviceGPU

import foundry_padfree.callbacks as cb
from foundry_padfree.callbacks import PadFreeAudit, PadFreeParity
from foundry_padfree.modeling import PadFreeRotary
from tests.composer_helpers import composer_model, fit, logged, write_model_dir

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_parity_reference_holds_no_weights_between_probes(tmp_path):
    # The stock HF reference is a full fp32 copy of the model: on the GPU only while it is compared.
    parity = PadFreeParity(interval=1, strict=True)
    trainer = fit(composer_model(write_model_dir(tmp_path / "model")), [parity], batches=2, microbatch=4,
                  device=DeviceGPU())  # fmt: skip
    assert logged(trainer, "padfree/parity/passed") == [1.0, 1.0]
    # Composer's GPU default, amp_fp16, with fp32 weights: stock HF ran a second time under autocast.
    assert trainer.state.precision.value == "amp_fp16" and parity.summary["stock_logits_max_rel_diff"] > 0
    assert all(p.numel() == 0 for p in parity._reference.parameters())
    assert {b.device.type for b in parity._reference.buffers()} == {"cuda"}  # RoPE's, kept where they were used


def test_parity_under_fsdp_pure(tmp_path):
    # Composer's FSDP with mixed precision PURE (here on one rank): the forward runs in bf16
    # parameters, and FSDP casts the buffers, RoPE's inverse frequencies included, to bf16.
    # Documents of up to 2,048 tokens, where rounded frequencies turn tokens by radians; weights
    # drawn with std 0.1, so that attention is sharp enough at initialization for that to show
    # (with 0.02 it is nearly uniform, and the probe passes with rounded frequencies too).
    model_dir = write_model_dir(tmp_path / "model", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                max_position_embeddings=4096, rope_theta=500000.0, initializer_range=0.1)  # fmt: skip
    parity = PadFreeParity(interval=1, strict=True)
    fsdp = {"sharding_strategy": "FULL_SHARD", "mixed_precision": "PURE"}
    trainer = fit(composer_model(model_dir, attn_backend="auto"), [PadFreeAudit(interval=1, strict=True), parity],
                  batches=1, microbatch=2, rows=[[700, 500, 848], [1500, 548], [2048], [1024, 1024]], seq_len=2048,
                  device=DeviceGPU(), precision="amp_bf16", parallelism_config={"fsdp": fsdp})  # fmt: skip
    rotary = next(m for m in trainer.state.model.modules() if isinstance(m, PadFreeRotary))
    assert rotary.inv_freq.dtype == torch.bfloat16  # what FSDP did to the buffer
    assert logged(trainer, "padfree/parity/passed") == [1.0]
    assert 0 < parity.summary["stock_logits_max_rel_diff"]  # stock HF ran in bf16 weights


def test_parity_reference_memory_is_bounded_by_its_groups(tmp_path, monkeypatch):
    # One long document beside many short ones, with Llama 3's vocabulary: in one padded batch the
    # reference's fp32 logits would take 12 documents x 2,048 positions x 128,256 x 4 bytes
    # (12.6 GB, and HF's loss as much again); in groups of at most 4,096 positions, 2.1 GB.
    model_dir = write_model_dir(tmp_path / "model", vocab_size=128256, hidden_size=256, intermediate_size=512,
                                max_position_embeddings=2048)  # fmt: skip
    rows = [[1024] + [100] * 10, [2048]] * 2

    def peak_gib(cells: int) -> float:
        monkeypatch.setattr(cb, "_REFERENCE_CELLS", cells)
        parity = PadFreeParity(interval=1, strict=True, max_rows=2)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        trainer = fit(composer_model(model_dir, attn_backend="auto"), [parity], batches=1, microbatch=4, rows=rows,
                      seq_len=2048, device=DeviceGPU())  # fmt: skip
        assert logged(trainer, "padfree/parity/passed") == [1.0]
        assert parity.summary["documents"] == 12.0
        del trainer
        return torch.cuda.max_memory_allocated() / 2**30

    cells = cb._REFERENCE_CELLS
    whole, grouped = peak_gib(10**9), peak_gib(cells)
    print(f"peak with the reference in one padded batch {whole:.1f} GiB, in groups {grouped:.1f} GiB")
    assert grouped < whole / 2
