"""Shared fixtures: tiny seeded configs and models, CPU, fp32."""

from __future__ import annotations

import pytest
import torch

from foundry_padfree import PadFreeLlamaConfig, PadFreeLlamaForCausalLM


def tiny_config(**overrides) -> PadFreeLlamaConfig:
    """A 2-layer GQA Llama small enough for CPU tests; keyword arguments override fields."""
    fields = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        attn_backend="sdpa",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return PadFreeLlamaConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> PadFreeLlamaForCausalLM:
    torch.manual_seed(seed)
    return PadFreeLlamaForCausalLM(tiny_config(**overrides)).eval()


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
