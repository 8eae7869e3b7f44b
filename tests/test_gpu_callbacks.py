"""The verification callbacks through Composer on a GPU (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from foundry_padfree.callbacks import PadFreeParity
from tests.composer_helpers import composer_model, fit, logged, write_model_dir

pytestmark = pytest.mark.gpu


def test_parity_reference_holds_no_weights_between_probes(tmp_path):
    # The stock HF reference is a full fp32 copy of the model: on the GPU only while it is compared.
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from composer.devices import DeviceGPU

    parity = PadFreeParity(interval=1, strict=True)
    trainer = fit(composer_model(write_model_dir(tmp_path / "model")), [parity], batches=2, microbatch=4,
                  device=DeviceGPU())  # fmt: skip
    assert logged(trainer, "padfree/parity/passed") == [1.0, 1.0]
    assert all(p.numel() == 0 for p in parity._reference.parameters())
    assert {b.device.type for b in parity._reference.buffers()} == {"cuda"}  # RoPE's, kept where they were used
