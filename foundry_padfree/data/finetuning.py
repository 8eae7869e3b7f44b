"""`padfree_finetuning`: LLM-Foundry's `finetuning` loader, packed without padding.

The `dataset:` section is the one of LLM-Foundry's `finetuning` loader: an HF dataset
(`hf_name`, e.g. `json` with `hf_kwargs.data_files`, `split`, `preprocessing_fn` as an import
path, a registered name or a `{prompt: col, response: col}` mapping) or a streaming MDS dataset
(`remote`/`local` or `streams`), prompt/response or chat `messages` (multi-turn) examples,
`target_prompts`, `target_responses`, `decoder_only_format: true`. LLM-Foundry builds, tokenizes
and filters the dataset exactly as its own loader does, so an SFT YAML switches by changing the
loader name (and the model). Our options sit next to `dataset:`:

```yaml
train_loader:
  name: padfree_finetuning
  dataset: {...}                # unchanged
  packing_mode: budget          # or flatten
  packing_buffer_size: 1024     # budget mode look-ahead
  max_tokens_per_row: 2048      # default: dataset.max_seq_len
```

Each example becomes one document: its turns stitched by LLM-Foundry's
`stitch_turns_decoder_only` (prompt tokens masked per `target_prompts`, responses per
`target_responses`, EOS appended), truncated to `max_seq_len` by LLM-Foundry's rule (keep the first
`max_seq_len` tokens; the count of truncated examples is logged), and its first label ignored.
How examples become rows and steps is `packing.py`: `budget` fills `device_batch_size` rows of
`max_tokens_per_row` tokens per device (fewer optimizer steps per epoch than the unpacked loader);
`flatten` keeps `device_batch_size` examples per device per step (the same number of steps,
`drop_last` included).

Batches are always trimmed to their longest row (rounded up to 8 columns): LLM-Foundry's
`allow_pad_trimming` and `pad_to_longest` are accepted, with a warning that they change nothing
(the model computes on real tokens only, so the padded shape costs nothing but host copies).

Examples are never dropped by the packer, unless `drop_last: true` asks it to leave out an
epoch's last step when that step is not full. Otherwise the only examples a run does not see are those
LLM-Foundry's own HF dataset builder filters out before packing (empty prompt or response, or no
target left within `max_seq_len`), which it reports in a warning; `scripts/packing_stats.py`
counts them. A streaming dataset is not filtered by LLM-Foundry, so such an example is an error
here, naming its index.

The streaming dataset is read map-style (`dataset[i]`, our seeded order) because packing needs
each example's length before batching; this reads every sample once at build time to learn the
lengths, and StreamingDataset's own shuffling, sampling and partitioning options do not apply
(a warning names those set; `shuffle` and `shuffle_seed` do apply). An epoch is every sample of
every stream once: `epoch_size` and the streams' `repeat`, `proportion` and `choose` are refused.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from composer.core import DataSpec
from composer.utils import dist
from llmfoundry.data.finetuning.collator import stitch_turns_decoder_only
from llmfoundry.data.finetuning.dataloader import _ALLOWED_DATASET_KEYS, build_finetuning_dataloader
from llmfoundry.data.finetuning.tasks import (
    DEFAULT_TARGET_PROMPTS,
    DEFAULT_TARGET_RESPONSES,
    StreamingFinetuningDataset,
    dataset_constructor,
)
from streaming import StreamingDataset
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from foundry_padfree.config import is_positive_int
from foundry_padfree.data.batch import Document, collate_rows
from foundry_padfree.data.dataspec import FOUNDRY_BUILDER_WORKERS, padfree_data_spec, whole_number, worker_options
from foundry_padfree.data.packing import PACKING_MODES, PackedBatchSampler, PackedDataset
from foundry_padfree.varlen import IGNORE_INDEX

log = logging.getLogger(__name__)

# LLM-Foundry packing options that would fight ours.
_FOUNDRY_PACKING_KEYS = ("packing_ratio", "max_leftover_bins_to_keep", "auto_packing_replication")
# Every `dataset:` key LLM-Foundry's finetuning loader understands, HF or streaming.
_FINETUNING_DATASET_KEYS = (
    set(inspect.signature(dataset_constructor.build_from_hf).parameters)
    | set(inspect.signature(StreamingFinetuningDataset).parameters)
    | set(inspect.signature(StreamingDataset).parameters)
    | set(_ALLOWED_DATASET_KEYS)
    | {"hf_name", "shuffle_seed", "replication"}
) - {"self", "dataset_name", "tokenizer", "mapping_fn", "kwargs", "batch_size", "packing_ratio"}
_ROW_MULTIPLE = 8  # columns are trimmed to the longest row, rounded up to this (tensor-core friendly)
# LLM-Foundry's options for the padded shape of its batches, which rows here never keep.
_PADDING_KEYS = ("allow_pad_trimming", "pad_to_longest")
# StreamingDataset's own ordering and partitioning of samples, which the map-style read replaces
# (`shuffle` and `shuffle_seed` do apply: our sampler reads them).
_STREAM_ORDER_KEYS = (
    "shuffle_algo",
    "shuffle_block_size",
    "sampling_method",
    "sampling_granularity",
    "partition_algo",
    "num_canonical_nodes",
    "batching_method",
)


class ExampleTokens(NamedTuple):
    """One finetuning example as a document, and what truncation did to it."""

    document: Document
    full_length: int  # tokens before truncation to max_seq_len


def example_tokens(
    example: Mapping[str, Any],
    max_seq_len: int,
    target_prompts: str,
    target_responses: str,
    eos_token_id: int | None,
    index: int | None = None,
) -> ExampleTokens:
    """Stitch a tokenized example's turns into one document, as LLM-Foundry's collator does.

    Args:
        example: `{'turns': [{'input_ids': [...], 'labels': [...]}, ...]}` (LLM-Foundry's
            tokenized format; prompt tokens in `input_ids`, response tokens in `labels`).
        max_seq_len: keep the first `max_seq_len` tokens (LLM-Foundry's truncation).
        target_prompts, target_responses: LLM-Foundry's target policies.
        eos_token_id: appended to the last response if missing (None: nothing appended).
        index: the example's index, for error messages.

    Raises:
        ValueError: for an example that is empty or has no target within `max_seq_len`.
    """
    where = f"example {index}" if index is not None else "an example"
    turns = example["turns"]
    if not turns or any(len(turn["input_ids"]) == 0 or len(turn["labels"]) == 0 for turn in turns):
        raise ValueError(f"{where} has an empty turn (prompt or response with no tokens); remove it from the dataset.")
    input_ids, labels = stitch_turns_decoder_only(turns, target_prompts, target_responses, eos_token_id)
    full_length = len(input_ids)
    ids = np.asarray(input_ids[:max_seq_len], dtype=np.int64)
    targets = np.asarray(labels[:max_seq_len], dtype=np.int64)
    # The collator ignores a document's first label, so a lone target there does not count.
    if not (targets[1:] != IGNORE_INDEX).any():
        raise ValueError(
            f"{where} has no loss-generating token within max_seq_len = {max_seq_len} ({full_length} tokens, "
            f"target_prompts={target_prompts!r}, target_responses={target_responses!r}); remove it, raise "
            "max_seq_len or change the target policies."
        )
    return ExampleTokens(Document(ids, targets), full_length)


class PadFreeFinetuningCollator:
    """Collate `(row, example)` items from `PackedDataset` into padding-free rows.

    Args:
        max_seq_len: per-example token limit (LLM-Foundry truncation).
        row_capacity: tokens per row; the batch has min(row_capacity, longest row rounded up to 8)
            columns.
        pad_token_id: filler id for padding.
        eos_token_id: appended to each example's last response if missing.
        target_prompts, target_responses: LLM-Foundry's target policies.
    """

    def __init__(
        self,
        max_seq_len: int,
        row_capacity: int,
        pad_token_id: int,
        eos_token_id: int | None,
        target_prompts: str = DEFAULT_TARGET_PROMPTS,
        target_responses: str = DEFAULT_TARGET_RESPONSES,
    ):
        self.max_seq_len = max_seq_len
        self.row_capacity = row_capacity
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.target_prompts = target_prompts
        self.target_responses = target_responses

    def document(self, example: Mapping[str, Any], index: int | None = None) -> ExampleTokens:
        return example_tokens(
            example, self.max_seq_len, self.target_prompts, self.target_responses, self.eos_token_id, index
        )

    def __call__(self, items: Sequence[tuple[int, Mapping[str, Any] | None]]) -> dict[str, Any]:
        """`items`: `(row, example)`; `(row, None)` for a row of padding (`packing.EMPTY_ROW`)."""
        rows: list[list[Document]] = [[] for _ in range(1 + max(row for row, _ in items))]
        for row, example in items:
            if example is not None:
                rows[row].append(self.document(example).document)
        longest = max(sum(len(doc.input_ids) for doc in docs) for docs in rows)
        row_len = min(self.row_capacity, max(1, -(-longest // _ROW_MULTIPLE)) * _ROW_MULTIPLE)
        return collate_rows(rows, row_len, self.pad_token_id)


class _IndexedStream:
    """Map-style view of a StreamingFinetuningDataset: `view[i]` is global sample i."""

    def __init__(self, dataset: StreamingDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return int(self.dataset.num_samples)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


def build_padfree_finetuning_dataloader(
    tokenizer: PreTrainedTokenizerBase | None,
    device_batch_size: int,
    dataset: dict[str, Any],
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = True,
    prefetch_factor: int | None = 2,
    persistent_workers: bool = True,
    timeout: int = 0,
    packing_mode: str = "budget",
    packing_buffer_size: int = 1024,
    max_tokens_per_row: int | None = None,
    **unknown: Any,
) -> DataSpec:
    """LLM-Foundry dataloader `padfree_finetuning` (see the module docstring for the YAML).

    Args:
        tokenizer: the run's tokenizer.
        device_batch_size: rows per device per step (`budget`) or examples per device per step
            (`flatten`).
        dataset: the `dataset:` section of LLM-Foundry's `finetuning` loader.
        num_workers, pin_memory, prefetch_factor, persistent_workers, timeout: as for
            `torch.utils.data.DataLoader` (with `num_workers: 0` the last three do not apply).
        drop_last: leave out an epoch's last step when it is not full, and its examples (see
            `packing.py`); by default every example is trained on.
        packing_mode: `budget` (fill a token budget) or `flatten` (keep examples per step).
        packing_buffer_size: how many examples the `budget` packer looks ahead.
        max_tokens_per_row: row capacity, at least `dataset.max_seq_len` (its default).

    Returns:
        A Composer `DataSpec`; a sample is an example.

    Raises:
        ValueError: for unknown options, `max_seq_len` < 2, `decoder_only_format` not true,
            LLM-Foundry's own packing options, a row capacity below `max_seq_len`, or an example
            with no tokens or no target (naming it).
    """
    if unknown:
        raise ValueError(
            f"padfree_finetuning got unknown option(s) {sorted(unknown)}; it accepts dataset, num_workers, "
            "drop_last, pin_memory, prefetch_factor, persistent_workers, timeout, packing_mode, "
            "packing_buffer_size and max_tokens_per_row."
        )
    if tokenizer is None:
        raise ValueError("padfree_finetuning needs the run's tokenizer (a top-level `tokenizer:` section).")
    dataset_cfg = copy.deepcopy(dict(dataset))
    row_capacity, target_prompts, target_responses = _validate(
        dataset_cfg, packing_mode, packing_buffer_size, max_tokens_per_row
    )
    max_seq_len = dataset_cfg["max_seq_len"]
    for key in _PADDING_KEYS:
        if key in dataset_cfg:
            log.warning(
                f"padfree_finetuning: dataset.{key} = {dataset_cfg[key]!r} has no effect: columns are always "
                f"trimmed to the longest row of the batch (rounded up to {_ROW_MULTIPLE}). The model computes on "
                "real tokens only, so its memory and speed do not depend on the padded shape."
            )

    # LLM-Foundry builds, tokenizes and filters the dataset exactly as its `finetuning` loader does
    # (preprocessing functions, remote files, streaming, chat templates, target checks); we keep
    # the dataset and do the batching. Its own DataLoader is never iterated.
    foundry_loader = build_finetuning_dataloader(
        tokenizer=tokenizer,
        device_batch_size=device_batch_size,
        dataset=dataset_cfg,
        drop_last=False,
        **FOUNDRY_BUILDER_WORKERS,
    ).dataloader
    assert isinstance(foundry_loader, DataLoader), f"LLM-Foundry returned {type(foundry_loader)}"
    base = foundry_loader.dataset
    if isinstance(base, StreamingDataset):
        base = _IndexedStream(base)
        ignored = {key: dataset_cfg[key] for key in _STREAM_ORDER_KEYS if dataset_cfg.get(key) is not None}
        if ignored:
            log.warning(
                f"padfree_finetuning: {', '.join(f'dataset.{k} = {v!r}' for k, v in ignored.items())} "
                f"{'has' if len(ignored) == 1 else 'have'} no effect: the stream is read map-style, each sample once "
                "per epoch, in the order of our packing sampler (dataset.shuffle and dataset.shuffle_seed); remove "
                f"{'it' if len(ignored) == 1 else 'them'}."
            )

    pad_token_id = tokenizer.pad_token_id  # LLM-Foundry set it to EOS if it was missing
    collator = PadFreeFinetuningCollator(
        max_seq_len, row_capacity, pad_token_id, tokenizer.eos_token_id, target_prompts, target_responses
    )
    lengths, truncated = _example_lengths(base, collator)
    if truncated:
        log.warning(
            f"padfree_finetuning: {truncated} of {len(lengths)} examples are longer than max_seq_len = "
            f"{max_seq_len} and are truncated to it (LLM-Foundry's rule: the first max_seq_len tokens are kept)."
        )
    replication = dataset_cfg.get("replication") or 1
    sampler = PackedBatchSampler(
        lengths,
        mode=packing_mode,
        device_batch_size=device_batch_size,
        row_capacity=row_capacity,
        buffer_size=packing_buffer_size,
        shuffle=bool(dataset_cfg.get("shuffle", False)),
        seed=int(dataset_cfg.get("shuffle_seed", 0)),
        num_replicas=dist.get_world_size() // replication,
        rank=dist.get_global_rank() // replication,
        replication=replication,
        drop_last=bool(drop_last),
    )
    loader = DataLoader(
        PackedDataset(base, sampler, truncated),
        batch_sampler=sampler,
        collate_fn=collator,
        **worker_options(num_workers, pin_memory, prefetch_factor, persistent_workers, timeout),
    )
    return padfree_data_spec(loader, samples="documents")


def _validate(
    dataset_cfg: dict[str, Any], packing_mode: str, packing_buffer_size: int, max_tokens_per_row: int | None
) -> tuple[int, str, str]:
    """Check our options and the keys LLM-Foundry would only warn about; returns (row capacity,
    target_prompts, target_responses)."""
    for key in _FOUNDRY_PACKING_KEYS:
        if key in dataset_cfg:
            raise ValueError(
                f"dataset.{key} = {dataset_cfg[key]!r} is LLM-Foundry's BinPackCollator option; padfree_finetuning "
                "packs by itself: remove it and choose packing_mode (budget or flatten) instead."
            )
    bad = sorted(set(dataset_cfg) - _FINETUNING_DATASET_KEYS)
    if bad:
        raise ValueError(
            f"dataset has unknown key(s) {bad} for padfree_finetuning; allowed: "
            f"{', '.join(sorted(_FINETUNING_DATASET_KEYS))}."
        )
    # The stream is read map-style, each sample once per epoch (see the module docstring), so the
    # options that make StreamingDataset sample some streams more or less often have no effect.
    if dataset_cfg.get("epoch_size") is not None:
        raise ValueError(
            f"dataset.epoch_size = {dataset_cfg['epoch_size']!r} is not supported by padfree_finetuning, which "
            "reads every sample of the streams once per epoch: remove it (set the run's length with max_duration)."
        )
    for name, stream in (dataset_cfg.get("streams") or {}).items():
        mixing = sorted(k for k in ("repeat", "proportion", "choose") if (stream or {}).get(k) is not None)
        if mixing:
            raise ValueError(
                f"dataset.streams.{name} sets {', '.join(mixing)}: stream mixing is not supported by "
                "padfree_finetuning, which reads every sample of every stream once per epoch. Remove it, or mix "
                "the data beforehand."
            )
    if dataset_cfg.get("decoder_only_format") is not True:
        raise ValueError(
            f"dataset.decoder_only_format = {dataset_cfg.get('decoder_only_format')!r}; padding-free packing is "
            "for decoder-only models: set it to true."
        )
    if dataset_cfg.get("local") is not None and dataset_cfg.get("remote") is None and "hf_name" not in dataset_cfg:
        raise ValueError(
            f"dataset.local = {dataset_cfg['local']!r} without dataset.remote: LLM-Foundry's finetuning loader only "
            "streams when remote is set; set remote to the MDS directory (a local path works) and local to a cache "
            "directory."
        )
    if "hf_name" in dataset_cfg and "shuffle" not in dataset_cfg:
        raise ValueError("dataset.shuffle is not set; LLM-Foundry's finetuning loader requires it: add shuffle: true.")
    max_seq_len = dataset_cfg["max_seq_len"] = whole_number(dataset_cfg.get("max_seq_len"), "dataset.max_seq_len")
    if max_seq_len < 2:
        raise ValueError(
            f"dataset.max_seq_len = {max_seq_len!r}; an example needs at least 2 tokens for one to have a target."
        )
    if packing_mode not in PACKING_MODES:
        raise ValueError(f"packing_mode = {packing_mode!r}; choose one of {', '.join(PACKING_MODES)}.")
    if not is_positive_int(packing_buffer_size):
        raise ValueError(f"packing_buffer_size = {packing_buffer_size!r}; use a positive integer (e.g. 1024).")
    row_capacity = max_seq_len if max_tokens_per_row is None else whole_number(max_tokens_per_row, "max_tokens_per_row")
    if row_capacity < max_seq_len:
        raise ValueError(
            f"max_tokens_per_row = {max_tokens_per_row!r} is below dataset.max_seq_len = {max_seq_len}: an example "
            "of max_seq_len tokens would not fit in a row. Raise it or leave it unset (= max_seq_len)."
        )
    target_prompts = str(dataset_cfg.get("target_prompts", DEFAULT_TARGET_PROMPTS)).lower()
    target_responses = str(dataset_cfg.get("target_responses", DEFAULT_TARGET_RESPONSES)).lower()
    return row_capacity, target_prompts, target_responses


def _example_lengths(base: Any, collator: PadFreeFinetuningCollator) -> tuple[np.ndarray, int]:
    """(N,) int64 token count of every example after truncation, and how many were truncated.

    Raises at the first example that cannot be trained on, naming its index.
    """
    lengths = np.empty(len(base), dtype=np.int64)
    truncated = 0
    for i in range(len(base)):
        tokens = collator.document(base[i], index=i)
        lengths[i] = len(tokens.document.input_ids)
        truncated += tokens.full_length > collator.max_seq_len
    return lengths, truncated
