"""The verification callbacks on a tiny Composer Trainer (CPU): they pass on real padding-free
training, fail on broken training, cost nothing off-interval and never change what is trained."""

from __future__ import annotations

import math
import types

import pytest
import torch
from composer.core import Precision
from llmfoundry.registry import callbacks

import foundry_padfree.callbacks as cb
import foundry_padfree.modeling as modeling
from foundry_padfree.attention import BACKENDS, Backend
from foundry_padfree.callbacks import (
    PadFreeAudit,
    PadFreeCheckError,
    PadFreeIsolation,
    PadFreeParity,
    PadFreeStats,
    read_batch,
)
from foundry_padfree.varlen import unpad
from tests.composer_helpers import (
    ROWS,
    SEQ_LEN,
    VOCAB,
    collate,
    composer_model,
    fit,
    leaky_attend,
    logged,
    packed_batch,
    packed_row,
    within_rows_attend,
    write_model_dir,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("tiny_llama"))


def all_callbacks(interval: int = 1, strict: bool = True) -> list:
    return [
        PadFreeAudit(interval=interval, strict=strict),
        PadFreeIsolation(interval=interval, strict=strict),
        PadFreeParity(interval=interval, strict=strict),
        PadFreeStats(interval=interval),
    ]


def test_registered_by_name():
    for name, cls in [("padfree_audit", PadFreeAudit), ("padfree_isolation", PadFreeIsolation),
                      ("padfree_parity", PadFreeParity), ("padfree_stats", PadFreeStats)]:  # fmt: skip
        assert callbacks.get(name) is cls


def test_all_pass_on_padfree_training_with_microbatches(model_dir):
    callbacks = all_callbacks()
    audit = callbacks[0]
    trainer = fit(composer_model(model_dir), callbacks, batches=2, microbatch=2)
    # 2 batches x 2 microbatches: every training forward was audited, and each batch passed.
    assert logged(trainer, "padfree/audit/passed") == [1.0] * 2
    assert logged(trainer, "padfree/audit/checks_failed") == [0.0] * 2
    assert logged(trainer, "padfree/audit/forwards_audited") == [2.0, 4.0]
    assert audit.summary["forwards_audited"] == 4 and isinstance(audit.summary["forwards_audited"], int)
    assert logged(trainer, "padfree/audit/unpad_calls") == [1.0] * 2
    assert logged(trainer, "padfree/audit/varlen_layers") == [2.0] * 2
    assert logged(trainer, "padfree/audit/embedding_padded") == [0.0] * 2
    # Batch 1 is rows 0-3: documents [5, 3, 7], [4, 6], [16], [2, 2, 2, 9].
    assert logged(trainer, "padfree/audit/real_tokens")[0] == 56.0
    assert logged(trainer, "padfree/audit/documents")[0] == 10.0
    # The first document of row 0 (the busiest row of batch 1) was perturbed; nothing else moved.
    assert logged(trainer, "padfree/isolation/max_abs_diff_other_docs") == [0.0, 0.0]
    assert min(logged(trainer, "padfree/isolation/max_abs_diff_perturbed_doc")) > 0
    assert logged(trainer, "padfree/isolation/same_row_documents_compared") == [3.0, 2.0]
    assert max(logged(trainer, "padfree/parity/loss_abs_diff")) < 1e-5
    assert max(logged(trainer, "padfree/parity/logits_max_rel_diff")) < 1e-5
    assert logged(trainer, "padfree/parity/documents") == [7.0, 5.0]  # rows 3+0, then rows 6+4
    # The stock HF reference got each probe's current weights and holds none between probes.
    parity = next(c for c in trainer.state.callbacks if isinstance(c, PadFreeParity))
    assert all(p.numel() == 0 for p in parity._reference.parameters())


def test_isolation_says_when_no_row_was_packed(model_dir, caplog):
    # One document per row: isolation passes (documents of other rows are compared) but the probe
    # could not test the packed case, and says so once.
    with caplog.at_level("WARNING", logger="foundry_padfree.callbacks"):
        probe = PadFreeIsolation(interval=1, strict=True)
        trainer = fit(composer_model(model_dir), [probe], rows=[[14], [12], [9], [16]] * 2)
    assert logged(trainer, "padfree/isolation/same_row_documents_compared") == [0.0, 0.0]
    assert logged(trainer, "padfree/isolation/documents_compared") == [1.0, 1.0]
    assert sum("no row of the probed batch holds two documents" in r.message for r in caplog.records) == 1


def test_probes_run_on_the_training_device(model_dir, monkeypatch):
    # At BATCH_END Composer's state.batch can still be on the host; the wrapped model would move its
    # inputs itself, the stock HF reference of padfree_parity would not. Probes go through the
    # trainer's device, as batches do.
    from composer.devices import DeviceCPU

    moved = []
    original = DeviceCPU.batch_to_device
    monkeypatch.setattr(DeviceCPU, "batch_to_device", lambda self, b: moved.append(b) or original(self, b))
    fit(composer_model(model_dir), [PadFreeIsolation(), PadFreeParity()], batches=1, microbatch=4)
    probe_rows = [b["input_ids"].shape[0] for b in moved if isinstance(b, dict) and "input_ids" in b]
    assert probe_rows.count(2) == 2, probe_rows  # the 4-row batch, then the 2-row probe of each callback


def test_stats_are_the_batch_arithmetic(model_dir):
    trainer = fit(composer_model(model_dir), [PadFreeStats(interval=1)], batches=1)
    lens = [n for row in ROWS[:4] for n in row]  # 4 rows of 16 columns
    T, N = sum(lens), len(lens)
    assert logged(trainer, "padfree/stats/real_tokens") == [T]
    assert logged(trainer, "padfree/stats/real_token_fraction") == [T / 64]
    assert logged(trainer, "padfree/stats/pad_positions_skipped") == [64 - T]
    assert logged(trainer, "padfree/stats/padded_batch_pad_fraction") == [pytest.approx(1 - T / (N * 16))]
    assert logged(trainer, "padfree/stats/documents_per_row") == [N / 4]
    assert logged(trainer, "padfree/stats/max_seqlen") == [16.0]
    assert logged(trainer, "padfree/stats/real_tokens_per_sec")[0] > 0
    assert "padfree/stats/mfu" not in trainer.logger.destinations[0].data  # no GPU peak on CPU


def test_stats_leave_the_audit_and_probes_out_of_the_batch_time(model_dir, monkeypatch):
    # A clock of the callbacks' own: 1 ms per reading, and 100 s inside the audit's check of a
    # forward, the parity probe and each reading of the batch (audit, isolation, parity; stats
    # reads it after its own clock stopped). The batch's time must come out without those 500 s.
    clock = types.SimpleNamespace(now=0.0)

    def perf_counter():
        clock.now += 1e-3
        return clock.now

    def slow(fn):
        return lambda *a: setattr(clock, "now", clock.now + 100.0) or fn(*a)

    monkeypatch.setattr(cb, "time", types.SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(cb, "_check_forward", slow(cb._check_forward))
    monkeypatch.setattr(PadFreeParity, "_compare", slow(PadFreeParity._compare))
    monkeypatch.setattr(cb, "read_batch", slow(cb.read_batch))
    trainer = fit(composer_model(model_dir), all_callbacks(), batches=1, microbatch=4)
    seconds = logged(trainer, "padfree/stats/real_tokens")[0] / logged(trainer, "padfree/stats/real_tokens_per_sec")[0]
    assert 0 < seconds < 1.0, seconds


def test_callbacks_change_nothing_that_is_trained(model_dir):
    plain = fit(composer_model(model_dir), [], batches=2)
    rng_plain = torch.get_rng_state()
    checked = fit(composer_model(model_dir), all_callbacks(), batches=2)
    assert torch.equal(torch.get_rng_state(), rng_plain)
    assert logged(checked, "loss/train/total") == logged(plain, "loss/train/total")
    for (name, p), q in zip(plain.state.model.named_parameters(), checked.state.model.parameters()):
        assert torch.equal(p, q), name
    assert checked.state.model.training
    # No hook or wrapper is left behind.
    assert modeling.unpad is unpad
    assert all(not m._forward_pre_hooks for m in checked.state.model.modules())


def test_off_interval_batches_cost_nothing(model_dir, monkeypatch):
    reads = []
    monkeypatch.setattr(cb, "read_batch", lambda batch: reads.append(1) or read_batch(batch))
    trainer = fit(composer_model(model_dir), all_callbacks(interval=5), batches=2, microbatch=4)
    # Only batch 0 is due: one audited forward, one read by each of the other three callbacks.
    assert logged(trainer, "padfree/audit/forwards_audited") == [1.0]
    assert len(logged(trainer, "padfree/isolation/passed")) == len(logged(trainer, "padfree/parity/passed")) == 1
    assert len(logged(trainer, "padfree/stats/real_tokens")) == 1
    assert len(reads) == 4


def test_audit_fails_when_layers_get_rebuilt_metadata(model_dir):
    # The anti-pattern the project removes: metadata re-derived per layer (new cu_seqlens each time).
    model = composer_model(model_dir)
    for layer in model.model.model.layers:
        layer.register_forward_pre_hook(
            lambda mod, args: (args[0], args[1]._replace(cu_seqlens_N1=args[1].cu_seqlens_N1.clone()), *args[2:])
        )
    with pytest.raises(PadFreeCheckError, match=r"layer 0 attended with different varlen metadata"):
        fit(model, [PadFreeAudit(interval=1, strict=True)], batches=1)


def test_audit_fails_on_a_second_unpad(model_dir):
    model = composer_model(model_dir)
    decoder = model.model.model
    forward_tokens = decoder.forward_tokens

    def unpads_again(ids_T, meta, *args):
        modeling.unpad(ids_T[None])
        return forward_tokens(ids_T, meta, *args)

    decoder.forward_tokens = unpads_again
    with pytest.raises(PadFreeCheckError, match=r"the forward unpadded 2 times; it must unpad exactly once"):
        fit(model, [PadFreeAudit(interval=1, strict=True)], batches=1)


@pytest.mark.parametrize(
    ("hooked", "message"),
    [
        (False, r"the embedding's \[T\] token ids are not the batch's real tokens"),
        (True, r"the hooked embedding's \[B, S\] token ids are not the batch's at its real tokens"),
    ],
    ids=["plain", "hooked"],
)
def test_audit_fails_when_the_embedding_gets_other_ids(model_dir, monkeypatch, hooked, message):
    # An unpad that gathered the wrong ids (here: the right ones, reversed) gives the embedding
    # [T] ids of the right shape (a hooked one: [B,S] ids with the wrong tokens at real
    # positions); the audit compares them with the batch's real tokens.
    unpad = modeling.unpad

    def unpad_reversed(*args, **kwargs):
        out = unpad(*args, **kwargs)
        return out._replace(input_ids_T=out.input_ids_T.flip(0))

    monkeypatch.setattr(modeling, "unpad", unpad_reversed)
    model = composer_model(model_dir)
    if hooked:
        model.model.model.embed_tokens.register_forward_hook(lambda module, args, out: out)
    with pytest.raises(PadFreeCheckError, match=message):
        fit(model, [PadFreeAudit(interval=1, strict=True)], batches=1)


def test_audit_reports_a_hooked_embedding_computing_on_padded_ids(model_dir, caplog):
    # HF Trainer's NEFTune hook scales its noise by the shape, so the model gives a hooked embedding
    # stock Llama's [B,S] ids on purpose: a supported set-up, reported (not failed, even in strict
    # mode) with what the embedding really computed on, instead of claiming [T].
    from transformers.trainer_utils import neftune_post_forward_hook

    model = composer_model(model_dir)
    embed = model.model.model.embed_tokens
    embed.neftune_noise_alpha = 5.0
    embed.register_forward_hook(neftune_post_forward_hook)
    seen = []
    embed.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    audit = PadFreeAudit(interval=1, strict=True)
    with caplog.at_level("WARNING", logger="foundry_padfree.callbacks"):
        trainer = fit(model, [audit], batches=2, microbatch=2)
    assert seen[:2] == [(2, SEQ_LEN)] * 2  # what the embedding computed on
    assert logged(trainer, "padfree/audit/embedding_padded") == [1.0, 1.0]
    assert logged(trainer, "padfree/audit/passed") == [1.0, 1.0]
    assert logged(trainer, "padfree/audit/varlen_layers") == [2.0, 2.0]  # the layers still ran on [T]
    assert (
        "(nn.Embedding with 2 forward hook(s)) computed on stock Llama's re-padded [B, S] ids"
        in (audit.summary["embedding_note"])
    )
    assert sum("re-padded [B, S] ids" in r.message for r in caplog.records) == 1  # once per run
    assert len(embed._forward_hooks) == 1 and len(embed._forward_pre_hooks) == 1  # the audit's hook is gone


def test_audit_logs_each_batch_once_over_its_microbatches(model_dir):
    # Loggers keep one value per key and step: the batch's totals, not its last microbatch's.
    trainer = fit(composer_model(model_dir), [PadFreeAudit(interval=1), PadFreeStats(interval=1)], batches=2)
    assert logged(trainer, "padfree/audit/real_tokens") == logged(trainer, "padfree/stats/real_tokens") == [56, 50]
    assert logged(trainer, "padfree/audit/documents") == [10.0, 8.0]  # rows 0-3, then rows 4-7
    assert logged(trainer, "padfree/audit/forwards_audited") == [2.0, 4.0]


def test_audit_logs_the_worst_forward_of_a_batch(model_dir):
    # Only the second microbatch's forward unpads twice and re-derives layer 1's metadata: the
    # batch's unpad_calls and varlen_layers are that forward's, and it fails.
    model = composer_model(model_dir)
    decoder = model.model.model
    forward_tokens = decoder.forward_tokens
    calls = []

    def second_is_wrong(ids_T, meta, *args):
        calls.append(1)
        if len(calls) == 2:
            modeling.unpad(ids_T[None])
        return forward_tokens(ids_T, meta, *args)

    def new_metadata(module, args):
        if len(calls) == 2:
            return (args[0], args[1]._replace(cu_seqlens_N1=args[1].cu_seqlens_N1.clone()), *args[2:])
        return None

    decoder.forward_tokens = second_is_wrong
    decoder.layers[1].register_forward_pre_hook(new_metadata)
    trainer = fit(model, [PadFreeAudit(interval=1)], batches=1, microbatch=2)
    assert logged(trainer, "padfree/audit/unpad_calls") == [2.0]
    assert logged(trainer, "padfree/audit/varlen_layers") == [1.0]
    assert logged(trainer, "padfree/audit/passed") == [0.0]
    assert cb._worst([1, 0, 2], 1) == 2 and cb._worst([2, 1, 3], 2) == 3 and cb._worst([2, 2], 2) == 2


def _unpad_with_meta(monkeypatch, change) -> None:
    """`modeling.unpad` whose metadata is passed through `change` (a wrong but well-formed one)."""
    unpad = modeling.unpad

    def changed(*args, **kwargs):
        out = unpad(*args, **kwargs)
        return out._replace(meta=change(out.meta))

    monkeypatch.setattr(modeling, "unpad", changed)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m._replace(position_ids_T=torch.arange(m.num_tokens)), r"RoPE positions differ"),
        (lambda m: m._replace(max_seqlen=m.max_seqlen + 1), r"max_seqlen = \d+, longest document = \d+"),
        # The first two documents as one: the same tokens, other boundaries.
        (lambda m: m._replace(doc_lens=(m.doc_lens[0] + m.doc_lens[1], *m.doc_lens[2:])),
         r"the model saw documents of lengths"),
    ],
    ids=["positions", "max_seqlen", "doc_lens"],
)  # fmt: skip
def test_audit_fails_on_metadata_that_does_not_match_the_batch(model_dir, monkeypatch, change, message):
    _unpad_with_meta(monkeypatch, change)
    with pytest.raises(PadFreeCheckError, match=message):
        fit(composer_model(model_dir), [PadFreeAudit(interval=1, strict=True)], batches=1)


def test_audit_fails_when_the_loss_counts_other_targets(model_dir):
    model = composer_model(model_dir)
    forward = model.forward

    def one_more_target(batch):
        out = forward(batch)
        return out.__class__(loss=out.loss, logits=out.logits, num_loss_tokens=out.num_loss_tokens + 1)

    model.forward = one_more_target
    with pytest.raises(PadFreeCheckError, match=r"the loss was taken over (\d+) targets; the batch's labels have"):
        fit(model, [PadFreeAudit(interval=1, strict=True)], batches=1)


def test_audit_fails_on_wrong_loss_token_counts(model_dir, monkeypatch):
    # LLM-Foundry's count includes the label at each document start, which the model never trains
    # on; token-weighted accumulation would then weigh microbatches wrongly.
    original = cb.read_batch

    def with_foundry_counts(batch):
        batch = dict(batch, loss_generating_tokens=[n + 1 for n in batch["loss_generating_tokens"]])
        return original(batch)

    monkeypatch.setattr(cb, "read_batch", with_foundry_counts)
    with pytest.raises(PadFreeCheckError, match=r"loss_generating_tokens\[0\] = 13 but the model trains on 12"):
        fit(composer_model(model_dir), [PadFreeAudit(interval=1, strict=True)], batches=1)


def test_audit_without_strict_logs_the_failure(model_dir, monkeypatch):
    original = cb.read_batch
    monkeypatch.setattr(cb, "read_batch", lambda b: original(dict(b, total_tokens=[SEQ_LEN] * len(b["total_tokens"]))))
    trainer = fit(composer_model(model_dir), [PadFreeAudit(interval=1, strict=False)], batches=1, microbatch=4)
    assert logged(trainer, "padfree/audit/passed") == [0.0]
    assert logged(trainer, "padfree/audit/checks_failed") == [1.0]


@pytest.mark.parametrize(
    ("callback", "message"),
    [
        (PadFreeIsolation(interval=1, strict=True), r"moved other documents' logits by up to"),
        (PadFreeParity(interval=1, strict=True), r"padfree_parity: loss .* vs padded fp32 reference"),
    ],
    ids=["isolation", "parity"],
)
def test_probes_catch_cross_document_attention(model_dir, monkeypatch, callback, message):
    monkeypatch.setitem(BACKENDS, "sdpa", Backend("sdpa", leaky_attend))
    with pytest.raises(PadFreeCheckError, match=message):
        fit(composer_model(model_dir), [callback], batches=1)


def _hook_reference_head(monkeypatch, hook) -> None:
    """`hook` on the parity reference's `lm_head` (its fp32 pass, and its 16-bit pass if any)."""
    build = PadFreeParity._reference_with_current_weights

    def hooked(self, state):
        ref = build(self, state)
        if not getattr(ref, "_test_hooked", False):  # the reference lives across probes: hook it once
            ref.lm_head.register_forward_hook(hook)
            ref._test_hooked = True
        return ref

    monkeypatch.setattr(PadFreeParity, "_reference_with_current_weights", hooked)


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_parity_fails_on_logits_alone(model_dir, monkeypatch, weights):
    # Every logit of the reference one higher: the softmax, and so the loss, is unchanged; only
    # the logits' comparison can see it. In bf16 weights stock HF's own pass is shifted too, so it
    # sets no larger tolerance.
    _hook_reference_head(monkeypatch, lambda module, args, out: out + 1.0)
    model = composer_model(model_dir).to(weights)
    with pytest.raises(PadFreeCheckError, match=r"logits differ from the padded fp32 reference by 1") as caught:
        fit(model, [PadFreeParity(interval=1, strict=True)], batches=1)
    assert "vs padded fp32 reference" not in str(caught.value)  # the loss agreed


@pytest.mark.parametrize("stock_error", [0.0, 0.3])
def test_parity_in_bf16_allows_twice_stock_hf_own_difference(model_dir, monkeypatch, stock_error):
    # With bf16 weights, our logits 0.1 of their maximum off one token's: beyond the 1e-2 floor,
    # within twice stock HF's own difference when stock HF in bf16 is 0.3 off.
    def off(module, args, out, by=0.1):
        out = out.clone()
        out[..., 0, 5] += by * out.detach().abs().max()
        return out

    _hook_reference_head(
        monkeypatch, lambda m, a, out: off(m, a, out, stock_error) if out.dtype == torch.bfloat16 else out
    )
    model = composer_model(model_dir).to(torch.bfloat16)
    model.model.lm_head.register_forward_hook(off)
    parity = PadFreeParity(interval=1, strict=False)
    trainer = fit(model, [parity], batches=1)
    stock, ours = parity.summary["stock_logits_max_rel_diff"], parity.summary["logits_max_rel_diff"]
    assert 0.05 < ours < 0.2
    if stock_error:
        assert 0.15 < stock and logged(trainer, "padfree/parity/passed") == [1.0]
    else:
        assert stock < 0.05 and logged(trainer, "padfree/parity/passed") == [0.0]


def test_reference_groups_bound_the_padded_positions():
    lengths = [3, 10, 2, 5, 5, 1]
    docs = [cb.Document(i % 2, 0, n) for i, n in enumerate(lengths)]
    groups = cb._reference_groups(docs, max_cells=12)
    # Longest first; a group grows while its documents x its longest length stay within 12, and a
    # longer document goes alone.
    assert [[d.length for d in g] for g in groups] == [[10], [5, 5], [3, 2, 1]]
    assert [[d.length for d in g] for g in cb._reference_groups(docs, max_cells=4)] == [[10], [5], [5], [3], [2, 1]]
    assert sorted(d for g in groups for d in g) == sorted(docs)


@pytest.mark.parametrize("boundary_labels", [False, True], ids=["our_labels", "labels_at_document_starts"])
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_parity_reference_in_small_groups_gives_the_same_result(model_dir, weights, boundary_labels):
    # The reference runs the probe's documents in groups of bounded padded size: its loss is the
    # mean over all targets whatever the grouping, and every logit is compared once. With a label
    # at every real position (LLM-Foundry's `text` collator's), a document's first label is no
    # target of its row in the padded layout, and must not be counted as one.
    original = cb._probe_batch

    def labels_everywhere(state, rows_, with_labels=False):
        probe = original(state, rows_, with_labels)
        return dict(probe, labels=probe["input_ids"].masked_fill(probe["attention_mask"] == 0, -100))

    def probe(cells):
        shapes = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cb, "_REFERENCE_CELLS", cells)
            if boundary_labels:
                mp.setattr(cb, "_probe_batch", labels_everywhere)
            _hook_reference_head(mp, lambda m, a, out: shapes.append((*out.shape[:2], out.dtype)))
            parity = PadFreeParity(interval=1, strict=True, max_rows=2)
            fit(composer_model(model_dir).to(weights), [parity], batches=1)
        return parity.summary, shapes

    whole, whole_shapes = probe(10**6)
    grouped, shapes = probe(9)
    # Rows [2, 2, 2, 9] and [5, 3, 7]: the longest document alone, then groups of at most 9 positions.
    fp32 = [s[:2] for s in shapes if s[2] == torch.float32]
    assert fp32 == [(1, 9), (1, 7), (1, 5), (3, 3), (1, 2)]
    assert [s[:2] for s in whole_shapes if s[2] == torch.float32] == [(7, 9)]
    if weights == torch.bfloat16:  # stock HF's 16-bit pass runs on each group too
        assert [s[:2] for s in shapes if s[2] == torch.bfloat16] == fp32
    assert grouped["loss_padfree"] == whole["loss_padfree"]
    for key in ("loss_reference", "loss_abs_diff", "logits_max_abs_diff", "logits_max_rel_diff"):
        assert grouped[key] == pytest.approx(whole[key], rel=1e-3, abs=1e-6), key
    if weights == torch.bfloat16:
        assert grouped["stock_logits_max_rel_diff"] == pytest.approx(whole["stock_logits_max_rel_diff"], rel=1e-3)
        # A difference of two nearly equal means (about 2e-5), which bf16 products move with the batch's shape.
        assert grouped["stock_loss_abs_diff"] == pytest.approx(whole["stock_loss_abs_diff"], rel=0.2)
    assert grouped["passed"] == 1.0


def test_parity_stock_difference_is_the_largest_over_every_group(model_dir, monkeypatch):
    # Stock HF's 16-bit logits off in the last group only (the third 2-token document of the row
    # [2, 2, 2, 9], alone in a group of at most 9 positions): the probe's stock difference is that one.
    def off_in_the_last_group(module, args, out):
        if out.dtype == torch.bfloat16 and out.shape[:2] == (1, 2):
            out = out.clone()
            out[0, 0, 5] += 0.5 * out.detach().abs().max()
        return out

    monkeypatch.setattr(cb, "_REFERENCE_CELLS", 9)
    _hook_reference_head(monkeypatch, off_in_the_last_group)
    parity = PadFreeParity(interval=1, strict=True, max_rows=2)
    fit(composer_model(model_dir).to(torch.bfloat16), [parity], batches=1)
    assert parity.summary["stock_logits_max_rel_diff"] > 0.3


def _without_targets(mp: pytest.MonkeyPatch) -> None:
    """The callbacks see batches of prompt-only rows: every label -100, in what they read of the
    batch and in their probes."""
    original = cb._probe_batch

    def no_targets(batch):
        return dict(batch, labels=torch.full_like(batch["labels"], -100))

    def probe_batch(state, rows, with_labels=False):
        probe = original(state, rows, with_labels)
        return no_targets(probe) if with_labels else probe

    mp.setattr(cb, "_probe_batch", probe_batch)
    mp.setattr(cb, "read_batch", lambda b: read_batch(no_targets(b)))


@pytest.mark.parametrize("with_targets", [True, False], ids=["rows_with_targets", "prompt_only_rows"])
def test_parity_fails_on_nan_logits(model_dir, with_targets):
    # NaN logits where the loss cannot see them: the last token of a document (no target inside
    # it), or rows without targets at all. The logits' comparison must fail on them.
    model = composer_model(model_dir)

    def nan_in_the_probe(module, args, out):
        if not module.training:  # the probe's forward (the training step's loss is already taken)
            out.logits[0, 1] = float("nan")  # probe row 0 is [2, 2, 2, 9]: its first document's last token
        return out

    model.register_forward_hook(nan_in_the_probe)
    parity = PadFreeParity(interval=1, strict=True, max_rows=2)
    with pytest.MonkeyPatch.context() as mp:
        if not with_targets:
            _without_targets(mp)
        with pytest.raises(PadFreeCheckError, match=r"logits differ from the padded fp32 reference by nan"):
            fit(model, [parity], batches=1)


@pytest.mark.parametrize("tied", [False, True])
def test_stock_pass_casts_one_module_at_a_time_and_puts_every_weight_back(tied):
    # The 16-bit stock pass must compute what the whole model cast to bf16 computes, with no more
    # than one module's weights in bf16 at any time, and leave the fp32 tensors themselves in place
    # after, also when a forward raises.
    import copy

    from tests.conftest import hf_twin, tiny_model

    hf = hf_twin(tiny_model(tie_word_embeddings=tied))
    fp32 = {n: p.data for n, p in hf.named_parameters()}
    ids = torch.randint(3, 97, (2, 12))
    whole = copy.deepcopy(hf)
    for p in whole.parameters():  # the parameters, as the probe casts; RoPE's buffer stays fp32
        p.data = p.data.to(torch.bfloat16)
    with torch.no_grad():
        expected = whole(ids).logits
    in_bf16_at_once = []
    watch = [m.register_forward_hook(lambda m, a, o: in_bf16_at_once.append(
        sum(p.dtype == torch.bfloat16 for p in hf.parameters()))) for m in hf.modules()]  # fmt: skip
    with torch.no_grad(), cb._weights_cast_as_used(hf, torch.bfloat16):
        logits = hf(ids).logits
    assert torch.equal(logits, expected)
    assert max(in_bf16_at_once) == 1  # a norm's weight, a projection's, the embedding's
    assert all(p.dtype == torch.float32 and p.data_ptr() == fp32[n].data_ptr() for n, p in hf.named_parameters())
    for h in watch:
        h.remove()

    def fail(module, args, out):
        raise RuntimeError("out of memory")

    hf.model.layers[1].mlp.down_proj.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="out of memory"), cb._weights_cast_as_used(hf, torch.bfloat16):
        hf(ids)
    assert all(p.dtype == torch.float32 and p.data_ptr() == fp32[n].data_ptr() for n, p in hf.named_parameters())


def test_isolation_takes_the_logits_differences_a_few_positions_at_a_time():
    a, b = torch.randn(2, 7, 11, dtype=torch.bfloat16), torch.randn(2, 7, 11, dtype=torch.bfloat16)
    b[1, 5, 3] = float("nan")
    expected = (a.float() - b.float()).abs().amax(dim=-1)
    for positions in (1, 3, 7, 100):
        got = cb._max_abs_diff_per_token(a, b, positions)
        assert got.dtype == torch.float32 and torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(), expected.nan_to_num()) and got[1, 5].isnan()


def test_parity_is_not_switched_off_by_a_stock_pass_that_overflows(model_dir, monkeypatch):
    # Every fp32 reference logit 5 higher (the loss is unchanged; our logits are 5 off) and one
    # logit of stock HF's 16-bit pass inf: twice an inf stock difference must not become the tolerance.
    def hook(module, args, out):
        if out.dtype == torch.bfloat16:
            out = out.clone()
            out[0, 0, 5] = float("inf")
            return out
        return out + 5.0

    _hook_reference_head(monkeypatch, hook)
    with pytest.raises(PadFreeCheckError, match=r"logits differ .* > 0.01; stock HF in this precision: inf"):
        fit(composer_model(model_dir).to(torch.bfloat16), [PadFreeParity(interval=1, strict=True)], batches=1)


def test_isolation_probes_the_documents_after_the_perturbed_one_in_its_row(model_dir, monkeypatch):
    # Only documents later in the perturbed document's row can move: the probe must perturb one
    # that has documents after it (the first of the busiest row).
    monkeypatch.setitem(BACKENDS, "sdpa", Backend("sdpa", within_rows_attend))
    with pytest.raises(PadFreeCheckError, match=r"moved other documents' logits by up to"):
        fit(composer_model(model_dir), [PadFreeIsolation(interval=1, strict=True)], batches=1)


def test_parity_tolerance_is_twice_stock_hf_own_difference_or_the_given_one():
    assert cb._parity_tolerance(None, 1e-2, 0.03) == 0.06
    assert cb._parity_tolerance(None, 1e-2, 0.001) == 1e-2  # the floor
    assert cb._parity_tolerance(None, 1e-4, 0.0) == 1e-4  # fp32: no stock pass
    assert cb._parity_tolerance(0.5, 1e-2, 0.3) == 0.5  # given: as given
    for overflowed in (math.inf, math.nan):  # stock HF's 16-bit pass overflowed: the floor
        assert cb._parity_tolerance(None, 1e-2, overflowed) == 1e-2


def test_parity_tolerances_take_each_their_own_stock_difference(model_dir, monkeypatch):
    # The loss tolerance from stock HF's loss difference, the logits' from its logits' difference.
    seen = []
    monkeypatch.setattr(cb, "_parity_tolerance", lambda given, floor, diff: seen.append(diff) or 1.0)
    diffs = cb._ParityDiffs(1.0, 1.0, 0.0, 0.0, stock_loss_diff=0.25, stock_logits_rel=0.75)
    monkeypatch.setattr(PadFreeParity, "_compare", lambda self, *args: diffs)
    model = composer_model(model_dir).to(torch.bfloat16)
    fit(model, [PadFreeParity(interval=1)], batches=1)
    assert seen == [0.25, 0.75]


def test_parity_tolerance_follows_the_precision_of_the_products(monkeypatch):
    # 16-bit: the least tolerance (the probe allows twice stock HF's own difference where larger)
    assert cb.default_parity_tolerance(Precision.AMP_BF16, on_gpu=True) == 1e-2
    assert cb.default_parity_tolerance(Precision.FP32, on_gpu=False) == 1e-4
    # bf16 weights under precision fp32 (pure bf16 training): the model computes in bf16.
    assert cb.default_parity_tolerance(Precision.FP32, on_gpu=False, weights_dtype=torch.bfloat16) == 1e-2
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")  # TF32: Composer's GPU default
    assert cb.default_parity_tolerance(Precision.FP32, on_gpu=True) == 1e-2
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert cb.default_parity_tolerance(Precision.FP32, on_gpu=True) == 1e-4


def test_isolation_fails_on_nan_logits(model_dir, monkeypatch):
    sdpa = BACKENDS["sdpa"]
    monkeypatch.setitem(BACKENDS, "sdpa", sdpa._replace(attend=lambda *a: sdpa.attend(*a) * float("nan")))
    with pytest.raises(PadFreeCheckError, match=r"moved other documents' logits by up to nan"):
        fit(composer_model(model_dir), [PadFreeIsolation(interval=1, strict=True)], batches=1)


def test_read_batch_finds_documents_and_inconsistencies():
    batch = packed_batch(rows=[[3, 2], [4]])
    docs = read_batch(batch)
    assert docs.doc_lens == (3, 2, 4) and docs.problems == []
    assert docs.positions().tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert docs.targets_per_row == [3, 3]
    bad = dict(batch, position_ids=torch.arange(SEQ_LEN).expand(2, SEQ_LEN), labels=batch["input_ids"])
    problems = read_batch(bad).problems
    assert "row 0: position_ids do not restart exactly where sequence_id changes" in problems
    assert any(p.startswith("labels[0, 5] = 0 is on padding") for p in problems)


def test_read_batch_takes_rows_of_padding_only():
    # The model unpads such a row to nothing, as it does every padding token.
    batch = {k: torch.cat([v, v[:1]]) for k, v in packed_batch(rows=[[3, 2], [4]]).items() if torch.is_tensor(v)}
    for key, pad in (("sequence_id", -1), ("attention_mask", 0), ("labels", -100)):
        if key in batch:
            batch[key][2] = pad
    docs = read_batch(batch)
    assert docs.doc_lens == (3, 2, 4) and docs.problems == [] and docs.targets_per_row == [3, 3, 0]
    empty = read_batch({k: v[2:] for k, v in batch.items()})
    assert empty.docs == [] and empty.problems == [] and empty.targets_per_row == [0]


def test_microbatches_of_padding_only_train_and_pass_the_checks(model_dir):
    # Empty text samples are rows of padding (as in LLM-Foundry's text loader). A microbatch made of
    # them has nothing to learn from but must still run (FSDP: every rank runs every layer).
    rows = [[5, 3], [4], [], [], [6, 2], [], [7], []]
    trainer = fit(composer_model(model_dir), all_callbacks(strict=True), batches=2, microbatch=2, rows=rows)
    losses = logged(trainer, "loss/train/total")
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert logged(trainer, "padfree/audit/passed") == [1.0, 1.0]
    assert logged(trainer, "padfree/audit/forwards_audited") == [1.0, 3.0]  # not the padding-only microbatch

    model = composer_model(model_dir)
    batch = collate([packed_row([], seed=0), packed_row([], seed=1)])
    out = model(batch)  # training: no logits
    model.loss(out, batch).backward()
    assert float(out.loss) == 0.0 and out.logits is None
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    logits = model.eval()(batch).logits  # eval: the logits of padding, 0
    assert logits.shape == (2, SEQ_LEN, VOCAB) and not logits.any()
    assert model.flops_per_batch(batch) == 0


def test_non_padfree_model_is_refused_at_init(tmp_path):
    from composer import Trainer
    from composer.models import HuggingFaceModel
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_config

    stock = HuggingFaceModel(LlamaForCausalLM(tiny_config().to_llama_config()), use_logits=True)
    with pytest.raises(
        TypeError,
        match=r"padfree_audit verifies padfree_causal_lm models; this run's model is HuggingFaceModel\. Set "
        r"`model\.name: padfree_causal_lm`, or remove padfree_audit from `callbacks`",
    ):
        Trainer(model=stock, callbacks=[PadFreeAudit()])


def test_bad_options():
    with pytest.raises(ValueError, match=r"padfree_stats: interval=0 must be a positive number of batches"):
        PadFreeStats(interval=0)
    with pytest.raises(ValueError, match=r"padfree_audit: interval=True must be a positive number of batches"):
        PadFreeAudit(interval=True)
    # A negative tolerance fails every probe; a YAML string for strict would silently mean true.
    with pytest.raises(ValueError, match=r"padfree_isolation: atol=-1 must be a finite number >= 0"):
        PadFreeIsolation(atol=-1)
    with pytest.raises(ValueError, match=r"padfree_parity: logits_rtol=nan must be a finite number >= 0"):
        PadFreeParity(logits_rtol=float("nan"))
    with pytest.raises(ValueError, match=r"padfree_audit: strict='maybe' must be true or false"):
        PadFreeAudit(strict="maybe")


def test_audit_passes_llm_foundrys_own_text_collator(model_dir):
    # LLM-Foundry's `text` collator (eos_token_id set) counts the labels at document starts in
    # `loss_generating_tokens` and leaves `sequence_id` at the last document's value on padding;
    # the model trains on such batches consistently (its loss is taken over the given count), so
    # the audit passes them, counting those labels. A count that is neither is still refused.
    from composer import Trainer
    from composer.core import DataSpec
    from composer.loggers import InMemoryLogger
    from llmfoundry.data.utils import get_text_collator, get_tokens_per_batch_func
    from tokenizers import Tokenizer, models
    from torch.utils.data import DataLoader
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")),
                                        pad_token="t0", bos_token="t1", eos_token="t2")  # fmt: skip
    collate_text, _ = get_text_collator({"dataset": {"eos_token_id": 2}}, tokenizer, 4)
    samples = []
    for i in range(8):  # rows of 16 tokens whose documents end with EOS; the first one shorter
        ids = torch.randint(3, VOCAB, (16,))
        ids[[4, 9]] = 2
        samples.append({"input_ids": ids[:12] if i == 0 else ids})
    batch = collate_text(samples[:4])
    assert batch["attention_mask"][0, 12:].tolist() == [0] * 4 and (batch["sequence_id"][0, 12:] >= 0).all()
    docs = read_batch(batch)
    assert docs.problems == [] and docs.boundary_targets_counted == 8  # 2 boundaries in each of 4 rows

    loader = DataSpec(DataLoader(samples, batch_size=4, collate_fn=collate_text),
                      get_num_tokens_in_batch=get_tokens_per_batch_func())  # fmt: skip
    model = composer_model(model_dir)
    trainer = Trainer(model=model, train_dataloader=loader,
                      max_duration="2ba", optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
                      device_train_microbatch_size=2, accumulate_train_batch_on_tokens=True,
                      callbacks=[PadFreeAudit(interval=1, strict=True)], loggers=[InMemoryLogger()],
                      progress_bar=False, log_to_console=False, seed=0)  # fmt: skip
    trainer.fit()
    assert logged(trainer, "padfree/audit/passed") == [1.0, 1.0]
    assert logged(trainer, "padfree/audit/boundary_targets_counted") == [8.0, 8.0]  # over both microbatches

    off = dict(batch, loss_generating_tokens=[n + 1 for n in batch["loss_generating_tokens"]])
    assert read_batch(off).problems == [
        "loss_generating_tokens[0] = 12 but the model trains on 9 targets in row 0 or 11 with the labels at "
        "document starts"
    ]
    real_but_padding = dict(batch, sequence_id=batch["sequence_id"].masked_fill(batch["attention_mask"] == 1, -1))
    assert (
        "row 0: sequence_id is -1 (padding) on tokens attention_mask marks as real"
        in read_batch(real_but_padding).problems
    )


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_parity_compares_only_logits_on_rows_without_targets(model_dir, weights):
    # Prompt-only rows: our loss is 0, stock HF's a mean over no targets (NaN); nothing to compare,
    # nor any stock HF loss difference in bf16.
    rows = [[5, 3, 7], [4, 6], [16], [2, 2, 2, 9]] * 2
    cb_parity = PadFreeParity(interval=1, strict=True, max_rows=1)
    with pytest.MonkeyPatch.context() as mp:
        _without_targets(mp)
        trainer = fit(composer_model(model_dir).to(weights), [cb_parity], batches=1, rows=rows)
    assert logged(trainer, "padfree/parity/passed") == [1.0]
    assert logged(trainer, "padfree/parity/loss_compared") == [0.0]
    assert logged(trainer, "padfree/parity/logits_max_rel_diff")[0] < (1e-4 if weights == torch.float32 else 2e-2)
    if weights == torch.bfloat16:
        assert logged(trainer, "padfree/parity/stock_loss_abs_diff") == [0.0]


def test_audit_puts_back_what_it_wrapped_and_is_one_per_run(model_dir):
    model = composer_model(model_dir)
    decoder = model.model.model
    calls = []
    forward_tokens = decoder.forward_tokens
    decoder.forward_tokens = lambda *a, **k: calls.append(1) or forward_tokens(*a, **k)  # the user's wrapper
    fit(model, [PadFreeAudit(interval=1, strict=True)], batches=2, microbatch=4)
    assert len(calls) == 2 and "forward_tokens" in vars(decoder)
    assert "attention_backend" not in vars(decoder) and modeling.unpad is unpad
    with pytest.raises(ValueError, match=r"2 padfree_audit callbacks in one run; keep one"):
        fit(composer_model(model_dir), [PadFreeAudit(interval=1), PadFreeAudit(interval=2)], batches=1)


def test_failed_probes_are_counted_and_a_batchs_problem_shows_once(model_dir, monkeypatch):
    monkeypatch.setitem(BACKENDS, "sdpa", Backend("sdpa", leaky_attend))
    probes = [PadFreeIsolation(interval=1), PadFreeParity(interval=1)]
    fit(composer_model(model_dir), probes, batches=2)
    assert [(p.summary["probes"], p.summary["probes_failed"]) for p in probes] == [(2, 2), (2, 2)]

    monkeypatch.setattr(cb, "_check_forward", lambda state, record, docs: (["the same problem"], 2))
    trainer = fit(composer_model(model_dir), [PadFreeAudit(interval=1)], batches=1, microbatch=2)
    assert logged(trainer, "padfree/audit/forwards_audited") == [2.0]  # two microbatches
    assert logged(trainer, "padfree/audit/checks_failed") == [1.0]


def test_run_counters_carry_over_a_resumed_run(model_dir, tmp_path, monkeypatch, caplog):
    # Checks that fail on every batch (claimed padding tokens; documents that see earlier rows),
    # on rows of one document each (isolation warns once per run that nothing was packed): a run
    # resumed after 2 batches must end with the counts of an uninterrupted 4-batch run.
    original = cb.read_batch
    monkeypatch.setattr(cb, "read_batch", lambda b: original(dict(b, total_tokens=[SEQ_LEN] * len(b["total_tokens"]))))
    monkeypatch.setitem(BACKENDS, "sdpa", Backend("sdpa", leaky_attend))
    rows = [[14], [12], [9], [16]] * 2

    def run(batches, **kwargs):
        callbacks = [PadFreeAudit(interval=1), PadFreeIsolation(interval=1), PadFreeParity(interval=1)]
        with caplog.at_level("WARNING", logger="foundry_padfree.callbacks"):
            caplog.clear()
            trainer = fit(composer_model(model_dir), callbacks, batches=batches, rows=rows, **kwargs)
        warned = sum("no row of the probed batch holds two documents" in r.message for r in caplog.records)
        return trainer, callbacks, warned

    counters = ("forwards_audited", "checks_failed", "probes", "probes_failed")
    whole, whole_callbacks, warned_whole = run(4)
    _, _, warned_first = run(2, save_folder=str(tmp_path), save_interval="1ba")
    resumed, resumed_callbacks, warned_resumed = run(4, load_path=str(tmp_path / "ep0-ba2-rank0.pt"))
    assert int(resumed.state.timestamp.batch) == 4
    for a, b in zip(resumed_callbacks, whole_callbacks):
        assert {k: a.summary[k] for k in counters if k in a.summary} == {
            k: b.summary[k] for k in counters if k in b.summary
        }
    assert [c.summary.get("probes", c.summary.get("forwards_audited")) for c in whole_callbacks] == [8, 4, 4]
    assert logged(whole, "padfree/audit/forwards_audited") == [2.0, 4.0, 6.0, 8.0]
    assert logged(resumed, "padfree/audit/forwards_audited") == [6.0, 8.0]
    assert logged(resumed, "padfree/audit/checks_failed") == [2.0, 2.0]  # a problem in each microbatch
    assert (warned_whole, warned_first, warned_resumed) == (1, 1, 0)
    # A checkpoint from before the callbacks had state: the counts start at 0.
    fresh = PadFreeAudit()
    fresh.load_state_dict({})
    assert fresh.summary == {"forwards_audited": 0, "checks_failed": 0}


def test_unknown_options_name_the_closest_one_and_the_callbacks_that_take_it():
    from llmfoundry.utils.builders import build_callback

    with pytest.raises(
        ValueError,
        match=r"unknown option\(s\) for padfree_stats: strict: an option of padfree_audit, padfree_isolation, "
        r"padfree_parity, not of padfree_stats\. padfree_stats takes interval; rename or remove the others\.",
    ):
        build_callback("padfree_stats", {"interval": 5, "strict": True})
    with pytest.raises(
        ValueError, match=r"for padfree_audit: atol: an option of padfree_isolation, not of padfree_audit"
    ):
        PadFreeAudit(atol=0.0)
    with pytest.raises(ValueError, match=r"max_row: did you mean 'max_rows'\?; stric: did you mean 'strict'\?"):
        PadFreeParity(max_row=2, stric=True)
    with pytest.raises(
        ValueError, match=r"colour: not an option of padfree_isolation\. padfree_isolation takes interval, strict, "
        r"atol, max_rows;"
    ):  # fmt: skip
        PadFreeIsolation(colour="red")


def test_parity_without_labels_names_the_batch_keys_and_the_fix():
    batch = {k: v for k, v in packed_batch().items() if k != "labels"}
    with pytest.raises(
        ValueError,
        match=r"needs batches with labels; this batch has only \['attention_mask', 'input_ids', "
        r"'loss_generating_tokens', 'sequence_id', 'total_tokens'\]\. Use a train loader whose batches carry "
        r"labels .*, or remove padfree_parity from `callbacks`",
    ):
        PadFreeParity()._probe(types.SimpleNamespace(batch=batch), logger=None)
