"""The padding-free model is HF's LlamaForCausalLM, as a function, on HF-style padded batches."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import prune

from tests.conftest import hf_twin, tiny_model

TOL = dict(atol=1e-5, rtol=1e-5)


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
    ours.loss.backward()
    ref.loss.backward()
    assert_same_grads(model, hf)


def assert_same_grads(model, hf) -> None:
    ref_grads = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, **TOL, msg=name)


def assert_matches_hf(model, ids, mask, labels):
    """Our logits on real tokens and loss equal stock HF's (same weights) on a padded batch."""
    ours = model(ids, attention_mask=mask, labels=labels)
    ref = hf_twin(model)(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(ours.logits[mask.bool()], ref.logits[mask.bool()], **TOL)
    torch.testing.assert_close(ours.loss, ref.loss, **TOL)
    return ours


def test_rows_padded_around_their_tokens_or_on_either_side_match_hf():
    # Scoring generated text (PPO, GRPO): a prompt padded on the left, then a completion that
    # ended early, padded on the right; and rows padded on different sides in one batch.
    model = tiny_model()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    ids = torch.randint(3, 97, mask.shape).masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[torch.arange(4), mask.argmax(-1)] = -100  # stock HF would predict it from the padding before it
    assert_matches_hf(model, ids, mask, labels)


def test_one_row_of_position_ids_serves_every_row_as_in_hf():
    model = tiny_model()
    ids = torch.randint(3, 97, (3, 6))
    ours, ref = model(ids, position_ids=torch.arange(6)[None]), hf_twin(model)(ids, position_ids=torch.arange(6)[None])
    torch.testing.assert_close(ours.logits, ref.logits, **TOL)
    packed = torch.tensor([[0, 1, 2, 0, 1, 2]])  # two documents per row, in every row
    torch.testing.assert_close(
        model(ids, position_ids=packed).logits, model(ids, position_ids=packed.expand(3, 6)).logits
    )


@pytest.mark.parametrize("theta", [100.0, 500000.0])
def test_rope_theta_matches_hf(theta):
    # Llama 3's 500000 and a small base, under which positions 0..11 already turn far.
    model = tiny_model(rope_theta=theta).train()
    assert_trains_as_hf(model, hf_twin(model).train())


def test_compiled_loss_skips_ignored_labels_as_hf_does():
    # A dense batch without attention_mask sends its -100 labels into the loss's chunks, where the
    # compiled loss must leave them out as the eager one does.
    model = tiny_model().train()
    hf = hf_twin(model).train()
    model.compile_layers("aot_eager")
    ids = torch.randint(3, 97, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    ours, ref = model(ids, labels=labels), hf(ids, labels=labels)
    torch.testing.assert_close(ours.loss, ref.loss, **TOL)
    ours.loss.backward()
    ref.loss.backward()
    assert_same_grads(model, hf)


def test_right_padding_without_position_ids_matches_hf():
    # Right padding: HF's default positions arange(S) are the per-document ones.
    assert_matches_hf(tiny_model(), *padded_batch([9, 5, 2], "right")[:3])


def test_unpadded_batch_matches_hf_and_gradients_match():
    model = tiny_model(num_key_value_heads=1)
    hf = hf_twin(model)
    ids = torch.randint(3, 97, (3, 12))
    ours = model(ids, labels=ids)
    ref = hf(ids, labels=ids)
    torch.testing.assert_close(ours.logits, ref.logits, **TOL)
    ours.loss.backward()
    ref.loss.backward()
    assert_same_grads(model, hf)


ROPE_SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "linear": {"rope_type": "linear", "factor": 4.0},
    # yarn's attention_scaling is not 1: the tables are scaled, which the others do not test.
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}  # fmt: skip


@pytest.mark.parametrize("rope", sorted(ROPE_SCALINGS))
def test_rope_scaling_and_tied_embeddings_match_hf(rope):
    model = tiny_model(rope_scaling=ROPE_SCALINGS[rope], tie_word_embeddings=True, rope_theta=500000.0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_matches_hf(model, *padded_batch([40, 13], "right")[:3])


def test_dynamic_rope_is_stock_llamas_up_to_max_positions_and_refuses_beyond():
    # Dynamic NTK scaling equals the default RoPE up to max_position_embeddings; past it stock
    # Llama rescales by the batch's longest sequence, which packed documents do not define.
    model = tiny_model(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16)
    ids, mask, labels, _ = padded_batch([16, 9, 12], "right")
    assert_matches_hf(model, ids, mask, labels)
    longer = torch.randint(3, 97, (1, 17))
    for kwargs in ({}, {"labels": longer}):
        with pytest.raises(ValueError, match=r"17 tokens.*longer than max_position_embeddings \(16\)"):
            model(longer, **kwargs)
        with pytest.raises(ValueError, match=r"17 tokens.*longer than max_position_embeddings"):
            model.model(longer)
    model.model(longer[:, :16])  # up to the limit


@pytest.mark.parametrize("rope", ["default", *sorted(ROPE_SCALINGS)])
def test_rope_tables_stay_fp32_in_a_bf16_model(rope):
    # `model.to(bf16)`, or FSDP's `buffer_dtype` under Composer's `PURE` / `DEFAULT` mixed
    # precision, rounds the `inv_freq` buffer; at position 4,000 that turns a token's
    # high-frequency pairs by radians. The tables must be those of the fp32 frequencies.
    scaling = {} if rope == "default" else {"rope_scaling": ROPE_SCALINGS[rope]}
    model = tiny_model(rope_theta=500000.0, max_position_embeddings=8192, **scaling)
    positions = torch.arange(4096) * 3 % 8192
    cos, sin = model.model.rotary_emb(positions, torch.bfloat16)
    model.to(torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.bfloat16  # what the cast did
    cos_bf16, sin_bf16 = model.model.rotary_emb(positions, torch.bfloat16)
    assert torch.equal(cos_bf16, cos) and torch.equal(sin_bf16, sin)
    # Cast back (FSDP does so in eval with FSDP_USE_FULL_PREC_IN_EVAL): fp32 again, but rounded.
    model.to(torch.float32)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    cos_back, sin_back = model.model.rotary_emb(positions, torch.bfloat16)
    assert torch.equal(cos_back, cos) and torch.equal(sin_back, sin)


def test_a_model_made_under_a_device_context_keeps_its_buffers_there():
    # `with torch.device(...)` (how the benchmark builds on the GPU; meta for empty init): RoPE's
    # buffer goes where the parameters go, and its tables follow the positions, not the buffer.
    for rope_scaling in (None, *ROPE_SCALINGS.values()):  # all but the default come from HF's functions
        with torch.device("meta"):
            empty = tiny_model(rope_scaling=rope_scaling, max_position_embeddings=8192)
        assert {t.device.type for t in [*empty.parameters(), *empty.buffers()]} == {"meta"}, rope_scaling
    model = tiny_model(rope_theta=500000.0, max_position_embeddings=8192)
    positions = torch.arange(4096) * 3 % 8192
    cos, sin = model.model.rotary_emb(positions, torch.float32)
    model.model.rotary_emb.inv_freq = torch.empty_like(model.model.rotary_emb.inv_freq, device="meta")
    cos_meta, sin_meta = model.model.rotary_emb(positions, torch.float32)
    assert cos_meta.device.type == "cpu" and torch.equal(cos_meta, cos) and torch.equal(sin_meta, sin)


def test_greedy_generate_matches_hf():
    model = tiny_model()
    hf = hf_twin(model)
    ids, mask, _, _ = padded_batch([6, 3, 5], "left")
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ours = model.generate(ids, **kwargs)
    ref = hf.generate(ids, **kwargs)
    assert ours.shape == (3, 6 + 8)
    assert torch.equal(ours, ref)


def test_head_dim_other_than_hidden_over_heads_matches_hf():
    model = tiny_model(head_dim=16)  # hidden 32, 4 heads: q_proj is 32 -> 64
    assert model.model.layers[0].self_attn.q_proj.out_features == 64
    assert_matches_hf(model, *padded_batch([10, 6], "right")[:3])


def test_decoder_hidden_states_match_hf_llama_model():
    model = tiny_model()
    hf = hf_twin(model)
    ids, mask, _, _ = padded_batch([9, 4, 6], "right")
    ours = model.model(ids, attention_mask=mask).last_hidden_state
    ref = hf.model(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], **TOL)
    assert (ours[~real] == 0).all()
    assert torch.equal(model.model(ids, attention_mask=mask, return_dict=False)[0], ours)


def test_decoder_on_packed_rows_equals_each_document_alone():
    model = tiny_model()
    lens = [5, 9, 3]
    ids = torch.randint(3, 97, (1, sum(lens)))
    seq_id = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    packed = model.model(ids, sequence_id=seq_id).last_hidden_state[0]
    alone = torch.cat([model.model(doc).last_hidden_state[0] for doc in ids.split(lens, dim=1)])
    torch.testing.assert_close(packed, alone, **TOL)


def test_num_items_in_batch_matches_hf_gradient_accumulation():
    # HF Trainer passes the supervised-token count of the whole accumulation step and sums
    # each micro-batch's loss over it (it sees `**kwargs` in forward and stops dividing itself).
    model = tiny_model()
    hf = hf_twin(model)
    ids, mask, labels, _ = padded_batch([9, 4, 6], "right")
    for m in (model, hf):
        m(ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(40)).loss.backward()
    ours = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=40).loss
    ref = hf(ids, attention_mask=mask, labels=labels, num_items_in_batch=40).loss
    torch.testing.assert_close(ours, ref, **TOL)
    n = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(ours, model(ids, attention_mask=mask, labels=labels).loss * n / 40, **TOL)
    assert_same_grads(model, hf)


def test_tuple_outputs_and_logits_to_keep_match_hf():
    model = tiny_model()
    hf = hf_twin(model)
    ids, mask, labels, _ = padded_batch([7, 7], "right")
    ours = model(ids, attention_mask=mask, labels=labels, return_dict=False)
    ref = hf(ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(ours, tuple)
    torch.testing.assert_close(ours[0], ref[0], **TOL)  # loss
    torch.testing.assert_close(ours[1], ref[1], **TOL)  # logits
    # In training too, and with the config's return_dict instead of the argument.
    model.train(), hf.train()
    model.config.return_dict = hf.config.return_dict = False
    ours, ref = model(ids, attention_mask=mask, labels=labels), hf(ids, attention_mask=mask, labels=labels)
    assert isinstance(ours, tuple) and isinstance(ref, tuple)
    torch.testing.assert_close(ours[1], ref[1], **TOL)
    assert isinstance(model.model(ids, attention_mask=mask), tuple)
    model.config.return_dict = hf.config.return_dict = True
    model.eval(), hf.eval()
    for keep in (1, 3, torch.tensor([0, 4])):
        ours = model(ids, attention_mask=mask, logits_to_keep=keep).logits
        ref = hf(ids, attention_mask=mask, logits_to_keep=keep).logits
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, **TOL)


def test_generation_asks_for_the_last_logits_only():
    model = tiny_model()
    inputs = model.prepare_inputs_for_generation(torch.ones(2, 5, dtype=torch.long), logits_to_keep=1)
    assert inputs["logits_to_keep"] == 1


def test_autocast_bf16_error_is_at_most_twice_hfs():
    # Composer's amp_bf16: fp32 weights under CPU/GPU autocast. Our bf16 error against the fp32
    # result must stay within twice stock HF's own bf16 error (flash-attn's rule for its kernels).
    model = tiny_model(hidden_size=64, intermediate_size=128, num_hidden_layers=3)
    hf, hf_fp32 = hf_twin(model), hf_twin(model)
    ids, mask, labels, _ = padded_batch([30, 17, 24], "right")
    ref = hf_fp32(ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    results = []
    for m in (model, hf):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(m(ids, attention_mask=mask, labels=labels))
        results[-1].loss.backward()
    ours, theirs = results
    ref_grads, hf_grads = dict(hf_fp32.named_parameters()), dict(hf.named_parameters())
    for name, p in model.named_parameters():
        our_err = (p.grad - ref_grads[name].grad).abs().max().item()
        hf_err = (hf_grads[name].grad - ref_grads[name].grad).abs().max().item()
        assert our_err <= 2 * hf_err, f"{name}.grad: our bf16 error {our_err:.3g} > 2x HF's {hf_err:.3g}"
    real = mask.bool()
    our_err = (ours.logits[real].float() - ref.logits[real]).abs().max().item()
    hf_err = (theirs.logits[real].float() - ref.logits[real]).abs().max().item()
    assert hf_err > 0, "HF under autocast equals fp32: the test would check nothing"
    assert our_err <= 2 * hf_err, f"logits: our bf16 error {our_err:.3g} > 2x HF's {hf_err:.3g}"
    # The mean loss averages rounding errors away (both are ~1e-4 here, either may be the smaller):
    # bounded relative to the loss instead, 5x above what either shows over seeds.
    torch.testing.assert_close(ours.loss.float(), ref.loss, rtol=1e-3, atol=0)
    torch.testing.assert_close(theirs.loss.float(), ref.loss, rtol=1e-3, atol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_row_of_padding_only_is_accepted_as_hf_does(side):
    ids, mask, labels, _ = padded_batch([7, 5, 6], side)
    mask[1], labels[1] = 0, -100  # row 1: padding only
    ours = assert_matches_hf(tiny_model(), ids, mask, labels)
    assert (ours.logits[1] == 0).all()


def test_hf_trainer_evaluation_predicts_logits_only(tmp_path):
    # HF `Trainer` collects every output but the loss and the config's keys_to_ignore_at_inference as
    # predictions: the loss's token count must not become a second prediction array.
    from transformers import Trainer, TrainingArguments

    model = tiny_model()
    ids, mask, labels, _ = padded_batch([7, 5], "right")
    data = [{"input_ids": i, "attention_mask": m, "labels": lab} for i, m, lab in zip(ids, mask, labels)]
    args = TrainingArguments(str(tmp_path), per_device_eval_batch_size=2, report_to=[], use_cpu=True)
    predictions = Trainer(model=model, args=args).predict(data).predictions
    assert not isinstance(predictions, tuple) and predictions.shape == (2, 7, 97)


def test_hf_trainer_label_smoothing_shifts_the_labels_as_for_stock_llama(tmp_path):
    # `Trainer.compute_loss` shifts the labels for its label smoother only for class names in
    # transformers' causal-LM table; unshifted, it would train each token to predict itself.
    from transformers import Trainer, TrainingArguments

    model = tiny_model().train()
    hf = hf_twin(model).train()
    ids, mask, labels, _ = padded_batch([11, 6, 9], "right")
    args = TrainingArguments(str(tmp_path), label_smoothing_factor=0.1, report_to=[], use_cpu=True)
    losses = [
        Trainer(model=m, args=args).compute_loss(m, dict(input_ids=ids, attention_mask=mask, labels=labels))
        for m in (model, hf)
    ]
    torch.testing.assert_close(losses[0], losses[1], **TOL)


def test_a_decoding_loop_that_feeds_back_the_cache_is_refused():
    # Stock Llama returns a cache that the next step extends; this model keeps none, so the
    # loop's second step would score its token without the prefix. It must raise instead.
    from foundry_padfree.modeling import NoKVCache

    model = tiny_model()
    ids = torch.randint(3, 97, (1, 6))
    out = model(ids, use_cache=True)
    assert isinstance(out.past_key_values, NoKVCache)
    assert isinstance(model(ids, use_cache=True, return_dict=False)[1], NoKVCache)  # (logits, cache) as stock
    with pytest.raises(ValueError, match=r"NoKVCache\(\): this model keeps no KV cache.*whole sequence"):
        model(ids[:, -1:], past_key_values=out.past_key_values)
    assert model(ids).past_key_values is None
    generated = model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True)
    torch.testing.assert_close(generated, hf_twin(model).generate(ids, max_new_tokens=3, do_sample=False))


def test_auto_model_and_the_decoder_accessors():
    from transformers import AutoModel

    from foundry_padfree import PadFreeLlamaModel

    model = tiny_model()
    assert type(AutoModel.from_config(model.config)) is PadFreeLlamaModel
    decoder = PadFreeLlamaModel(model.config)
    model.set_decoder(decoder)
    assert model.get_decoder() is decoder is model.model


def test_num_logits_to_keep_is_renamed_as_hf_does():
    model = tiny_model()
    ids, mask, _, _ = padded_batch([5, 5], "right")
    ours = model(ids, attention_mask=mask, num_logits_to_keep=1).logits
    ref = hf_twin(model)(ids, attention_mask=mask, num_logits_to_keep=1).logits
    assert ours.shape == ref.shape == (2, 1, 97)
    torch.testing.assert_close(ours, ref, **TOL)


def test_neftune_noise_on_the_embedding_trains_as_in_hf():
    # HF Trainer's `neftune_noise_alpha` hooks the input embedding and scales its noise by the
    # output's sequence length and width: it must see stock Llama's [B,S,D] embedding output.
    from transformers.trainer_utils import neftune_post_forward_hook

    model = tiny_model().train()
    hf = hf_twin(model).train()
    ids, mask, labels, _ = padded_batch([11, 6, 9], "right")
    losses = []
    for m in (model, hf):
        m.model.embed_tokens.neftune_noise_alpha = 5.0
        m.model.embed_tokens.register_forward_hook(neftune_post_forward_hook)
        torch.manual_seed(7)  # the same noise, drawn over the same [B,S,D] tensor
        losses.append(m(ids, attention_mask=mask, labels=labels).loss)
        losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1], **TOL)
    assert_same_grads(model, hf)
    torch.manual_seed(7)
    assert not torch.allclose(losses[0], tiny_model().train()(ids, attention_mask=mask, labels=labels).loss)


def _scale_output(module, args, output):
    return output * 1.5


@pytest.mark.parametrize("fused_kernels", [True, False], ids=["fused", "unfused"])
def test_forward_hooks_on_submodules_run_as_in_hf(fused_kernels):
    # Hooks change what a module returns (steering, NEFTune); the fused block and the chunked
    # loss use weights directly only for modules that are exactly what they look like.
    model = tiny_model(fused_kernels=fused_kernels).train()
    hf = hf_twin(model).train()
    for m in (model, hf):
        for layer in m.model.layers:
            layer.self_attn.q_proj.register_forward_hook(_scale_output)
            layer.mlp.down_proj.register_forward_hook(_scale_output)
        m.model.embed_tokens.register_forward_hook(_scale_output)
        m.lm_head.register_forward_hook(_scale_output)
    assert_trains_as_hf(model, hf)


def assert_trains_as_hf(model, hf):
    """Loss and every gradient equal stock HF's on a right-padded batch."""
    ids, mask, labels, _ = padded_batch([9, 6, 3], "right")
    ours, ref = model(ids, attention_mask=mask, labels=labels), hf(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(ours.loss, ref.loss, **TOL)
    ours.loss.backward()
    ref.loss.backward()
    assert_same_grads(model, hf)


def _scale_first_output(module, args, output):
    return (output[0] * 1.5, *output[1:]) if isinstance(output, tuple) else output * 1.5


@pytest.mark.parametrize("fused_kernels", [True, False], ids=["fused", "unfused"])
def test_hooks_on_the_blocks_attention_mlp_and_norms_run_as_in_hf(fused_kernels):
    # Steering and ablation hooks sit on whole blocks' parts: the attention module (whose output
    # is a pair, as stock LlamaAttention's), the MLP and the norms; each must run and count.
    model = tiny_model(fused_kernels=fused_kernels).train()
    hf = hf_twin(model).train()
    for m in (model, hf):
        m.model.layers[0].self_attn.register_forward_hook(_scale_first_output)
        m.model.layers[0].mlp.register_forward_pre_hook(lambda module, args: (args[0] * 2.0,))
        m.model.layers[1].input_layernorm.register_forward_hook(_scale_output)
        m.model.layers[1].post_attention_layernorm.register_forward_hook(_scale_output)
    assert_trains_as_hf(model, hf)


@pytest.mark.parametrize("fused_kernels", [True, False], ids=["fused", "unfused"])
def test_global_forward_hooks_run_as_in_hf(fused_kernels):
    # `register_module_forward_hook` reaches every module, so the fused block and loss must leave
    # their shortcuts as they do for a hook on one module.
    model = tiny_model(fused_kernels=fused_kernels).train()
    hf = hf_twin(model).train()

    def scale_linears(module, args, output):
        return output * 1.5 if isinstance(module, torch.nn.Linear) else output

    handle = torch.nn.modules.module.register_module_forward_hook(scale_linears)
    try:
        assert_trains_as_hf(model, hf)
    finally:
        handle.remove()


def test_a_hooked_head_takes_the_loss_in_fp32_as_hf_does():
    # A hook on lm_head sends the loss through the module's own output: in bf16 weights its logits
    # are bf16, and HF upcasts them to fp32 before the cross-entropy.
    model = tiny_model(vocab_size=4096).to(torch.bfloat16).train()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # logits of tens: bf16's rounding of the log-sum-exp shows
    model.lm_head.register_forward_hook(lambda module, args, out: out)
    ids = torch.randint(3, 4096, (2, 16))
    out = model(ids, labels=ids)
    logits = model.lm_head(model.model(ids).last_hidden_state).float()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 4096), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss.float(), ref, atol=0, rtol=1e-5)


def test_pruned_projection_trains_as_in_hf():
    # Pruning recomputes `weight` in a forward pre-hook: the weight must be read after it ran.
    model = tiny_model().train()
    hf = hf_twin(model).train()
    for m in (model, hf):
        prune.l1_unstructured(m.model.layers[0].self_attn.q_proj, "weight", amount=0.5)
    ids, mask, labels, _ = padded_batch([9, 6], "right")
    for _ in range(2):
        ours, ref = model(ids, attention_mask=mask, labels=labels), hf(ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(ours.loss, ref.loss, **TOL)
        ours.loss.backward()
        ref.loss.backward()
