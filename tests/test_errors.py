"""Bad input raises ValueError naming the value and the fix; nothing silently wrong."""

from __future__ import annotations

import re

import pytest
import torch

from foundry_padfree import PadFreeLlamaConfig, PadFreeLlamaForCausalLM, attention, varlen
from tests.conftest import hf_twin, tiny_config, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_sequence_id_must_not_decrease(model):
    ids = torch.randint(3, 97, (2, 5))
    seq_id = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match=r"sequence_id decreases in row 1 at column 3.*non-decreasing"):
        model(ids, sequence_id=seq_id)


def test_batch_without_real_tokens(model):
    ids = torch.randint(3, 97, (2, 5))
    with pytest.raises(ValueError, match=r"no row of the batch has a real token"):
        model(ids, attention_mask=torch.zeros_like(ids))


LAYOUTS = ["dense", "sequence_id", "position_ids"]


def _one_document(how: str, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A row of one document of `n` random tokens, and the keywords that lay it out as `how` says."""
    ids = torch.randint(3, 97, (1, n))
    layout = {"dense": {}, "sequence_id": {"sequence_id": torch.zeros_like(ids)},
              "position_ids": {"position_ids": torch.arange(n)[None]}}  # fmt: skip
    return ids, layout[how]


@pytest.mark.parametrize("how", LAYOUTS)
def test_document_longer_than_position_limit(how):
    model = tiny_model(max_position_embeddings=8)
    ids, kwargs = _one_document(how, 10)
    with pytest.raises(ValueError, match=r"max_position_embeddings.*(truncate|split)"):
        model(ids, labels=ids, **kwargs)
    # Without labels (inference, generation) stock Llama runs past the limit with a warning: so do we.
    torch.testing.assert_close(model(ids, **kwargs).logits, hf_twin(model)(ids, **kwargs).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", LAYOUTS)
def test_a_document_exactly_at_the_position_limit_trains_as_hf(how):
    model = tiny_model(max_position_embeddings=8)
    ids, kwargs = _one_document(how, 8)
    torch.testing.assert_close(model(ids, labels=ids, **kwargs).loss, hf_twin(model)(ids, labels=ids).loss,
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    longer, kwargs = _one_document(how, 9)
    with pytest.raises(ValueError, match=r"max_position_embeddings"):  # one token more is refused
        model(longer, labels=longer, **kwargs)


@pytest.mark.parametrize("name", ["labels", "sequence_id", "position_ids"])
def test_float_per_token_tensors(model, name):
    ids = torch.randint(3, 97, (1, 6))
    given = {"labels": ids, "sequence_id": torch.zeros_like(ids), "position_ids": torch.arange(6)[None]}[name]
    with pytest.raises(ValueError, match=rf"{name} has dtype torch.float32.*{name}.long\(\)"):
        model(ids, **{name: given.float() + 0.7})


def test_float_input_ids(model):
    with pytest.raises(ValueError, match=r"input_ids has dtype torch.float32.*input_ids.long\(\)"):
        model(torch.ones(2, 3))


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


def test_auto_skips_kernels_that_cannot_take_the_head_dim(monkeypatch):
    """On a GPU with Triton, `auto` picks `triton`; for heads wider than its kernels take (128),
    `auto` falls back to the next backend that takes them, and naming it refuses the model."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention.kernels, "HAS_TRITON", True)
    assert attention.resolve_backend("auto", "cuda", head_dim=128).name == "triton"
    assert attention.resolve_backend("auto", "cuda", head_dim=512).name == "flex"
    assert attention.resolve_backend("auto", "cuda", head_dim=256).name != "triton"  # FlashAttention's or flex
    assert "triton" not in attention.available_backends("cuda", head_dim=512)
    too_wide = r"attn_backend='triton' takes head dims up to 128, got 512; use auto or one of flex"
    with pytest.raises(ValueError, match=too_wide):
        attention.resolve_backend("triton", "cuda", head_dim=512)
    model = tiny_model(hidden_size=1024, num_attention_heads=2, num_key_value_heads=2, attn_backend="triton")
    with pytest.raises(ValueError, match=r"takes head dims up to 128, got 512"):
        model.model.attention_backend(torch.device("cuda"))


def test_auto_skips_kernels_that_cannot_take_the_dtype(monkeypatch):
    """FlashAttention's kernels (flash_attn, torch_varlen) take 16-bit inputs only: `auto` passes
    them over when attention runs in fp32 (no autocast, fp32 weights), and naming one says what to do."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention.kernels, "HAS_TRITON", True)
    find_spec, installed = attention.importlib.util.find_spec, ("flash_attn", "torch.nn.attention.varlen")
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name, *a: object() if name in installed
                        else find_spec(name, *a))  # fmt: skip
    pick = attention.resolve_backend
    assert pick("auto", "cuda", 256, torch.bfloat16).name == "flash_attn"
    assert pick("auto", "cuda", 256, torch.float32).name == "flex"
    assert pick("auto", "cuda", 64, torch.float32).name == "triton"
    assert pick("auto", "cuda", 64, torch.float64).name == "flex"
    with pytest.raises(ValueError, match=r"'torch_varlen' takes float16/bfloat16 inputs.*run in torch.float32; "
                                         r"train in bf16.*or use auto or one of triton, flex, sdpa"):  # fmt: skip
        pick("torch_varlen", "cuda", 64, torch.float32)
    wide = tiny_model(hidden_size=512, num_attention_heads=2, num_key_value_heads=2, attn_backend="auto")  # fp32
    assert wide.model.attention_backend(torch.device("cuda")).name == "flex"
    assert wide.model.attention_backend(torch.device("cuda"), torch.bfloat16).name == "flash_attn"


def test_unknown_rope_type_is_refused():
    from foundry_padfree import PadFreeLlamaForCausalLM

    with pytest.raises(ValueError, match=r"rope_scaling type 'my_rope' is not supported.*dynamic"):
        PadFreeLlamaForCausalLM(tiny_config(rope_scaling={"rope_type": "my_rope", "factor": 2.0}))


@pytest.mark.parametrize("bad", [-1, 97])
@pytest.mark.parametrize("how", ["attention_mask", "position_ids"])
def test_label_outside_the_vocabulary(model, bad, how):
    ids = torch.randint(3, 97, (2, 5))
    labels = ids.clone()
    labels[1, 2] = bad
    kwargs = {"attention_mask": torch.ones_like(ids), "position_ids": torch.arange(5).repeat(2, 1)}[how]
    with pytest.raises(ValueError, match=rf"labels\[1, 2\] = {bad} is neither a token id in \[0, vocab_size=97\)"):
        model(ids, labels=labels, **{how: kwargs})


def test_label_outside_the_vocabulary_in_a_dense_batch(model):
    # No mask, no packing: a batch on the host is checked there (on a GPU, without a sync, by a
    # device-side assert).
    ids = torch.randint(3, 97, (2, 5))
    labels = ids.clone()
    labels[0, 4] = -5
    with pytest.raises(ValueError, match=r"labels\[0, 4\] = -5 is neither a token id in \[0, vocab_size=97\)"):
        model(ids, labels=labels)


def test_narrow_integer_dtypes(model):
    # int32 positions and int16 labels are compared in int64 (a limit past their range would wrap);
    # token ids must be what the embedding takes.
    ids = torch.randint(3, 97, (1, 6))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    expected = model(ids, position_ids=positions).logits
    torch.testing.assert_close(model(ids, position_ids=positions.int()).logits, expected)
    torch.testing.assert_close(model(ids, position_ids=positions.short()).logits, expected)
    big = tiny_model(vocab_size=40000)
    mask = torch.ones_like(ids)
    assert big(ids, attention_mask=mask, labels=ids.short()).loss.isfinite()
    with pytest.raises(ValueError, match=r"input_ids has dtype torch.uint8; token ids must be an int64 \(or int32\)"):
        model(ids.to(torch.uint8))


def test_label_outside_the_vocabulary_on_padding_is_not_read(model):
    ids = torch.randint(3, 97, (1, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    labels = ids.masked_fill(mask == 0, -1)  # never read: padding
    assert torch.isfinite(model(ids, attention_mask=mask, labels=labels).loss)


@pytest.mark.parametrize("name", ["labels", "sequence_id", "position_ids", "attention_mask"])
def test_per_token_tensor_shape_mismatch(model, name):
    ids = torch.randint(3, 97, (2, 5))
    with pytest.raises(ValueError, match=rf"{name} has shape \(2, 6\) but input_ids has \(2, 5\)"):
        model(ids, **{name: torch.zeros(2, 6, dtype=torch.long)})


def test_negative_position_ids(model):
    ids = torch.randint(3, 97, (1, 4))
    with pytest.raises(ValueError, match=r"position_ids\[0, 1\] = -1 is outside \[0, max_position_embeddings\)"):
        model(ids, position_ids=torch.tensor([[0, -1, 0, 1]]))


def test_empty_batch(model):
    with pytest.raises(ValueError, match=r"input_ids has shape \(0, 5\): a batch needs at least one row"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids has shape \(2, 0\)"):
        model(torch.zeros(2, 0, dtype=torch.long), attention_mask=torch.zeros(2, 0, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"past_key_values": ()}, r"past_key_values are not supported"),
        ({"inputs_embeds": torch.zeros(1, 4, 32)}, r"does not support inputs_embeds \(inputs_embeds: pass input_ids\)"),
        ({"output_attentions": True}, r"does not support output_attentions"),
        ({"output_hidden_states": True}, r"does not support output_hidden_states"),
        ({"token_type_ids": torch.zeros(1, 4, dtype=torch.long)}, r"does not support token_type_ids"),
        ({"cu_seq_lens_q": torch.tensor([0, 4], dtype=torch.int32)}, r"cu_seq_lens_q: pass position_ids"),
    ],
)
def test_hf_arguments_the_model_does_not_implement_are_refused(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model(torch.randint(3, 97, (1, 4)), **kwargs)


def test_inputs_embeds_alone_and_the_decoders_hf_arguments_are_refused(model):
    # Without input_ids (inputs_embeds only), and on the decoder (`model.model`), as on the LM.
    with pytest.raises(ValueError, match=r"PadFreeLlamaForCausalLM.forward does not support inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match=r"input_ids is required"):
        model()
    with pytest.raises(ValueError, match=r"PadFreeLlamaModel.forward does not support inputs_embeds"):
        model.model(inputs_embeds=torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match=r"PadFreeLlamaModel.forward does not support output_hidden_states"):
        model.model(torch.randint(3, 97, (1, 4)), output_hidden_states=True)


def test_generate_on_right_padded_prompts_names_left_padding(model):
    ids = torch.randint(3, 97, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match=r"row 1 with padding after its real tokens.*padding_side = 'left'"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_generate_on_packed_prompts_is_refused(model):
    ids = torch.randint(3, 97, (1, 6))
    with pytest.raises(ValueError, match=r"generate\(\) got sequence_id: it decodes one prompt per row"):
        model.generate(ids, sequence_id=torch.tensor([[0, 0, 0, 1, 1, 1]]), max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match=r"generate\(\) got position_ids"):
        model.generate(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]), max_new_tokens=2, do_sample=False)


def test_linear_cross_entropy_refuses_bad_targets_and_chunks():
    from foundry_padfree.loss import linear_cross_entropy

    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"targets_T\[1\] = -1 is neither a class in \[0, 10\)"):
        linear_cross_entropy(h, w, torch.tensor([3, -1, 2, -100]))
    with pytest.raises(ValueError, match=r"chunk=0 must be a positive number of tokens"):
        linear_cross_entropy(h, w, torch.tensor([3, 1, 2, -100]), chunk=0)
    loss, count = linear_cross_entropy(h, w, torch.tensor([3, 1, 2, -100], dtype=torch.int32), chunk=3)
    assert int(count) == 3
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(h[:3] @ w.t(), torch.tensor([3, 1, 2])))


@pytest.mark.parametrize("side", ["right", "left"])
def test_labels_outside_documents_are_warned_about(side, caplog, monkeypatch):
    # Stock Llama trains on labels at padding (labels=input_ids with padding) and, after left
    # padding, on the first real token from the pad position before it; here neither is a target.
    monkeypatch.setattr(varlen, "_warned", set())
    model = tiny_model()
    ids = torch.randint(3, 97, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0 if side == "left" else 1
    mask[1, 4:] = 0 if side == "right" else 1
    clean = ids.masked_fill(mask == 0, -100)
    if side == "left":
        clean[1, 2] = -100
    with caplog.at_level("WARNING", logger="foundry_padfree.varlen"):
        model(ids, attention_mask=mask, labels=clean)
        assert not caplog.records
        model(ids, attention_mask=mask, labels=ids)
        model(ids, attention_mask=mask, labels=ids)
    expected = r"labels\[1, 4\] is on padding" if side == "right" else r"labels\[1, 0\] is on padding"
    assert len(caplog.records) == 1 + (side == "left")  # once per kind; left: also the first real token's
    assert any(re.search(expected, r.getMessage()) for r in caplog.records)


def test_hf_arguments_that_change_nothing_are_accepted(model):
    ids = torch.randint(3, 97, (1, 6))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    ref = model(ids, position_ids=positions).logits
    flash = dict(cu_seq_lens_q=torch.tensor([0, 3, 6], dtype=torch.int32), max_length_q=3)
    unset = dict(output_attentions=False, output_hidden_states=None, inputs_embeds=None, cache_position=torch.arange(6))
    torch.testing.assert_close(model(ids, position_ids=positions, **flash, **unset).logits, ref)


def test_num_items_in_batch_with_a_summed_loss_is_refused(model):
    ids = torch.randint(3, 97, (1, 4))
    with pytest.raises(ValueError, match=r"num_items_in_batch=3 with loss_reduction='sum'"):
        model(ids, labels=ids, num_items_in_batch=3, loss_reduction="sum")


def test_bad_config_values():
    with pytest.raises(ValueError, match=r"attention_dropout=0.1 is not supported.*attention_dropout=0.0"):
        tiny_config(attention_dropout=0.1)
    with pytest.raises(ValueError, match=r"num_key_value_heads=0 must be a positive int"):
        tiny_config(num_key_value_heads=0)
    with pytest.raises(ValueError, match=r"loss_chunk_size=True must be a positive int"):
        tiny_config(loss_chunk_size=True)


def test_config_overrides_of_from_pretrained_are_checked(tmp_path):
    # HF sets `from_pretrained`'s keyword overrides on the config after the config's own check.
    tiny_model().save_pretrained(tmp_path)
    for override, match in (({"attention_dropout": 0.1}, r"attention_dropout=0.1 is not supported"),
                            ({"loss_chunk_size": 0}, r"loss_chunk_size=0 must be a positive int")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            PadFreeLlamaForCausalLM.from_pretrained(tmp_path, **override)


@pytest.mark.parametrize("name", ["output_attentions", "output_hidden_states"])
def test_config_output_flags_are_refused_as_the_arguments_are(name):
    # HF reads these config fields as the forward arguments' defaults; an explicit False still runs.
    model = tiny_model()
    setattr(model.config, name, True)
    ids = torch.randint(3, 97, (1, 4))
    with pytest.raises(ValueError, match=rf"does not support config\.{name} \(config\.{name}: set it to False"):
        model(ids)
    assert model(ids, **{name: False}).logits.shape == (1, 4, 97)
