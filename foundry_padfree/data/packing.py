"""Pack finetuning examples into rows: best-fit decreasing over a bounded buffer, planned per epoch.

The plan is made from example *lengths* only, in the main process, by `PackedBatchSampler`; the
DataLoader workers then load exactly the examples it names. So packing is deterministic for a
seed (independent of `num_workers`), and resuming is a matter of skipping whole planned steps.

Two modes (`packing_mode`):

- `budget` fills a token budget: every step gets `device_batch_size` rows of at most
  `max_tokens_per_row` tokens per device, filled with as many whole examples as fit. Rows are
  packed once (from the seeded example order; documents never see each other, so which examples
  share a row does not matter to the model) and the rows are reshuffled every epoch; without
  `shuffle`, rows come in the order of their first example, so steps follow the dataset's order
  (the packer, which starts each row with the longest example it can see, would put long
  examples first: a length curriculum, and an eval subset of the longest examples). The number
  of examples per step varies around `rows * capacity * efficiency / mean length`, so **this mode
  changes the number of optimizer steps per epoch** (fewer steps than the unpacked loader, each
  with more examples): set the schedule and `max_duration` in tokens or epochs, not batches.
- `flatten` keeps the examples per step of the unpacked loader (as HF's
  `DataCollatorWithFlattening`): every step gets `device_batch_size` examples per device (the
  same examples in the same order as the unpacked loader when `shuffle` is off; shuffled, the
  order comes from this module's own seeded permutation, not torch's), packed into as few rows as
  they need. The number of optimizer steps is unchanged; the number of rows per step varies.

No example is ever dropped or repeated, and the last step of an epoch may be smaller, unless
`drop_last` is set: then, as in a DataLoader, an epoch's last step is left out when it is not full
(`budget`: fewer than `device_batch_size` rows per device; `flatten`: fewer than
`device_batch_size` examples per device), and so are its examples for that epoch.

With several ranks, **every rank gets the same number of rows at every step**: under FSDP each
microbatch's forward and backward are collectives, so ranks with different microbatch counts would
wait on each other forever. A rank with fewer rows than the others at a step (the
last step of an epoch in `budget` mode, any step in `flatten` mode) gets rows of padding: no
example, no token, no sample; the model runs a microbatch of them as one target-less token, so
every rank's FSDP collectives line up (`EpochPlan.empty_rows` counts them; always 0 on one rank).
Before padding, the last `budget` step splits rows of several examples so that every rank gets
an example where there are enough. Composer's eval loop then has nothing to leave out: the
sampler's `total_size` is the number of examples.

Resumption: Composer saves `dataset.state_dict(num_samples)` with the number of samples (here,
examples) of the epoch already trained, summed over ranks. The plan is a pure function of the
lengths, options, seed and epoch, so that count identifies the next step exactly
(`PackedBatchSampler.load_state_dict`); a count that does not fall on a step boundary means the
data or options changed, and is an error.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from torch.utils.data import Dataset, DistributedSampler

from foundry_padfree.config import is_positive_int

PackingMode = Literal["budget", "flatten"]
EMPTY_ROW = -1  # the example index of a sampler key that stands for a row of padding
PACKING_MODES: tuple[str, ...] = ("budget", "flatten")
# Part of the plan's fingerprint: a checkpoint of a plan made by other rules is refused on resume.
_PLAN_VERSION = 2


def pack_rows(lengths: Sequence[int], capacity: int, buffer_size: int) -> list[list[int]]:
    """Pack items into rows of at most `capacity` tokens: best fit decreasing over a bounded buffer.

    Items enter a buffer of at most `buffer_size` items in the given order. A row starts with the
    longest buffered item and then keeps taking the longest buffered item that still fits (the
    best fit for the space left; among equal lengths, the one that entered first). The buffer is
    refilled after every placement; the row closes when nothing buffered fits. Deterministic.

    Args:
        lengths: token count of each item, each in [1, capacity].
        capacity: tokens per row.
        buffer_size: how many items the packer may look at ahead (>= 1). Larger packs tighter
            but moves items further from their position in the input order.

    Returns:
        The rows, in the order they were closed, as lists of positions into `lengths`.

    Raises:
        ValueError: for a length outside [1, capacity] or a buffer size below 1.
    """
    if buffer_size < 1:
        raise ValueError(f"packing_buffer_size = {buffer_size}; it must be at least 1 (1024 is a good default).")
    for position, n in enumerate(lengths):
        if not 1 <= n <= capacity:
            raise ValueError(
                f"item {position} has {n} tokens, outside [1, {capacity}]; items must be non-empty and "
                "truncated to the row capacity before packing."
            )
    # (length, -arrival, position): bisect finds the longest item that fits, oldest first on ties.
    buffer: list[tuple[int, int, int]] = []
    incoming = iter(range(len(lengths)))
    arrivals = itertools.count()

    def refill() -> None:
        while len(buffer) < buffer_size:
            position = next(incoming, None)
            if position is None:
                return
            bisect.insort(buffer, (lengths[position], -next(arrivals), position))

    refill()
    rows: list[list[int]] = []
    while buffer:
        row: list[int] = []
        free = capacity
        while (k := bisect.bisect_right(buffer, (free, 1, 0)) - 1) >= 0:
            n, _, position = buffer.pop(k)
            row.append(position)
            free -= n
            refill()
        rows.append(row)
    return rows


@dataclass(frozen=True)
class EpochPlan:
    """Which examples every rank gets at every step of one epoch.

    Attributes:
        batches: `batches[step][rank]` is that rank's rows, each a list of example indices; every
            rank has the same number of rows at a step, an empty list being a row of padding.
    """

    batches: list[list[list[list[int]]]]

    @property
    def empty_rows(self) -> int:
        """Rows of padding that give every rank as many rows as the others (0 on one rank)."""
        return sum(not row for step in self.batches for rows in step for row in rows)

    def examples_per_step(self) -> list[int]:
        """Examples (documents) in each step, summed over ranks: Composer's samples per batch."""
        return [sum(len(row) for rows in step for row in rows) for step in self.batches]


class PackedBatchSampler(DistributedSampler):
    """Yields, for each step of an epoch, the `(example_index, row)` keys of this rank's batch.

    A `DistributedSampler` subclass so that Composer calls `set_epoch` on it and accepts it with
    several ranks; the packing itself is described in the module docstring.

    Args:
        lengths: (N,) token count of every example after truncation, each in [1, row_capacity].
        mode: `budget` or `flatten`.
        device_batch_size: rows per device per step (`budget`) or examples per device per step
            (`flatten`).
        row_capacity: tokens per row (`max_tokens_per_row`).
        buffer_size: look-ahead of the packer in `budget` mode (see `pack_rows`).
        shuffle: shuffle examples (and, in `budget` mode, rows) with `seed`.
        seed: shuffle seed.
        num_replicas: ranks that get different data.
        rank: this rank, in [0, num_replicas).
        replication: ranks that get the same data (`dataset.replication`): Composer's sample count,
            summed over all ranks, counts each example that many times.
        drop_last: leave out an epoch's last step when it is not full.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        mode: str,
        device_batch_size: int,
        row_capacity: int,
        buffer_size: int,
        shuffle: bool,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        replication: int = 1,
        drop_last: bool = False,
    ):
        if mode not in PACKING_MODES:
            raise ValueError(f"packing_mode = {mode!r}; choose one of {', '.join(PACKING_MODES)}.")
        if not is_positive_int(device_batch_size):
            raise ValueError(f"device_batch_size = {device_batch_size!r}; it must be a positive integer.")
        if len(lengths) == 0:
            raise ValueError("the dataset has no examples; there is nothing to pack.")
        super().__init__(lengths, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.replication = replication
        self.mode = mode
        self.device_batch_size = device_batch_size
        self.row_capacity = row_capacity
        self.buffer_size = buffer_size
        if not is_positive_int(buffer_size):
            raise ValueError(f"packing_buffer_size = {buffer_size!r}; use a positive integer (1024 is a good default).")
        # Checked here rather than at the first epoch, so that a bad length fails at build time.
        too_long = np.flatnonzero((self.lengths < 1) | (self.lengths > row_capacity))
        if len(too_long):
            i = int(too_long[0])
            raise ValueError(
                f"example {i} has {int(self.lengths[i])} tokens, outside [1, {row_capacity}] "
                "(max_tokens_per_row); truncate examples to max_seq_len <= max_tokens_per_row."
            )
        self.drop_last = bool(drop_last)
        self._budget_rows: list[list[int]] | None = None
        self._cached_plan: tuple[int, EpochPlan] | None = None
        self._resume_examples: int | None = None
        if len(self) == 0:
            unit = "rows" if mode == "budget" else "examples"
            raise ValueError(
                f"drop_last is set and the {len(self.lengths)} examples fill no whole step ({self._units()} "
                f"{unit}, {self._units_per_step()} per step: {num_replicas} ranks x device_batch_size "
                f"{device_batch_size}), so every step would be dropped; set drop_last: false or lower "
                "device_batch_size."
            )

    # --- the plan -------------------------------------------------------------------------
    def _example_order(self, epoch: int | None) -> np.ndarray:
        """(N,) int64 example indices in reading order; `epoch=None` for the epoch-independent one."""
        if not self.shuffle:
            return np.arange(len(self.lengths))
        key = [self.seed] if epoch is None else [self.seed, epoch]
        return np.random.default_rng(key).permutation(len(self.lengths))

    def budget_rows(self) -> list[list[int]]:
        """`budget` mode: all rows of example indices, packed once from the seeded order."""
        if self._budget_rows is None:
            order = self._example_order(None)
            rows = pack_rows(self.lengths[order].tolist(), self.row_capacity, self.buffer_size)
            self._budget_rows = [[int(order[p]) for p in row] for row in rows]
        return self._budget_rows

    def plan(self, epoch: int) -> EpochPlan:
        """The plan of `epoch` (cached for the last epoch asked)."""
        if self._cached_plan is not None and self._cached_plan[0] == epoch:
            return self._cached_plan[1]
        if self.mode == "budget":
            plan = self._plan_budget(epoch)
        else:
            plan = self._plan_flatten(epoch)
        self._cached_plan = (epoch, plan)
        return plan

    def _plan_budget(self, epoch: int) -> EpochPlan:
        rows = self.budget_rows()
        if self.shuffle:
            rows = [rows[k] for k in np.random.default_rng([self.seed, epoch, 1]).permutation(len(rows))]
        else:  # the dataset's order, not the packer's (longest first)
            rows = sorted(rows, key=min)
        step_rows = self._units_per_step()
        rows = rows[: len(self) * step_rows]  # without the last step when drop_last leaves it out
        return EpochPlan([_share_rows(rows[start : start + step_rows], self.num_replicas)
                          for start in range(0, len(rows), step_rows)])  # fmt: skip

    def _plan_flatten(self, epoch: int) -> EpochPlan:
        step_examples = self._units_per_step()
        order = self._example_order(epoch).tolist()[: len(self) * step_examples]
        batches = []
        for start in range(0, len(order), step_examples):
            shares = []
            for share in _split_evenly(order[start : start + step_examples], self.num_replicas):
                rows = pack_rows(self.lengths[share].tolist(), self.row_capacity, max(1, len(share)))
                shares.append([[share[p] for p in row] for row in rows])
            batches.append(_even_out(shares))
        return EpochPlan(batches)

    @property
    def total_size(self) -> int:
        """Examples the plan hands out over all ranks in an epoch: the dataset, each example once.

        Composer's eval loop reads `total_size - len(dataset)` as the number of padded samples to
        leave out of the metrics (`DistributedSampler` repeats examples to even out the ranks); the
        plan pads with rows without examples instead, so there are none.
        """
        return len(self.lengths)  # with drop_last the eval loop does not read it

    @total_size.setter
    def total_size(self, value: int) -> None:
        pass  # `DistributedSampler.__init__` assigns its own padded size; the plan decides instead

    def __len__(self) -> int:
        """Steps per epoch: the same every epoch (Composer reads it once)."""
        full, rest = divmod(self._units(), self._units_per_step())
        return full if self.drop_last else full + (rest > 0)

    def _units(self) -> int:
        """What steps are made of in an epoch: rows (`budget`) or examples (`flatten`)."""
        return len(self.budget_rows()) if self.mode == "budget" else len(self.lengths)

    def _units_per_step(self) -> int:
        return self.num_replicas * self.device_batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """Each step's `(example_index, row)` keys; a row of padding is one key `(EMPTY_ROW, row)`."""
        plan = self.plan(self.epoch)
        start = self._start_step(plan)
        for step in plan.batches[start:]:
            yield [(i, r) for r, row in enumerate(step[self.rank]) for i in (row or [EMPTY_ROW])]

    # --- resumption -----------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A digest of everything the plan depends on except the epoch."""
        digest = hashlib.sha256(self.lengths.tobytes())
        buffer_size = self.buffer_size if self.mode == "budget" else None  # flatten does not read it
        options = (self.mode, self.device_batch_size, self.row_capacity, buffer_size, self.shuffle,
                   self.seed, self.num_replicas, _PLAN_VERSION)  # fmt: skip
        if self.drop_last:  # appended, so that the plans without it keep their fingerprints
            options += ("drop_last",)
        digest.update(repr(options).encode())
        return digest.hexdigest()[:16]

    def state_dict(self, num_samples: int) -> dict[str, Any]:
        """What Composer stores: examples of the current epoch already trained (all ranks; Composer's
        `num_samples` counts replicated ranks' examples once per rank)."""
        return {"examples_in_epoch": int(num_samples) // self.replication, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the step after `state['examples_in_epoch']` examples of the next epoch iterated."""
        if state.get("fingerprint") != self.fingerprint():
            raise ValueError(
                f"the checkpoint's packing plan fingerprint {state.get('fingerprint')!r} differs from this "
                f"run's {self.fingerprint()!r}: the dataset, tokenizer, max_seq_len, packing options, "
                "seed, number of ranks or foundry_padfree's packing rules changed, so the exact next batch "
                "cannot be restored. Resume "
                "with the original settings, or load the checkpoint without its dataloader state."
            )
        self._resume_examples = int(state["examples_in_epoch"])

    def _start_step(self, plan: EpochPlan) -> int:
        if self._resume_examples is None:
            return 0
        examples, self._resume_examples = self._resume_examples, None
        boundaries = np.concatenate([[0], np.cumsum(plan.examples_per_step())])
        step = int(np.searchsorted(boundaries, examples))
        if step >= len(boundaries) or boundaries[step] != examples:
            raise ValueError(
                f"the checkpoint is {examples} examples into epoch {self.epoch}, which is not a step "
                f"boundary of the packing plan (steps end at {boundaries[1:6].tolist()}...); the data or "
                "packing options changed since the checkpoint."
            )
        return step


class PackedDataset(Dataset):
    """Map-style view of a dataset for `PackedBatchSampler` keys, carrying the resume state.

    `dataset[(example_index, row)]` is `(row, base[example_index])`: the collator learns each
    example's row from the sampler's plan. `dataset[(EMPTY_ROW, row)]` is `(row, None)`: a row of
    padding. Composer checkpoints `state_dict` of the DataLoader's
    dataset, which this forwards to the sampler.

    Args:
        base: the examples (an HF `datasets.Dataset` or a map-style streaming dataset view).
        sampler: the batch sampler that plans this dataset's batches.
        truncated_examples: how many examples were truncated to `max_seq_len` (for reports).
    """

    def __init__(self, base: Any, sampler: PackedBatchSampler, truncated_examples: int = 0):
        self.base = base
        self.sampler: PackedBatchSampler | None = sampler
        self.truncated_examples = truncated_examples

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any]:
        example_index, row = key
        return row, None if example_index == EMPTY_ROW else self.base[example_index]

    def state_dict(self, num_samples: int, from_beginning: bool = True) -> dict[str, Any]:
        if not from_beginning:
            raise ValueError("PackedDataset.state_dict counts samples from the start of the epoch only.")
        assert self.sampler is not None, "state_dict is called on the main process copy, which has the sampler"
        return self.sampler.state_dict(num_samples)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.sampler is not None, "load_state_dict is called on the main process copy, which has the sampler"
        self.sampler.load_state_dict(state)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers only load examples; the plan stays in the main process.
        return {**self.__dict__, "sampler": None}


def _split_evenly(items: list[Any], parts: int) -> list[list[Any]]:
    """`parts` contiguous pieces whose sizes differ by at most one (the first ones get the extra)."""
    size, extra = divmod(len(items), parts)
    bounds = [0]
    for p in range(parts):
        bounds.append(bounds[-1] + size + (p < extra))
    return [items[bounds[p] : bounds[p + 1]] for p in range(parts)]


def _share_rows(rows: list[list[int]], world: int) -> list[list[list[int]]]:
    """Give each of `world` ranks a contiguous share of one step's rows, as many rows each.

    A full step has `world * device_batch_size` rows and is cut evenly. The last step of an epoch
    may have fewer rows than ranks: then rows with several examples are broken apart while that
    gives a rank without a row an example. The shares are then evened out with rows of padding.
    """
    rows = [list(row) for row in rows]
    while len(rows) < world and any(len(row) > 1 for row in rows):
        most = max(range(len(rows)), key=lambda k: len(rows[k]))
        rows.append([rows[most].pop()])
    return _even_out(_split_evenly(rows, world))


def _even_out(shares: list[list[list[int]]]) -> list[list[list[int]]]:
    """Each rank's rows, padded with empty rows to the most any rank has (at least one)."""
    width = max(1, *(len(rows) for rows in shares))
    return [rows + [[] for _ in range(width - len(rows))] for rows in shares]
