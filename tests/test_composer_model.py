"""`padfree_causal_lm`: built from a stock Llama directory, FSDP-ready, honest FLOPs, fail-fast options."""

from __future__ import annotations

import pytest
import torch
from llmfoundry.metrics import LanguageCrossEntropy
from llmfoundry.registry import models
from transformers import LlamaForCausalLM

from foundry_padfree import PadFreeLlamaConfig, PadFreeLlamaForCausalLM, training_flops
from foundry_padfree.composer_model import ComposerPadFreeCausalLM, document_lengths
from foundry_padfree.modeling import PadFreeDecoderLayer, PadFreeRMSNorm
from tests.composer_helpers import ROWS, collate, composer_model, fit, packed_batch, packed_row, write_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("tiny_llama"))


def test_registered_under_its_own_name():
    assert models.get("padfree_causal_lm") is ComposerPadFreeCausalLM
    assert models.get("hf_causal_lm") is not ComposerPadFreeCausalLM


def test_stock_llama_dir_becomes_our_config_with_the_options(model_dir):
    model = composer_model(model_dir, attn_backend="flex", config_overrides={"loss_chunk_size": 7})
    assert isinstance(model.model, PadFreeLlamaForCausalLM)
    assert isinstance(model.config, PadFreeLlamaConfig)
    assert (model.config.attn_backend, model.config.loss_chunk_size) == ("flex", 7)
    assert model.config.use_cache is False


def test_pretrained_loads_the_stock_weights(tmp_path):
    stock = LlamaForCausalLM(PadFreeLlamaConfig(**_tiny_fields()).to_llama_config())
    stock.save_pretrained(tmp_path)
    model = ComposerPadFreeCausalLM(tokenizer=None, pretrained_model_name_or_path=str(tmp_path), attn_backend="sdpa")
    for name, p in stock.named_parameters():
        assert torch.equal(model.model.get_parameter(name), p), name


def test_fsdp_wraps_and_checkpoints_exactly_the_decoder_layers(model_dir):
    inner = composer_model(model_dir).model
    chosen = [m for m in inner.modules() if inner.fsdp_wrap_fn(m)]
    assert chosen == list(inner.model.layers)
    assert all(isinstance(m, PadFreeDecoderLayer) for m in chosen)
    assert [m for m in inner.modules() if inner.activation_checkpointing_fn(m)] == chosen


def test_activation_checkpointing_the_chosen_layers_keeps_loss_and_gradients(model_dir):
    # What Composer does to an FSDP model with `activation_checkpointing: true`: wrap every module
    # `activation_checkpointing_fn` picks in torch's non-reentrant checkpoint wrapper. The wrapped
    # layers still get the one metadata object and must give the same loss and gradients.
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        CheckpointWrapper,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    plain, wrapped = composer_model(model_dir).model.train(), composer_model(model_dir).model.train()
    apply_activation_checkpointing(
        wrapped,
        checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=wrapped.activation_checkpointing_fn,
    )
    checkpointed = [m for m in wrapped.modules() if isinstance(m, CheckpointWrapper)]
    assert len(checkpointed) == wrapped.config.num_hidden_layers
    assert all(isinstance(m._checkpoint_wrapped_module, PadFreeDecoderLayer) for m in checkpointed)
    batch = packed_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "sequence_id", "labels")}
    loss_plain, loss_wrapped = plain(**inputs).loss, wrapped(**inputs).loss
    loss_plain.backward()
    loss_wrapped.backward()
    torch.testing.assert_close(loss_wrapped, loss_plain, rtol=0, atol=0)
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in wrapped.named_parameters()}
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_meta_init_then_param_init_fn_initializes_our_norms(model_dir):
    inner = composer_model(model_dir, init_device="meta").model
    assert all(p.is_meta for p in inner.parameters())
    # What FSDP does with a meta model: allocate, then call param_init_fn on every module.
    inner.to_empty(device="cpu")
    for module in inner.modules():
        inner.param_init_fn(module)
    norms = [m for m in inner.modules() if isinstance(m, PadFreeRMSNorm)]
    assert len(norms) == 2 * inner.config.num_hidden_layers + 1
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in norms)
    std = inner.config.initializer_range
    q = inner.model.layers[0].self_attn.q_proj.weight
    assert abs(float(q.std()) - std) < 0.3 * std
    assert all(torch.isfinite(p).all() for p in inner.parameters())
    # RoPE's frequencies, a buffer `to_empty` left uninitialized, are recomputed too.
    rotary = inner.model.rotary_emb
    torch.testing.assert_close(rotary.inv_freq, rotary.fp32_inv_freq()[0], rtol=0, atol=0)


def test_forward_hands_sequence_id_to_the_model(model_dir):
    model = composer_model(model_dir).eval()
    batch = packed_batch()
    expected = model.model(batch["input_ids"], sequence_id=batch["sequence_id"], labels=batch["labels"])
    out = model(batch)
    torch.testing.assert_close(out.loss, expected.loss, atol=0, rtol=0)
    # Without sequence_id the rows would be single documents: a different loss.
    cross = model({k: v for k, v in batch.items() if k != "sequence_id"})
    assert not torch.allclose(out.loss, cross.loss)
    torch.testing.assert_close(model.loss(out, batch), out.loss, atol=0, rtol=0)  # our collators' counts


@pytest.mark.parametrize(
    ("options", "builds_logits"),
    [({}, False), ({"use_train_metrics": True}, True), ({"loss_on_real_tokens_only": False}, True)],
)
def test_training_forward_builds_padded_logits_only_when_needed(model_dir, options, builds_logits):
    model = composer_model(model_dir, **options).train()
    batch = packed_batch()
    out = model(batch)
    assert out.loss is not None and out.loss.requires_grad
    assert (out.logits is not None) == builds_logits
    if builds_logits:
        assert out.logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)


@pytest.mark.parametrize("documents_by", ["sequence_id", "position_ids"])
def test_eval_metric_equals_the_training_loss_on_packed_rows(model_dir, documents_by):
    # Composer shifts labels along the row for metrics; ours must not score across documents.
    # LLM-Foundry's own collators keep the label at document starts: the shift would score the
    # last token of each document on the next document's first token. HF's padding-free layout
    # marks documents by position_ids alone.
    model = composer_model(model_dir).eval()
    batch = packed_batch()
    batch["labels"] = batch["input_ids"].masked_fill(batch["sequence_id"] < 0, -100)
    if documents_by == "position_ids":
        seq_id = batch.pop("sequence_id")
        starts = torch.ones_like(seq_id, dtype=torch.bool)
        starts[:, 1:] = seq_id[:, 1:] != seq_id[:, :-1]
        col = torch.arange(seq_id.shape[1]).expand_as(seq_id)
        # position = column - column of the document's first token (a running max of start columns)
        batch["position_ids"] = col - torch.cummax(torch.where(starts, col, 0), dim=1).values
    labels = batch["labels"].clone()
    with torch.no_grad():
        loss = model(batch).loss
        eval_batch = dict(batch)
        logits = model.eval_forward(eval_batch)
    assert "labels" not in eval_batch and torch.equal(batch["labels"], labels)
    metric = LanguageCrossEntropy()
    model.update_metric(eval_batch, logits, metric)
    torch.testing.assert_close(metric.compute(), loss, atol=1e-6, rtol=1e-6)


def test_flops_count_real_tokens_only(model_dir):
    model = composer_model(model_dir)
    batch = packed_batch()
    doc_lens = [n for row in ROWS[:4] for n in row]
    assert document_lengths(batch) == tuple(doc_lens)
    n_params = sum(p.numel() for p in model.parameters()) - model.model.model.embed_tokens.weight.numel()
    assert model.num_flop_params == n_params
    flops = model.flops_per_batch(batch)
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    assert flops == 6 * n_params * sum(doc_lens) + 12 * L * d * sum(n * n for n in doc_lens)
    assert flops == training_flops(model.config, n_params, doc_lens)
    # Twice the padding, same work.
    wider = {k: torch.nn.functional.pad(v, (0, 16), value=v.min().item() if k != "input_ids" else 0)
             for k, v in batch.items() if isinstance(v, torch.Tensor)}  # fmt: skip
    wider["attention_mask"][:, 16:] = 0
    wider["sequence_id"][:, 16:] = -1
    assert model.flops_per_batch(wider) == flops


def test_tied_embeddings_count_once(tmp_path):
    model = composer_model(write_model_dir(tmp_path, tie_word_embeddings=True))
    assert model.num_flop_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"attn_bakend": "sdpa"}, r"attn_bakend: did you mean 'attn_backend'\?"),
        ({"loss_on_real_tokens": True}, r"did you mean 'loss_on_real_tokens_only'\?"),
        ({"attn_implementation": "flash_attention_2"}, r"attn_implementation: the padding-free model picks"),
        (
            {"attn_backend": "flash"},
            r"attn_backend='flash' is not a known backend; use one of auto, triton, flash_attn",
        ),
        ({"attn_backend": "flash_attn"}, r"attn_backend='flash_attn' cannot run on cpu here"),
        ({"config_overrides": {"num_hiden_layers": 1}}, r'config does not have attribute "num_hiden_layers"'),
        ({"config_overrides": {"loss_chunk_size": 0}}, r"loss_chunk_size=0 must be a positive int"),
        ({"init_device": "gpu"}, r"init_device='gpu' is not supported; use one of cpu, meta, mixed"),
        ({"additional_train_metrics": ["TokenAccuracy"]}, r"computed only with use_train_metrics: true"),
        ({"peft_config": {"peft_type": "LORA", "r": 8}}, r"peft_config: LoRA/PEFT is not supported"),
        ({"load_in_8bit": True}, r"load_in_8bit: 8-bit loading is not supported"),
        ({"compile_layers": "indcutor"}, r"compile_layers='indcutor': use true \(inductor\), false, or the name"),
        ({"use_train_metrics": "false"}, r"use_train_metrics='false' must be true or false \(unquoted in YAML\)"),
        ({"loss_on_real_tokens_only": "no"}, r"loss_on_real_tokens_only='no' must be true or false"),
    ],
)
def test_bad_options_fail_at_build_time_with_the_fix(model_dir, options, message):
    with pytest.raises(ValueError, match=message):
        composer_model(model_dir, **options)


def test_unsupported_hf_causal_lm_options_at_values_that_ask_for_nothing_are_accepted(model_dir):
    # An hf_causal_lm YAML switched to padfree_causal_lm may spell out these options' off values.
    off = dict(peft_config=None, load_in_8bit=False, use_flash_attention_2=False, should_save_peft_only=True)
    assert composer_model(model_dir, **off).model.config.attn_backend == "sdpa"


def test_non_llama_config_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"holds a 'gpt2' config; padfree_causal_lm trains Llama"):
        composer_model(tmp_path)


def _tiny_fields() -> dict:
    return dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip


def test_token_weighted_microbatches_add_up_with_llmfoundry_text_counts(model_dir):
    # LLM-Foundry's `text` collator keeps the label at document starts and counts it in
    # `loss_generating_tokens`, which Composer weighs microbatches by; the model never trains on
    # those targets. Weighted by that count, one-row microbatches must add up to the whole batch.
    model = composer_model(model_dir).train()
    batch = packed_batch()
    batch["labels"] = batch["input_ids"].masked_fill(batch["sequence_id"] < 0, -100)
    batch["loss_generating_tokens"] = [int((row[1:] != -100).sum()) for row in batch["labels"]]
    whole = model.loss(model(batch), batch)
    rows = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(len(batch["total_tokens"]))]
    total = sum(batch["loss_generating_tokens"])
    parts = sum(model.loss(model(mb), mb) * sum(mb["loss_generating_tokens"]) / total for mb in rows)
    torch.testing.assert_close(parts, whole)


def test_padding_only_logits_have_the_vocabulary_size_whatever_the_head_shard(model_dir, monkeypatch):
    # After FSDP's forward (use_orig_params) the head's weight is this rank's flat shard.
    from types import SimpleNamespace

    model = composer_model(model_dir).eval()
    batch = collate([packed_row([], seed) for seed in (0, 1)])
    monkeypatch.setattr(model.model, "get_output_embeddings", lambda: SimpleNamespace(weight=torch.zeros(7)))
    assert model(batch).logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)


def test_compile_layers_option_compiles_the_layers_and_trains_as_eager(model_dir):
    torch._dynamo.reset()
    batch = packed_batch()
    results = []
    for compile_layers in (False, "aot_eager"):
        model = composer_model(model_dir, compile_layers=compile_layers)
        assert model.model.model.compile_backend == (compile_layers or None)
        loss = model.loss(model(batch), batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (c_loss, c_grads) = results
    torch.testing.assert_close(c_loss, loss, atol=1e-6, rtol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(c_grads[name], g, atol=1e-6, rtol=1e-5, msg=name)
    assert composer_model(model_dir, compile_layers=True).model.model.compile_backend == "inductor"


def test_compile_layers_with_the_trainers_compile_config_is_refused(model_dir):
    # compile_config compiles the whole forward around the compiled layers; the first forward says so.
    torch._dynamo.reset()
    model = composer_model(model_dir, compile_layers="aot_eager")
    with pytest.raises(ValueError, match=r"model.compile_layers and the trainer's compile_config both compile"):
        fit(model, [], batches=1, compile_config={"backend": "aot_eager"})
