"""Shared fixtures: tiny seeded configs and models, CPU, fp32."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

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


def hf_twin(model) -> LlamaForCausalLM:
    """Stock HF Llama with the same config and weights (SDPA attention)."""
    hf = LlamaForCausalLM._from_config(model.config.to_llama_config(), attn_implementation="sdpa").eval()
    hf.load_state_dict(model.state_dict())
    return hf


def packed_lm_batch() -> dict[str, torch.Tensor]:
    """One packed row of 4 documents (5, 9, 1, 14 tokens) with `position_ids` and labels, the
    first 3 tokens unsupervised."""
    lens = [5, 9, 1, 14]
    positions = torch.cat([torch.arange(n) for n in lens])[None]
    ids = torch.randint(3, 97, positions.shape)
    labels = ids.clone()
    labels[0, :3] = -100
    return dict(input_ids=ids, position_ids=positions, labels=labels)


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's loss on `batch` and every parameter's gradient of it."""
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def folded_layers(monkeypatch) -> list[int]:
    """A list that gets one entry per call of `modeling._folded_layer` (the eager block with its
    residual adds folded in), which still runs as before."""
    from foundry_padfree import modeling

    calls: list[int] = []
    folded = modeling._folded_layer
    monkeypatch.setattr(modeling, "_folded_layer", lambda *a: calls.append(1) or folded(*a))
    return calls


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
