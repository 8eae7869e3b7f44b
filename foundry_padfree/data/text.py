"""`padfree_text`: LLM-Foundry's `text` loader with document boundaries the model can use.

The `dataset:` section is the one of LLM-Foundry's `text` loader (StreamingTextDataset over MDS,
local or remote, `streams`, `tokens` or `text` columns, `eos_token_id` / `bos_token_id`), and
LLM-Foundry builds and validates the dataset; only the collator is ours.

Each stream sample becomes one row, as in LLM-Foundry, so StreamingDataset's sharding, shuffling and
mid-epoch resumption are untouched (a sample is a row; see `dataspec.py`). Within a row, documents
are found as LLM-Foundry's `ConcatenatedSequenceCollatorWrapper` finds them:

- `eos_token_id`: a document ends with (and includes) each EOS;
- `bos_token_id`: a document starts at each BOS;
- neither: the row is one document (the usual choice for a `text` column, one text per sample).
  A row that holds the tokenizer's EOS before its end (or its BOS after its start) then draws a
  warning naming the option to set: concatenated rows (`convert_dataset_hf.py --concat_tokens`)
  need `eos_token_id` or `bos_token_id`, or their documents would attend to each other.

When the tokenizer's BOS and EOS are one token (e.g. GPT-2's `<|endoftext|>`), `bos_token_id`
makes it each document's first token, which is never a target (no document predicts the next),
so the model would never learn to end a text: the loader warns and names `eos_token_id` instead.

Unlike LLM-Foundry:

- the first label of every document is ignored, so the last token of a document is never trained
  to predict the next document, even by a model that ignores `sequence_id`;
- padding comes from lengths and `attention_mask`, not from token ids, so with
  `pad_token_id == eos_token_id` real EOS tokens keep their labels and padding is not a document.
  The one exception: a `tokens` row stored already padded, with a pad token of its own (neither EOS
  nor BOS), ends in a run of that id, which is padding (LLM-Foundry masks its labels instead);
- `sequence_id` is -1 on padding and numbered 0..k-1 in BOS mode too; `position_ids` restart at 0.

A sample longer than `max_seq_len` is cut to it by LLM-Foundry's dataset, as in its own loader
(the first `max_seq_len` tokens; a `text` column keeps the tokenizer's special tokens); the loader
warns the first time, naming the sample's length, since the rest is not trained on.

An empty sample (a blank document, with a tokenizer that adds no BOS) is a row of padding, as in
LLM-Foundry; a microbatch made only of such rows trains with a loss of 0 (`padfree_causal_lm`
runs every layer on one target-less token, so FSDP ranks stay in step).

**Partial documents at row edges.** Concatenated rows cut documents at arbitrary points. Each
piece is kept where it is and is its own segment with positions from 0: the tail of a document
that began in the previous row is the row's first segment (EOS mode: the tokens up to the first
EOS; BOS mode: the tokens before the first BOS). Carrying the tail over to join its head would make
rows depend on each other and break StreamingDataset's exact resumption; the cost is that such a
tail is trained without the context of its head, as with any fixed-length concatenation.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from composer.core import DataSpec
from llmfoundry.data.text_data import StreamingTextDataset, build_text_dataloader
from streaming import StreamingDataset
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from foundry_padfree.data.batch import Document, collate_rows
from foundry_padfree.data.dataspec import FOUNDRY_BUILDER_WORKERS, padfree_data_spec, whole_number, worker_options

log = logging.getLogger(__name__)

# The `dataset:` keys LLM-Foundry's text loader understands; anything else is a typo we report.
_TEXT_DATASET_KEYS = (
    set(inspect.signature(StreamingTextDataset).parameters)
    | set(inspect.signature(StreamingDataset).parameters)
    | {
        "eos_token_id",
        "bos_token_id",
        "override_eos_token_id_mismatch_error",
        "override_bos_token_id_mismatch_error",
        "replication",
        "seq_parallel_replication",
    }
) - {"self", "tokenizer", "batch_size", "kwargs"}


def split_documents(
    ids: np.ndarray, eos_token_id: int | None = None, bos_token_id: int | None = None
) -> list[Document]:
    """Cut one row of real tokens into documents (see the module docstring for the rules).

    Args:
        ids: (L,), int64, the real tokens of a row, L >= 1.
        eos_token_id: split after each of these, or None.
        bos_token_id: split before each of these, or None (not both).

    Returns:
        The documents in order; each one's labels are its tokens (the collator ignores the first).
    """
    assert eos_token_id is None or bos_token_id is None, "LLM-Foundry's config check rejects both"
    if eos_token_id is not None:
        cuts = np.flatnonzero(ids == eos_token_id) + 1
    elif bos_token_id is not None:
        cuts = np.flatnonzero(ids == bos_token_id)
    else:
        cuts = np.empty(0, dtype=np.int64)
    bounds = np.unique(np.concatenate([[0], cuts, [len(ids)]]))
    return [Document(ids[a:b], ids[a:b].copy()) for a, b in itertools.pairwise(bounds)]


class PadFreeTextCollator:
    """Collate StreamingTextDataset samples into padding-free rows.

    Args:
        max_seq_len: row length S.
        pad_token_id: filler id for padding.
        eos_token_id: document separator (EOS mode), or None.
        bos_token_id: document separator (BOS mode), or None.
        trailing_pad_id: a `tokens` row's trailing run of this id is padding (rows stored already
            padded with a pad token of their own), or None.
        unset_separators: with neither separator set, the tokenizer's `{"eos_token_id": id,
            "bos_token_id": id}` (either may be absent): a row holding one of them inside it draws
            a warning (once per process) that names the option to set.
    """

    def __init__(
        self,
        max_seq_len: int,
        pad_token_id: int,
        eos_token_id: int | None = None,
        bos_token_id: int | None = None,
        trailing_pad_id: int | None = None,
        unset_separators: Mapping[str, int] | None = None,
    ):
        if eos_token_id is not None and bos_token_id is not None:
            raise ValueError(
                f"eos_token_id = {eos_token_id} and bos_token_id = {bos_token_id} are both set; documents are split "
                "on one of them: keep eos_token_id if documents end with EOS, bos_token_id if they start with BOS."
            )
        self.max_seq_len = max_seq_len
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        if trailing_pad_id is not None and trailing_pad_id in (eos_token_id, bos_token_id):
            raise ValueError(
                f"trailing_pad_id = {trailing_pad_id} is also the document separator; a run of separators at "
                "the end of a row may be empty documents, not padding: leave trailing_pad_id unset."
            )
        self.trailing_pad_id = trailing_pad_id
        separated = eos_token_id is not None or bos_token_id is not None
        self.unset_separators = (
            {} if separated else {k: v for k, v in (unset_separators or {}).items() if v is not None}
        )

    def __call__(self, samples: Sequence[torch.Tensor | Mapping[str, Any]]) -> dict[str, Any]:
        """`samples`: token tensors (`tokens` column, (L,) integer) or tokenizer outputs (`text`
        column: `input_ids` and `attention_mask`, padded to `max_seq_len`)."""
        rows = []
        for k, sample in enumerate(samples):
            ids = _real_tokens(sample, self.trailing_pad_id)  # an empty sample is a row of padding
            if len(ids) > self.max_seq_len:
                raise ValueError(f"sample {k} has {len(ids)} tokens, more than max_seq_len ({self.max_seq_len}).")
            if self.unset_separators:
                _warn_unsplit(ids, self.unset_separators)
            rows.append(split_documents(ids, self.eos_token_id, self.bos_token_id))
        return collate_rows(rows, self.max_seq_len, self.pad_token_id)


_warned_unsplit = False


def _warn_unsplit(ids: np.ndarray, separators: Mapping[str, int]) -> None:
    """Warn (once per process) when a row that is one document holds a separator inside it."""
    global _warned_unsplit
    if _warned_unsplit:
        return
    inside = {"eos_token_id": ids[:-1], "bos_token_id": ids[1:]}  # an EOS may end the row, a BOS start it
    for option, token in separators.items():
        count = int(np.count_nonzero(inside[option] == token))
        if count:
            _warned_unsplit = True
            log.warning(
                "padfree_text: a row holds the tokenizer's %s token (id %d) %d time(s) inside it, but neither "
                "dataset.eos_token_id nor dataset.bos_token_id is set, so each row is trained as one document: "
                "its documents attend to each other and their positions run on. If rows are concatenated "
                "documents, set dataset.%s: %d. (Said once per process.)",
                option[:3].upper(), token, count, option, token,
            )  # fmt: skip
            return


def _real_tokens(sample: torch.Tensor | Mapping[str, Any], trailing_pad_id: int | None = None) -> np.ndarray:
    """(L,) int64: a sample's tokens without padding: where `attention_mask` is 0 (`text`
    column), or a `tokens` row's trailing run of `trailing_pad_id`."""
    if isinstance(sample, Mapping):
        ids = np.asarray(sample["input_ids"], dtype=np.int64)
        if "attention_mask" in sample:
            ids = ids[np.asarray(sample["attention_mask"]).astype(bool)]
        return ids
    ids = torch.as_tensor(sample).to(torch.int64).numpy()
    if trailing_pad_id is not None and len(ids):
        kept = np.flatnonzero(ids != trailing_pad_id)
        ids = ids[: kept[-1] + 1 if len(kept) else 0]
    return ids


class _CutReportingTextDataset(StreamingTextDataset):
    """LLM-Foundry's `StreamingTextDataset`, which cuts samples longer than `max_seq_len` to it
    without a word, saying so (once per process). The samples it returns are its own."""

    def _read_binary_tokenized_sample(self, sample: dict[str, Any]) -> torch.Tensor:
        tokens = sample["tokens"]  # an array, or its bytes in `token_encoding_type`
        itemsize = 1 if isinstance(tokens, np.ndarray) else np.dtype(self.token_encoding_type).itemsize
        n = len(tokens) // itemsize
        if n > self.max_seq_len:
            _warn_cut(n, self.max_seq_len, "tokens")
        return super()._read_binary_tokenized_sample(sample)

    def _tokenize(self, text_sample: Mapping) -> dict[str, list[int]]:
        if self.tokenizer.pad_token is None:
            return super()._tokenize(text_sample)  # LLM-Foundry's error
        uncut = self.tokenizer(text_sample["text"], truncation=False)
        if len(uncut["input_ids"]) <= self.max_seq_len:  # what the cut tokenization gives; the collator pads
            return uncut
        _warn_cut(len(uncut["input_ids"]), self.max_seq_len, "text")
        return super()._tokenize(text_sample)  # its truncation keeps the special tokens


_warned_cut = False


def _warn_cut(length: int, max_seq_len: int, column: str) -> None:
    global _warned_cut
    if not _warned_cut:
        _warned_cut = True
        log.warning(
            "padfree_text: a `%s` sample has %d tokens, more than dataset.max_seq_len (%d); LLM-Foundry's text "
            "dataset keeps its first %d tokens and the rest is not trained on. Write rows of at most max_seq_len "
            "tokens (e.g. convert_dataset_hf.py --concat_tokens %d) or raise max_seq_len to train on all of it. "
            "(Said once per process.)", column, length, max_seq_len, max_seq_len, max_seq_len,
        )  # fmt: skip


def build_padfree_text_dataloader(
    tokenizer: PreTrainedTokenizerBase | None,
    device_batch_size: int,
    dataset: dict[str, Any],
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = True,
    prefetch_factor: int | None = 2,
    persistent_workers: bool = True,
    timeout: int = 0,
    **unknown: Any,
) -> DataSpec:
    """LLM-Foundry dataloader `padfree_text`: `train_loader: {name: padfree_text, dataset: {...}}`.

    Args:
        tokenizer: the run's tokenizer (its pad, eos and bos ids are used).
        device_batch_size: rows per device per step.
        dataset: the `dataset:` section of LLM-Foundry's `text` loader; `max_seq_len` is the row length.
        drop_last, num_workers, pin_memory, prefetch_factor, persistent_workers, timeout: as for
            `torch.utils.data.DataLoader`. With `num_workers: 0`, `prefetch_factor` and
            `persistent_workers` do not apply and are ignored.

    Returns:
        A Composer `DataSpec` whose batches are described in `batch.py`.

    Raises:
        ValueError: for unknown options, `max_seq_len` < 2, EOS and BOS both set, a separator id
            that differs from the tokenizer's (unless overridden, as in LLM-Foundry), or
            `mlm_probability` (masked LM is not causal LM).
    """
    if unknown:
        raise ValueError(
            f"padfree_text got unknown option(s) {sorted(unknown)}; it accepts dataset, drop_last, num_workers, "
            "pin_memory, prefetch_factor, persistent_workers and timeout."
        )
    if tokenizer is None:
        raise ValueError("padfree_text needs the run's tokenizer (a top-level `tokenizer:` section).")
    dataset_cfg = copy.deepcopy(dict(dataset))
    if "mlm_probability" in dataset_cfg:
        raise ValueError(
            f"dataset.mlm_probability = {dataset_cfg['mlm_probability']}: masked-LM batches are not supported by "
            "the padding-free causal LM; remove it."
        )
    bad = sorted(set(dataset_cfg) - _TEXT_DATASET_KEYS)
    if bad:
        raise ValueError(
            f"dataset has unknown key(s) {bad} for padfree_text; allowed: {', '.join(sorted(_TEXT_DATASET_KEYS))}."
        )
    max_seq_len = dataset_cfg["max_seq_len"] = whole_number(dataset_cfg.get("max_seq_len"), "dataset.max_seq_len")
    if max_seq_len < 2:
        raise ValueError(
            f"dataset.max_seq_len = {max_seq_len!r}; rows need at least 2 tokens for a token to have a target."
        )
    eos_token_id, bos_token_id = dataset_cfg.get("eos_token_id"), dataset_cfg.get("bos_token_id")
    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:  # any id works: padding is found from lengths, not ids
        pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    own_pad = tokenizer.pad_token_id
    separators = (tokenizer.eos_token_id, tokenizer.bos_token_id, eos_token_id, bos_token_id)
    trailing_pad_id = own_pad if own_pad is not None and own_pad not in separators else None
    if bos_token_id is not None and bos_token_id == tokenizer.eos_token_id:
        log.warning(
            f"padfree_text: dataset.bos_token_id = {bos_token_id} is also the tokenizer's EOS. Split on it as BOS, "
            "it is each document's first token, which is never a target (no document predicts the next one), so "
            f"the model never learns to end a text; set dataset.eos_token_id: {bos_token_id} instead (documents "
            "then end with it and it is predicted from the document it closes)."
        )
    unset = {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}
    collator = PadFreeTextCollator(max_seq_len, pad_token_id, eos_token_id, bos_token_id, trailing_pad_id, unset)

    # LLM-Foundry builds and validates the StreamingTextDataset (separator ids against the
    # tokenizer, replication, streams); we keep its dataset and batch size and use our collator.
    # Its own DataLoader is never iterated.
    foundry_loader = build_text_dataloader(
        tokenizer=tokenizer,
        device_batch_size=device_batch_size,
        dataset=dataset_cfg,
        drop_last=drop_last,
        **FOUNDRY_BUILDER_WORKERS,
    ).dataloader
    assert isinstance(foundry_loader, DataLoader), f"LLM-Foundry returned {type(foundry_loader)}"
    assert type(foundry_loader.dataset) is StreamingTextDataset, f"LLM-Foundry built {type(foundry_loader.dataset)}"
    foundry_loader.dataset.__class__ = _CutReportingTextDataset  # the same object, reporting its cuts
    loader = DataLoader(
        foundry_loader.dataset,
        batch_size=foundry_loader.batch_size,
        collate_fn=collator,
        drop_last=drop_last,
        **worker_options(num_workers, pin_memory, prefetch_factor, persistent_workers, timeout),
    )
    return padfree_data_spec(loader, samples="rows")
