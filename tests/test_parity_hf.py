"""The padding-free model is HF's LlamaForCausalLM, as a function, on HF-style padded batches."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.conftest import tiny_model

TOL = dict(atol=1e-5, rtol=1e-5)


def hf_twin(model) -> LlamaForCausalLM:
    """Stock HF Llama with the same config and weights (SDPA attention)."""
    hf = LlamaForCausalLM._from_config(model.config.to_llama_config(), attn_implementation="sdpa").eval()
    hf.load_state_dict(model.state_dict())
    return hf


def padded_batch(lengths: list[int], side: str, vocab: int = 97) -> tuple[torch.Tensor, ...]:
    S = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), S))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, S - n :] = 1
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    if side == "left":
        # HF shifts along the padded row, so its last pad position would "predict" the first real
        # token; that target does not exist for a document, and we never train on it.
        first = mask.argmax(-1)
        labels[torch.arange(len(lengths)), first] = -100
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, labels, positions


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_logits_and_loss_match_hf(kv_heads, side):
    model = tiny_model(num_key_value_heads=kv_heads)
    hf = hf_twin(model)
    ids, mask, labels, positions = padded_batch([11, 4, 7, 1], side)
    ours = model(ids, attention_mask=mask, position_ids=positions, labels=labels)
    ref = hf(ids, attention_mask=mask, position_ids=positions, labels=labels)
    real = mask.bool()
    torch.testing.assert_close(ours.logits[real], ref.logits[real], **TOL)
    torch.testing.assert_close(ours.loss, ref.loss, **TOL)
    assert ours.logits.shape == ref.logits.shape


def test_right_padding_without_position_ids_matches_hf():
    # Right padding: HF's default positions arange(S) are the per-document ones.
    model = tiny_model()
    hf = hf_twin(model)
    ids, mask, labels, _ = padded_batch([9, 5, 2], "right")
    ours = model(ids, attention_mask=mask, labels=labels)
    ref = hf(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(ours.logits[mask.bool()], ref.logits[mask.bool()], **TOL)
    torch.testing.assert_close(ours.loss, ref.loss, **TOL)


def test_unpadded_batch_matches_hf_and_gradients_match():
    model = tiny_model(num_key_value_heads=1)
    hf = hf_twin(model)
    ids = torch.randint(3, 97, (3, 12))
    ours = model(ids, labels=ids)
    ref = hf(ids, labels=ids)
    torch.testing.assert_close(ours.logits, ref.logits, **TOL)
    ours.loss.backward()
    ref.loss.backward()
    ref_grads = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, **TOL, msg=name)


def test_llama3_rope_scaling_and_tied_embeddings_match_hf():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # fmt: skip
    model = tiny_model(rope_scaling=scaling, tie_word_embeddings=True, rope_theta=500000.0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    hf = hf_twin(model)
    ids, mask, labels, _ = padded_batch([40, 13], "right")
    ours = model(ids, attention_mask=mask, labels=labels)
    ref = hf(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(ours.logits[mask.bool()], ref.logits[mask.bool()], **TOL)
    torch.testing.assert_close(ours.loss, ref.loss, **TOL)


def test_greedy_generate_matches_hf():
    model = tiny_model()
    hf = hf_twin(model)
    ids, mask, _, _ = padded_batch([6, 3, 5], "left")
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ours = model.generate(ids, **kwargs)
    ref = hf.generate(ids, **kwargs)
    assert ours.shape == (3, 6 + 8)
    assert torch.equal(ours, ref)
