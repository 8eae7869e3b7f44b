"""Bad input raises ValueError naming the value and the fix; nothing silently wrong."""

from __future__ import annotations

import pytest
import torch

from foundry_padfree import PadFreeLlamaConfig
from tests.conftest import tiny_config, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_sequence_id_must_not_decrease(model):
    ids = torch.randint(3, 97, (2, 5))
    seq_id = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match=r"sequence_id decreases in row 1 at column 3.*non-decreasing"):
        model(ids, sequence_id=seq_id)


def test_labels_shape_mismatch(model):
    ids = torch.randint(3, 97, (2, 5))
    with pytest.raises(ValueError, match=r"labels has shape \(2, 4\) but input_ids has \(2, 5\)"):
        model(ids, labels=ids[:, :4])


def test_row_without_real_tokens(model):
    ids = torch.randint(3, 97, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"row 1 of the batch has no real tokens.*drop empty rows"):
        model(ids, attention_mask=mask)


@pytest.mark.parametrize("how", ["dense", "sequence_id", "position_ids"])
def test_document_longer_than_position_limit(how):
    model = tiny_model(max_position_embeddings=8)
    ids = torch.randint(3, 97, (1, 10))
    kwargs = {
        "dense": {},
        "sequence_id": {"sequence_id": torch.zeros_like(ids)},
        "position_ids": {"position_ids": torch.arange(10)[None]},
    }[how]
    with pytest.raises(ValueError, match=r"max_position_embeddings.*(truncate|split)"):
        model(ids, **kwargs)


def test_float_input_ids(model):
    with pytest.raises(ValueError, match=r"input_ids has dtype torch.float32.*input_ids.long\(\)"):
        model(torch.ones(2, 3))


def test_mixed_left_and_right_padding(model):
    ids = torch.randint(3, 97, (2, 4))
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"mixed left/right padding: row 1 is left-padded and row 0 is right-padded"):
        model(ids, attention_mask=mask)


def test_padding_in_the_middle_of_a_row(model):
    ids = torch.randint(3, 97, (1, 5))
    with pytest.raises(ValueError, match=r"row 0 has padding between real tokens"):
        model(ids, attention_mask=torch.tensor([[1, 0, 1, 1, 1]]))


def test_unknown_backend_and_bad_config():
    with pytest.raises(ValueError, match=r"attn_backend='flash' is not a known backend"):
        tiny_config(attn_backend="flash")
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\) must divide num_attention_heads \(4\)"):
        tiny_config(num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"loss_chunk_size=0"):
        PadFreeLlamaConfig(loss_chunk_size=0)


def test_backend_unavailable_on_this_device():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU answer")
    model = tiny_model(attn_backend="torch_varlen")
    with pytest.raises(ValueError, match=r"attn_backend='torch_varlen' cannot run on cpu.*available: sdpa, flex"):
        model(torch.randint(3, 97, (1, 4)))


def test_dynamic_rope_is_refused():
    from foundry_padfree import PadFreeLlamaForCausalLM

    with pytest.raises(ValueError, match=r"rope_scaling type 'dynamic' is not supported"):
        PadFreeLlamaForCausalLM(tiny_config(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
