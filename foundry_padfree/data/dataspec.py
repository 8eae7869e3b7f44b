"""Composer `DataSpec` for padding-free batches: samples and tokens that mean what they say.

Composer reads two numbers from every batch (and microbatch):

- samples (`get_num_samples_in_batch`): `timestamp.sample`, `sp` durations, samples/s, and the
  sample count `dataset.state_dict` gets for resumption. For `padfree_finetuning` a sample is an
  example (document), counted from `sequence_id`; a packed row of five examples is five samples.
  For `padfree_text` a sample stays a row of concatenated text, as in LLM-Foundry's `text` loader,
  because StreamingDataset resumes from the number of rows it has served.
- tokens (`get_num_tokens_in_batch`): `{'total': real tokens, 'loss_generating': targets}` from
  the per-row lists of the batch, so `SpeedMonitor` tokens/s and token durations count real tokens,
  and `accumulate_train_batch_on_tokens` weights each microbatch by its share of the targets
  (which makes microbatched gradients equal to whole-batch ones).

All counts come from host-side lists or CPU tensors (Composer counts before moving the batch),
so none of them synchronizes with the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from composer.core import DataSpec


def count_documents(batch: Mapping[str, Any]) -> int:
    """Documents in a batch: sum over rows of (largest `sequence_id` + 1); -1 marks padding."""
    sequence_id = batch["sequence_id"]
    return int((sequence_id.max(dim=1).values + 1).clamp(min=0).sum())


def count_rows(batch: Mapping[str, Any]) -> int:
    """Rows of a batch (dim 0 of `input_ids`)."""
    return int(batch["input_ids"].shape[0])


def count_tokens(batch: Mapping[str, Any]) -> dict[str, int]:
    """`{'total': real tokens, 'loss_generating': tokens with a target}`, from the per-row lists
    `total_tokens` / `loss_generating_tokens` that `collate_rows` adds.

    Raises:
        KeyError: for a batch without those lists (not made by a padfree collator).
    """
    for key in ("total_tokens", "loss_generating_tokens"):
        if key not in batch:
            raise KeyError(f"batch has no {key!r} (keys: {sorted(batch)}); build batches with a padfree collator.")
    return {"total": int(sum(batch["total_tokens"])), "loss_generating": int(sum(batch["loss_generating_tokens"]))}


def padfree_data_spec(dataloader: Iterable, samples: Literal["documents", "rows"]) -> DataSpec:
    """Wrap a padfree DataLoader in a `DataSpec` with the counts described in the module docstring.

    Args:
        dataloader: yields batches made by `collate_rows`.
        samples: what a sample is: `documents` (finetuning examples) or `rows` (text).
    """
    if samples not in ("documents", "rows"):
        raise ValueError(f"samples = {samples!r}; use 'documents' or 'rows'.")
    return DataSpec(
        dataloader=dataloader,
        get_num_samples_in_batch=count_documents if samples == "documents" else count_rows,
        get_num_tokens_in_batch=count_tokens,
    )


def worker_options(
    num_workers: int, pin_memory: bool, prefetch_factor: int | None, persistent_workers: bool, timeout: int
) -> dict[str, Any]:
    """`torch.utils.data.DataLoader` worker keywords as a loader's YAML gives them; with
    `num_workers: 0` the two that need workers are turned off (DataLoader rejects them otherwise)."""
    return {
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "prefetch_factor": prefetch_factor if num_workers > 0 else None,
        "persistent_workers": persistent_workers and num_workers > 0,
        "timeout": timeout,
    }


# For LLM-Foundry's own dataloader builders, which we call only for the dataset they build: their
# DataLoader is never iterated, so it gets no workers.
FOUNDRY_BUILDER_WORKERS = worker_options(
    num_workers=0, pin_memory=False, prefetch_factor=None, persistent_workers=False, timeout=0
)


def whole_number(value: Any, name: str) -> int:
    """`value` as an int: an int, or a float with no fractional part (as LLM-Foundry reads
    `max_seq_len`: YAML and CLI overrides may give `2048.0`).

    Raises:
        ValueError: for anything else, naming `name` and the value.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (isinstance(value, float) and not value.is_integer())
    ):
        raise ValueError(f"{name} = {value!r}; it must be a whole number of tokens, e.g. 2048.")
    return int(value)
