"""End to end: both loaders built by LLM-Foundry's `build_dataloader` from YAML on local data this
test writes (offline tokenizer), fed to the model, resumed, microbatched under Composer, and fed bad
input."""

from __future__ import annotations

import collections
import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from composer import Callback, Trainer
from composer.models import HuggingFaceModel
from conftest import tiny_model
from data_helpers import (
    chat_rows,
    documents_of,
    prompt_response_rows,
    token_stream,
    tokenizer,
    write_jsonl,
    write_mds,
)
from llmfoundry.data.dataloader import build_dataloader
from omegaconf import OmegaConf

from foundry_padfree.varlen import IGNORE_INDEX

SEQ = 128  # dataset.max_seq_len


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("padfree_data")
    write_jsonl(root / "sft" / "train.jsonl", prompt_response_rows(120, seed=1))
    write_jsonl(root / "chat" / "train.jsonl", chat_rows(40, seed=2))
    eos = tokenizer().eos_token_id
    stream = token_stream(300, eos)
    rows = [np.array(stream[i : i + 64], dtype=np.int32) for i in range(0, len(stream) - 64, 64)]
    write_mds(root / "tokens" / "train", {"tokens": "ndarray:int32"}, [{"tokens": r} for r in rows])
    write_mds(root / "text" / "train", {"text": "str"}, [{"text": r["a"]} for r in prompt_response_rows(20, seed=3)])
    pairs = prompt_response_rows(50, seed=4)
    write_mds(
        root / "sft_mds" / "train",
        {"prompt": "str", "response": "str"},
        [{"prompt": p["q"], "response": p["a"]} for p in pairs],
    )
    return root


def _finetuning_yaml(data_dir: Path, mode: str, extra: str = "") -> dict[str, Any]:
    yaml = f"""
    name: padfree_finetuning
    dataset:
      hf_name: json
      hf_kwargs: {{data_files: {data_dir}/sft/train.jsonl}}
      split: train
      preprocessing_fn: {{prompt: q, response: a}}
      max_seq_len: {SEQ}
      decoder_only_format: true
      shuffle: true
      shuffle_seed: 17
    num_workers: 0
    packing_mode: {mode}
    {extra}
    """
    return OmegaConf.to_container(OmegaConf.create(yaml.replace("\n    ", "\n")))


def _build(cfg: dict[str, Any], device_batch_size: int):
    return build_dataloader(copy.deepcopy(cfg), tokenizer(), device_batch_size)


def _expected_documents(spec) -> collections.Counter:
    """Every example of the dataset as the collator makes it: (input_ids, labels) tuples."""
    dataset, collator = spec.dataloader.dataset, spec.dataloader.collate_fn
    docs = collections.Counter()
    for i in range(len(dataset.base)):
        doc = collator.document(dataset.base[i]).document
        labels = doc.labels.copy()
        labels[0] = IGNORE_INDEX
        docs[(tuple(doc.input_ids.tolist()), tuple(labels.tolist()))] += 1
    return docs


@pytest.mark.parametrize("mode", ["budget", "flatten"])
def test_finetuning_epoch_has_every_example_once(data_dir, mode):
    spec = _build(_finetuning_yaml(data_dir, mode), device_batch_size=4)
    seen, samples, tokens, loss_tokens = collections.Counter(), 0, 0, 0
    batches = list(spec.dataloader)
    assert len(batches) == len(spec.dataloader)
    for batch in batches:
        rows = documents_of(batch)
        for docs in rows:
            assert sum(len(ids) for ids, _ in docs) <= SEQ
            for ids, labels in docs:
                seen[(tuple(ids.tolist()), tuple(labels.tolist()))] += 1
        samples += spec.get_num_samples_in_batch(batch)
        counts = spec._get_num_tokens_in_batch(batch)
        tokens, loss_tokens = tokens + counts["total"], loss_tokens + counts["loss_generating"]
        assert counts["total"] == int(batch["attention_mask"].sum())
        if mode == "budget":
            assert len(rows) <= 4
        elif batch is not batches[-1]:
            assert sum(len(docs) for docs in rows) == 4  # flatten: the unpacked loader's examples per step
    expected = _expected_documents(spec)
    assert seen == expected  # every example exactly once, with its labels
    assert samples == sum(expected.values()) == 120
    assert tokens == sum(len(ids) for ids, _ in expected)
    assert loss_tokens == sum(sum(label != IGNORE_INDEX for label in labels) for _, labels in expected)


def _real_documents(batch) -> collections.Counter:
    """LLM-Foundry's `finetuning` batch (one example per row): each row's real tokens and labels,
    the first label ignored as it is for every padfree document (it would predict across rows)."""
    docs = collections.Counter()
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        real = mask.bool()
        labels = labels[real].clone()
        labels[0] = IGNORE_INDEX
        docs[(tuple(ids[real].tolist()), tuple(labels.tolist()))] += 1
    return docs


def test_finetuning_documents_equal_llm_foundrys_own_examples(data_dir):
    # The reference is LLM-Foundry's own `finetuning` loader on the same data: the same tokens
    # (prompt, response, EOS), the same labels (prompt masked, EOS a target).
    ours = _finetuning_yaml(data_dir, "flatten")
    theirs = {k: v for k, v in ours.items() if k != "packing_mode"}
    theirs |= {"name": "finetuning", "prefetch_factor": None, "persistent_workers": False}  # (num_workers: 0)
    expected = collections.Counter()
    for batch in _build(theirs, device_batch_size=4).dataloader:
        expected += _real_documents(batch)
    seen = collections.Counter()
    for batch in _build(ours, device_batch_size=4).dataloader:
        for docs in documents_of(batch):
            seen.update((tuple(ids.tolist()), tuple(labels.tolist())) for ids, labels in docs)
    assert seen == expected and sum(seen.values()) == 120
    eos = tokenizer().eos_token_id
    whole = [(ids, labels) for ids, labels in seen if len(ids) < SEQ]  # not cut at max_seq_len
    assert len(whole) > 60 and all(ids[-1] == eos and labels[-1] == eos for ids, labels in whole)


def _example_order(data_dir, **dataset) -> list[tuple[int, ...]]:
    cfg = _finetuning_yaml(data_dir, "flatten")
    cfg["dataset"].update(dataset)
    return [tuple(ids.tolist()) for batch in _build(cfg, 4).dataloader for docs in documents_of(batch)
            for ids, _ in docs]  # fmt: skip


def test_finetuning_follows_the_datasets_shuffle_options(data_dir):
    spec = _build(_finetuning_yaml(data_dir, "flatten"), 4)
    dataset, collator = spec.dataloader.dataset, spec.dataloader.collate_fn
    in_order = [tuple(collator.document(dataset.base[i]).document.input_ids.tolist()) for i in range(len(dataset.base))]
    unshuffled = _example_order(data_dir, shuffle=False)
    assert sorted(unshuffled) == sorted(in_order)
    # Within a flatten step the rows are packed, but steps take the examples in the dataset's order.
    steps = range(0, 120, 4)
    assert [set(unshuffled[i : i + 4]) for i in steps] == [set(in_order[i : i + 4]) for i in steps]
    seed17, seed18 = _example_order(data_dir, shuffle_seed=17), _example_order(data_dir, shuffle_seed=18)
    assert seed17 == _example_order(data_dir, shuffle_seed=17)
    assert seed17 != seed18 and set(seed17[:4]) != set(in_order[:4])


@pytest.mark.parametrize("target_responses", ["all", "last"])
def test_finetuning_prompt_masking_and_multi_turn(data_dir, target_responses):
    cfg = _finetuning_yaml(data_dir, "budget")
    cfg["dataset"].update(hf_kwargs={"data_files": f"{data_dir}/chat/train.jsonl"}, target_responses=target_responses,
                          max_seq_len=2048)  # fmt: skip
    del cfg["dataset"]["preprocessing_fn"]
    tok = tokenizer()
    multi_turn = 0
    for batch in _build(cfg, device_batch_size=2).dataloader:
        for docs in documents_of(batch):
            for ids, labels in docs:
                text, targets = tok.decode(ids), tok.decode(labels[labels != IGNORE_INDEX])
                answers = text.count("<|im_start|>assistant")
                multi_turn += answers > 1
                # target_prompts none: no user turn is a target. The responses that are targets end
                # with <|im_end|>: every assistant turn (all) or only the last one (last).
                assert "<|im_start|>user" in text and "user" not in targets
                assert targets.count("<|im_end|>") == (answers if target_responses == "all" else 1), text
    assert multi_turn > 5  # the check saw examples where "all" and "last" differ


def test_text_loader_tokens_and_text_columns(data_dir):
    tok = tokenizer()
    cfg = {
        "name": "padfree_text",
        "dataset": {"local": str(data_dir / "tokens"), "split": "train", "shuffle": False, "max_seq_len": 64},
        "num_workers": 0,
    }
    cfg["dataset"]["eos_token_id"] = tok.eos_token_id
    spec = _build(cfg, device_batch_size=3)
    stream = []
    for batch in spec.dataloader:
        for docs in documents_of(batch):
            for ids, labels in docs:
                stream += ids.tolist()
                assert (ids[:-1] != tok.eos_token_id).all() and (labels[1:] == ids[1:]).all()
        assert spec.get_num_samples_in_batch(batch) == batch["input_ids"].shape[0]  # text: a sample is a row
    full = token_stream(300, tok.eos_token_id)
    assert stream == full[: len(stream)] and len(stream) == (len(full) - 1) // 64 * 64

    cfg = {
        "name": "padfree_text",
        "dataset": {"local": str(data_dir / "text"), "split": "train", "shuffle": False, "max_seq_len": 64},
    }
    batch = next(iter(_build(cfg, device_batch_size=4).dataloader))
    assert [len(docs) for docs in documents_of(batch)] == [1, 1, 1, 1]  # one text per row, padding not a document
    assert batch["total_tokens"] == batch["attention_mask"].sum(1).tolist() and min(batch["total_tokens"]) < 64


def test_text_loader_reports_cut_samples_and_strips_stored_padding(tmp_path, caplog, monkeypatch):
    # LLM-Foundry's text dataset cuts samples to max_seq_len without a word: the loader says so.
    # A `tokens` row stored padded with the tokenizer's own pad id (0) ends in padding, not tokens.
    from foundry_padfree.data import text

    tok = tokenizer()
    long_text = " ".join(prompt_response_rows(3, seed=5)[k]["a"] for k in range(3))
    short_text = "Return the list."
    rows = [np.arange(10, 26, dtype=np.int32), np.array([5, 6, 7, 0, 0], np.int32)]
    write_mds(tmp_path / "tokens", {"tokens": "ndarray:int32"}, [{"tokens": row} for row in rows])
    write_mds(tmp_path / "text", {"text": "str"}, [{"text": short_text}, {"text": long_text}])
    for column, expected_length in (("tokens", 16), ("text", len(tok(long_text)["input_ids"]))):
        monkeypatch.setattr(text, "_warned_cut", False)
        dataset = {"local": str(tmp_path / column), "split": None, "shuffle": False, "max_seq_len": 8}
        cfg = {"name": "padfree_text", "num_workers": 0, "dataset": dataset}
        caplog.clear()
        with caplog.at_level("WARNING", logger="foundry_padfree.data.text"):
            batch = next(iter(_build(cfg, device_batch_size=2).dataloader))
        cut = [r.getMessage() for r in caplog.records]
        assert len(cut) == 1 and f"a `{column}` sample has {expected_length} tokens, more than" in cut[0]
        if column == "tokens":
            assert batch["input_ids"][0].tolist() == list(range(10, 18))  # LLM-Foundry's cut: the first 8
            assert batch["total_tokens"] == [8, 3] and batch["sequence_id"][1].tolist() == [0, 0, 0] + [-1] * 5
        else:  # a short text as LLM-Foundry tokenizes it, a long one cut as it cuts it
            foundry_tokenize = text.StreamingTextDataset._tokenize
            built = _build(cfg, 2).dataloader.dataset
            foundry = [foundry_tokenize(built, {"text": t}) for t in (short_text, long_text)]
            expected = [[i for i, m in zip(f["input_ids"], f["attention_mask"]) if m] for f in foundry]
            assert [row[row != 0].tolist()[: len(e)] for row, e in zip(batch["input_ids"], expected)] == expected
            assert batch["total_tokens"] == [len(e) for e in expected]


def test_text_loader_drops_a_partial_last_batch_and_takes_rows_of_exactly_max_seq_len(tmp_path, caplog, monkeypatch):
    from foundry_padfree.data import text

    rows = [np.arange(10 + k, 18 + k, dtype=np.int32) for k in range(4)]  # 8 tokens each: max_seq_len
    write_mds(tmp_path / "tokens", {"tokens": "ndarray:int32"}, [{"tokens": row} for row in rows])
    dataset = {"local": str(tmp_path / "tokens"), "split": None, "shuffle": False, "max_seq_len": 8}
    cfg = {"name": "padfree_text", "num_workers": 0, "drop_last": True, "dataset": dataset}
    monkeypatch.setattr(text, "_warned_cut", False)
    with caplog.at_level("WARNING", logger="foundry_padfree.data.text"):
        loader = _build(cfg, device_batch_size=3).dataloader
        batches = list(loader)
    assert not caplog.records  # nothing was cut
    assert batches[0]["input_ids"].tolist() == [row.tolist() for row in rows[:3]]
    # LLM-Foundry's own text loader on the same data drops the same partial batch.
    foundry = _build({**cfg, "name": "text", "prefetch_factor": None, "persistent_workers": False}, 3).dataloader
    assert len(batches) == len(loader) == len(list(foundry)) == 1


def test_text_loader_warns_when_concatenated_rows_have_no_separator_set(data_dir, caplog, monkeypatch):
    """Rows of documents that end with EOS (as `convert_dataset_hf.py --concat_tokens` writes them)
    read with neither dataset.eos_token_id nor bos_token_id: each row is one document, which is
    what the YAML says, but almost never what is meant; the warning names the option to set."""
    from foundry_padfree.data import text

    eos = tokenizer().eos_token_id
    dataset = {"local": str(data_dir / "tokens"), "split": "train", "shuffle": False, "max_seq_len": 64}
    cfg = {"name": "padfree_text", "num_workers": 0, "dataset": dataset}
    for separator, warned in ((None, True), ("eos_token_id", False)):
        monkeypatch.setattr(text, "_warned_unsplit", False)
        caplog.clear()
        config = {**cfg, "dataset": {**dataset, separator: eos}} if separator else cfg
        with caplog.at_level("WARNING", logger="foundry_padfree.data.text"):
            batches = list(_build(config, device_batch_size=2).dataloader)
        messages = [r.getMessage() for r in caplog.records]
        if warned:
            assert len(messages) == 1, messages  # once per process, not once per row
            assert f"set dataset.eos_token_id: {eos}" in messages[0] and "EOS token (id 2)" in messages[0]
            assert all(len(documents_of(b)[0]) == 1 for b in batches)  # as configured: one document per row
        else:
            assert not messages
            assert any(len(documents_of(b)[0]) > 1 for b in batches)


def test_text_loader_warns_when_bos_mode_splits_on_the_tokenizers_eos(tmp_path, caplog):
    """A tokenizer whose BOS is its EOS (GPT-2's <|endoftext|>): in BOS mode that token is each
    document's first and never a target, so the warning names eos_token_id."""
    tok = copy.deepcopy(tokenizer())  # the helper's tokenizer is shared: change a copy
    tok.bos_token = tok.eos_token
    write_mds(tmp_path / "tokens", {"tokens": "ndarray:int32"}, [{"tokens": np.array([5, 6, 2, 7, 8], np.int32)}])
    dataset = {"local": str(tmp_path / "tokens"), "split": None, "shuffle": False, "max_seq_len": 8}
    for separator, warned in (("bos_token_id", True), ("eos_token_id", False)):
        caplog.clear()
        cfg = {"name": "padfree_text", "num_workers": 0, "dataset": {**dataset, separator: 2}}
        with caplog.at_level("WARNING", logger="foundry_padfree.data.text"):
            batch = next(iter(build_dataloader(copy.deepcopy(cfg), tok, 1).dataloader))
        messages = [r.getMessage() for r in caplog.records]
        if warned:
            assert len(messages) == 1 and "set dataset.eos_token_id: 2 instead" in messages[0], messages
            assert batch["labels"][0].tolist()[:5] == [-100, 6, -100, 7, 8]  # the separator is never a target
        else:
            assert not messages
            assert batch["labels"][0].tolist()[:5] == [-100, 6, 2, -100, 8]


def test_streaming_finetuning_with_a_worker(data_dir, tmp_path, caplog):
    cfg = {
        "name": "padfree_finetuning",
        "dataset": {
            "remote": str(data_dir / "sft_mds"),
            "local": str(tmp_path / "cache"),
            "split": "train",
            "shuffle": True,
            "shuffle_algo": "py1e",  # StreamingDataset's own order: replaced by ours, with a warning
            "max_seq_len": SEQ,
            "decoder_only_format": True,
        },
        "num_workers": 1,
        "persistent_workers": False,
    }
    with caplog.at_level("WARNING", logger="foundry_padfree.data.finetuning"):
        spec = _build(cfg, device_batch_size=4)
    assert [r.message for r in caplog.records if "shuffle_algo" in r.message] == [
        "padfree_finetuning: dataset.shuffle_algo = 'py1e' has no effect: the stream is read map-style, each sample "
        "once per epoch, in the order of our packing sampler (dataset.shuffle and dataset.shuffle_seed); remove it."
    ]
    seen = collections.Counter()
    for batch in spec.dataloader:
        for docs in documents_of(batch):
            seen.update((tuple(ids.tolist()), tuple(labels.tolist())) for ids, labels in docs)
    assert seen == _expected_documents(spec) and sum(seen.values()) == 50


@pytest.mark.parametrize("loader", ["finetuning", "text"])
def test_batch_feeds_the_model_and_documents_stay_apart(data_dir, loader):
    if loader == "finetuning":
        spec = _build(_finetuning_yaml(data_dir, "budget"), device_batch_size=2)
    else:
        dataset = {"local": str(data_dir / "tokens"), "split": "train", "max_seq_len": 64, "eos_token_id": 2}
        spec = _build({"name": "padfree_text", "dataset": dataset}, device_batch_size=2)
    batch = next(iter(spec.dataloader))
    model = tiny_model(vocab_size=len(tokenizer()), max_position_embeddings=SEQ)
    keys = ("input_ids", "attention_mask", "position_ids", "sequence_id", "labels")
    with torch.no_grad():
        packed = model(**{k: batch[k] for k in keys}, loss_reduction="sum")
        alone = sum(
            model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]), loss_reduction="sum").loss
            for docs in documents_of(batch)
            for ids, labels in docs
        )
    assert torch.isfinite(packed.loss) and packed.num_loss_tokens == sum(batch["loss_generating_tokens"])
    torch.testing.assert_close(packed.loss, alone, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["budget", "flatten"])
def test_dataloader_state_round_trip_gives_the_next_batch(data_dir, mode):
    cfg = _finetuning_yaml(data_dir, mode)
    first = _build(cfg, device_batch_size=3)
    first.dataloader.batch_sampler.set_epoch(1)
    batches = list(first.dataloader)
    done = 4
    state = first.dataloader.dataset.state_dict(sum(first.get_num_samples_in_batch(b) for b in batches[:done]), True)
    resumed = _build(cfg, device_batch_size=3)
    resumed.dataloader.dataset.load_state_dict(state)
    resumed.dataloader.batch_sampler.set_epoch(1)
    rest = list(resumed.dataloader)
    assert len(rest) == len(batches) - done
    for a, b in zip(rest, batches[done:]):
        assert a.keys() == b.keys() and all(
            torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a
        )


class _Recorder(Callback):
    """Records each training batch's input_ids and the gradients after the last backward."""

    def __init__(self):
        self.input_ids: list[torch.Tensor] = []
        self.grads: dict[str, torch.Tensor] = {}

    def after_dataloader(self, state, logger):
        self.input_ids.append(state.batch["input_ids"].clone())

    def after_backward(self, state, logger):
        self.grads = {n: p.grad.detach().clone() for n, p in state.model.named_parameters() if p.grad is not None}


def _trainer(spec, microbatch: int, **kwargs) -> tuple[Trainer, _Recorder]:
    model = tiny_model(seed=3, vocab_size=len(tokenizer()), max_position_embeddings=SEQ).train()
    recorder = _Recorder()
    trainer = Trainer(
        model=HuggingFaceModel(model, use_logits=True),
        train_dataloader=spec,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        device="cpu",
        precision="fp32",
        seed=0,
        device_train_microbatch_size=microbatch,
        accumulate_train_batch_on_tokens=True,
        callbacks=[recorder],
        progress_bar=False,
        log_to_console=False,
        loggers=[],
        **kwargs,
    )
    return trainer, recorder


@pytest.mark.parametrize("mode", ["budget", "flatten"])
def test_microbatching_matches_whole_batch(data_dir, mode):
    results = []
    for microbatch in (8, 1):
        trainer, recorder = _trainer(_build(_finetuning_yaml(data_dir, mode), 4), microbatch, max_duration="1ba")
        trainer.fit()
        results.append((trainer.state.total_loss_dict["loss/train/total"], recorder.grads, recorder.input_ids[0]))
    (loss_a, grads_a, ids_a), (loss_b, grads_b, ids_b) = results
    assert ids_a.shape[0] > 1 and torch.equal(ids_a, ids_b)
    assert abs(loss_a - loss_b) < 1e-6
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=1e-6, msg=name)


def test_composer_checkpoint_restores_the_exact_next_batch(data_dir, tmp_path):
    cfg = _finetuning_yaml(data_dir, "budget")
    run, recorded = _trainer(
        _build(cfg, 3),
        3,
        max_duration="3ba",
        save_folder=str(tmp_path),
        save_interval="2ba",
        save_filename="ba{batch}.pt",
    )
    run.fit()
    resumed, replayed = _trainer(_build(cfg, 3), 3, max_duration="3ba", load_path=str(tmp_path / "ba2.pt"))
    resumed.fit()
    assert resumed.state.dataset_resumption.get("train") is True  # our state, not Composer's spinning
    assert len(replayed.input_ids) == 1 and torch.equal(replayed.input_ids[0], recorded.input_ids[2])


@pytest.mark.parametrize("drop_last", [False, True])
def test_flatten_has_the_steps_of_llm_foundrys_own_loader(data_dir, drop_last):
    """120 examples, 7 per step: 17 full steps and one of 1 example, which `drop_last` leaves out
    in both loaders."""
    ours = {**_finetuning_yaml(data_dir, "flatten"), "drop_last": drop_last}
    theirs = {**ours, "name": "finetuning", "prefetch_factor": None, "persistent_workers": False}
    theirs = {k: v for k, v in theirs.items() if k not in ("packing_mode",)}
    spec = _build(ours, device_batch_size=7)
    batches = list(spec.dataloader)
    foundry = list(_build(theirs, device_batch_size=7).dataloader)
    assert len(batches) == len(spec.dataloader) == len(foundry) == (17 if drop_last else 18)
    examples = [spec.get_num_samples_in_batch(b) for b in batches]
    assert examples == [b["input_ids"].shape[0] for b in foundry]


def test_bad_input_gives_clear_errors(data_dir, tmp_path, caplog):
    cfg = _finetuning_yaml(data_dir, "budget")
    cases = [
        ({"packing_buffer": 8}, "unknown option\\(s\\) \\['packing_buffer'\\]"),
        ({"dataset": {**cfg["dataset"], "max_seqlen": 64}}, "unknown key\\(s\\) \\['max_seqlen'\\]"),
        ({"dataset": {**cfg["dataset"], "max_seq_len": 1}}, "max_seq_len = 1"),
        ({"dataset": {**cfg["dataset"], "packing_ratio": 4.0}}, "packing_ratio = 4.0 is LLM-Foundry's"),
        ({"dataset": {**cfg["dataset"], "decoder_only_format": False}}, "decoder_only_format = False"),
        ({"packing_mode": "greedy"}, "packing_mode = 'greedy'"),
        ({"max_tokens_per_row": 64}, "max_tokens_per_row = 64 is below dataset.max_seq_len = 128"),
        ({"dataset": {**cfg["dataset"], "epoch_size": 1000}}, "epoch_size = 1000 is not supported"),
        (
            {"dataset": {**cfg["dataset"], "streams": {"a": {"remote": "x", "repeat": 3, "proportion": 0.5}}}},
            r"dataset.streams.a sets proportion, repeat: stream mixing is not supported",
        ),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            _build({**cfg, **change}, 2)

    text = {"name": "padfree_text", "dataset": {"local": str(data_dir / "tokens"), "split": "train", "max_seq_len": 64}}
    with pytest.raises(ValueError, match="eos_token_id=5 does not match the eos_token_id of the tokenizer=2"):
        _build({**text, "dataset": {**text["dataset"], "eos_token_id": 5}}, 2)
    with pytest.raises(ValueError, match=r"mlm_probability = 0\.15"):
        _build({**text, "dataset": {**text["dataset"], "mlm_probability": 0.15}}, 2)
    with pytest.raises(ValueError, match="max_seq_len = 1"):
        _build({**text, "dataset": {**text["dataset"], "max_seq_len": 1}}, 2)
    # LLM-Foundry's padded-shape options are accepted and said to change nothing.
    with caplog.at_level("WARNING", logger="foundry_padfree.data.finetuning"):
        _build({**cfg, "dataset": {**cfg["dataset"], "allow_pad_trimming": False}}, 2)
    assert any("dataset.allow_pad_trimming = False has no effect" in r.message for r in caplog.records)
    # A whole float is read as LLM-Foundry reads it; anything else names the value.
    assert next(iter(_build({**text, "dataset": {**text["dataset"], "max_seq_len": 64.0}}, 2).dataloader))
    assert next(iter(_build({**cfg, "max_tokens_per_row": 256.0}, 2).dataloader))
    for bad in ("256", 256.5):
        with pytest.raises(ValueError, match=rf"max_tokens_per_row = {bad!r}; it must be a whole number of tokens"):
            _build({**cfg, "max_tokens_per_row": bad}, 2)

    # Streaming data is not filtered by LLM-Foundry: an empty response is an error naming the example.
    write_mds(
        tmp_path / "bad" / "train",
        {"prompt": "str", "response": "str"},
        [{"prompt": "a b", "response": "c"}, {"prompt": "d", "response": ""}],
    )
    dataset = {
        "remote": str(tmp_path / "bad"),
        "local": str(tmp_path / "cache"),
        "split": "train",
        "max_seq_len": 64,
        "decoder_only_format": True,
    }
    with pytest.raises(ValueError, match="example 1 has an empty turn"):
        _build({"name": "padfree_finetuning", "dataset": dataset}, 2)
