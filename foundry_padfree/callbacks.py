"""Verification callbacks: show, on live training batches, that training is really padding-free.

Shape legend: B batch rows, S row length, T real tokens, V vocabulary.

Four Composer callbacks, registered in LLM-Foundry's `callbacks` registry (entry points
`llmfoundry_callbacks`). Each logs through Composer's loggers under `padfree/<name>/...`, keeps its
latest values in `.summary`, and with `strict: true` raises `PadFreeCheckError` instead of only
logging. On several ranks each rank checks its own batch; `passed` and the largest differences
are taken over all ranks (Composer's loggers write rank 0's metrics), and with `strict: true`
every rank raises when a check failed on any of them. A microbatch of padding only (rows of
empty text samples) is not audited, and when any rank's batch is padding only the probes skip
that batch on every rank. None of them writes to the batch or the training state: probe
forwards run on copies, under `torch.no_grad()`, in eval mode (restored after), without
randomness. On batches where their interval is not due they do nothing but compare two integers.
Their run-long counters (`forwards_audited`, `checks_failed`, `probes`, `probes_failed`) and
`.summary` are saved in Composer's checkpoints, so a resumed run counts on from where it stopped.
An option a callback does not take raises a `ValueError` naming it, the closest option it takes
and the callbacks that take it.

YAML (`callbacks:` section; `interval` counts optimizer steps: a batch is due when its index in
the run is a multiple of it, the first batch of a run from scratch included):

    padfree_audit:     {interval: 100, strict: false}
    padfree_isolation: {interval: 500, strict: false, atol: 0.0, max_rows: 2}
    padfree_parity:    {interval: 500, strict: false, max_rows: 2, loss_atol: null, logits_rtol: null}
    padfree_stats:     {interval: 10}

- `padfree_audit` checks a due batch and the training forward that runs on it: document
  boundaries, positions and labels are consistent (and `loss_generating_tokens`/`total_tokens`,
  which Composer uses to weigh microbatches and count tokens/s, match what the model does); the
  model unpadded exactly once; the embedding computed on the batch's `[T]` real-token ids
  (compared by value; a hooked or wrapped embedding, such as NEFTune's, which the model gives
  stock Llama's re-padded `[B,S]` ids on purpose, is reported as `embedding_padded`, not failed);
  every layer's attention ran the varlen kernel once, on `[T,...]` tokens, with the very same
  `cu_seqlens` tensor that the one unpad built; documents, positions and the number of loss
  targets are the ones the batch describes. Each microbatch's forward is checked; the batch's
  metrics are logged once, at its end. The forward is observed with hooks installed for that
  forward only; layers compiled by `compile_layers` are observed at their compiled calls.
  LLM-Foundry's own `text` collator counts the labels at document starts in
  `loss_generating_tokens`, which the model accounts for; they are logged
  (`boundary_targets_counted`), not failed.
- `padfree_isolation` perturbs the tokens of one document of a live batch (the first of the row
  with the most documents, so later documents of the same row are downstream of it) and compares
  every other document's logits: max |delta| must be <= `atol` (exactly 0 with deterministic
  kernels, the default).
- `padfree_parity` runs a live batch through the model (in the training precision) and through
  stock HF `LlamaForCausalLM` with the same weights in fp32 on the conventional padded layout
  (one document per row, right padding), and compares loss and logits (`logits_rtol` is max
  |delta| over the largest |logit| of the reference). Default tolerances: in fp32
  `loss_atol=1e-4, logits_rtol=1e-4` (1e-2 on a GPU whose fp32 products run in TF32, as
  Composer sets them by default); in bf16/fp16 precisions or with 16-bit weights, twice stock
  HF's own difference from its fp32 self, measured on the same rows in the training precision
  and the model's weight dtype, and at least 1e-2. Rows without a target compare logits only.
  The reference runs the documents in groups of at most 4,096 padded positions (a longer
  document alone), so its fp32 logits stay bounded however the documents' lengths are mixed.
- `padfree_stats` logs real-token fraction, padding positions skipped, the padding a
  one-document-per-row padded batch would have had, documents per row, max_seqlen, and, timing the
  due batch (with a device sync at its start and end), real tokens/s, FLOP/s and MFU from the
  model's real-token FLOP count.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from composer.callbacks.speed_monitor import get_gpu_flops_available
from composer.core import Callback, Precision, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist, model_eval_mode
from torch import Tensor, nn

import foundry_padfree.modeling as modeling
from foundry_padfree.attention import BACKENDS
from foundry_padfree.composer_model import ComposerPadFreeCausalLM, padding_only
from foundry_padfree.config import check_flag, is_positive_int
from foundry_padfree.loss import linear_dtype
from foundry_padfree.varlen import IGNORE_INDEX, Unpadded

log = logging.getLogger(__name__)

# Inputs a probe forward passes on; labels only where the probe needs a loss.
_PROBE_KEYS = ("input_ids", "attention_mask", "sequence_id", "position_ids")
# Padded positions (documents x their longest length) per forward of the parity reference. A
# group's passes hold a few fp32 `[positions, V]` tensors at once (the logits, the loss's
# log-softmax, the compared tokens'), each 2 GiB at this size for Llama 3's vocabulary of 128,256.
_REFERENCE_CELLS = 4096
# Prefixes FSDP and activation checkpointing add to parameter names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


class PadFreeCheckError(RuntimeError):
    """A verification callback with `strict: true` found the run not padding-free or not exact."""


# ---------------------------------------------------------------------------------------------
# Reading a batch on the host, independently of the model's own `unpad`: the audit's oracle.


class Document(NamedTuple):
    row: int
    start: int  # first column of the document in its row
    end: int  # one past its last column

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class BatchDocs:
    """The documents of a `[B,S]` batch as the batch itself describes them, and what is wrong with it."""

    docs: list[Document]
    shape: tuple[int, int]
    problems: list[str] = field(default_factory=list)
    token_ids: np.ndarray | None = None  # (T,) the documents' token ids, in row-major order
    targets_per_row: list[int] | None = None  # next-token targets inside documents, when labels exist
    # Labels at document starts after a row's first column that `loss_generating_tokens` counts, as
    # LLM-Foundry's `text` collator does (`labels[:, 1:] != -100`): targets across a boundary,
    # which the model never trains on (its loss is then taken over the given count).
    boundary_targets_counted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(d.length for d in self.docs)

    @property
    def doc_lens(self) -> tuple[int, ...]:
        return tuple(d.length for d in self.docs)

    def positions(self) -> np.ndarray:
        """(T,) int64: position of each real token in its document, in row-major token order."""
        return np.concatenate([np.arange(d.length) for d in self.docs]) if self.docs else np.zeros(0, np.int64)


def read_batch(batch: Mapping[str, Any]) -> BatchDocs:
    """Find the documents of a batch and check that its keys agree with each other.

    Args:
        batch: `input_ids` (B, S) and any of `attention_mask` (B, S; 1 real), `sequence_id` (B, S;
            0..k-1 per row, -1 on padding; where `attention_mask` is 0 any value, as LLM-Foundry's
            `text` collator leaves it), `position_ids` (B, S; restart at 0 per document),
            `labels` (B, S; unshifted, IGNORE_INDEX = no target), per-row lists `total_tokens` and
            `loss_generating_tokens`.

    Returns:
        The documents, in row-major order, and a list of human-readable problems (empty if none).
    """
    ids = batch["input_ids"]
    B, S = ids.shape
    host = {k: batch[k].detach().cpu().numpy() for k in (*_PROBE_KEYS, "labels") if batch.get(k) is not None}
    problems: list[str] = []
    real = np.ones((B, S), dtype=bool)
    if "attention_mask" in host:
        real &= host["attention_mask"] != 0
    if "sequence_id" in host:
        seq = host["sequence_id"]
        real &= seq >= 0
        # A padding sequence_id (-1) on a token the mask calls real drops it; the other way round is
        # how LLM-Foundry's `text` collator pads (the model, like this reader, takes both).
        if "attention_mask" in host and ((host["attention_mask"] != 0) & (seq < 0)).any():
            r = int(np.argwhere((host["attention_mask"] != 0) & (seq < 0))[0][0])
            problems.append(f"row {r}: sequence_id is -1 (padding) on tokens attention_mask marks as real")

    docs: list[Document] = []
    for r in range(B):
        cols = np.flatnonzero(real[r])
        if len(cols) == 0:  # a row of padding only costs nothing once unpadded: no documents
            continue
        if cols[-1] - cols[0] + 1 != len(cols):
            problems.append(f"row {r} has padding between real tokens")
            continue
        lo, hi = int(cols[0]), int(cols[-1]) + 1
        new_doc = np.zeros(hi - lo, dtype=bool)
        new_doc[0] = True
        if "sequence_id" in host:
            seq_r = host["sequence_id"][r, lo:hi]
            if (np.diff(seq_r) < 0).any():
                problems.append(f"row {r}: sequence_id decreases")
            new_doc[1:] |= np.diff(seq_r) != 0
        if "position_ids" in host:
            pos_r = host["position_ids"][r, lo:hi]
            if "sequence_id" in host and not np.array_equal(pos_r[1:] == 0, new_doc[1:]):
                problems.append(f"row {r}: position_ids do not restart exactly where sequence_id changes")
            new_doc[1:] |= pos_r[1:] == 0
        starts = lo + np.flatnonzero(new_doc)
        ends = np.append(starts[1:], hi)
        row_docs = [Document(r, int(s), int(e)) for s, e in zip(starts, ends)]
        if "position_ids" in host:
            for d in row_docs:
                if not np.array_equal(host["position_ids"][r, d.start : d.end], np.arange(d.length)):
                    problems.append(f"row {r}: position_ids of the document at columns {d.start}..{d.end - 1} "
                                    "are not 0, 1, 2, ...")  # fmt: skip
                    break
        docs.extend(row_docs)

    targets_per_row = None
    boundary_counted = 0
    if "labels" in host:
        labels = host["labels"]
        if (labels[~real] != IGNORE_INDEX).any():
            r, c = (int(v) for v in np.argwhere((labels != IGNORE_INDEX) & ~real)[0])
            problems.append(f"labels[{r}, {c}] = {int(labels[r, c])} is on padding; padding labels must be -100")
        targets_per_row, boundary_per_row = [0] * B, [0] * B
        for d in docs:
            targets_per_row[d.row] += int((labels[d.row, d.start + 1 : d.end] != IGNORE_INDEX).sum())
            boundary_per_row[d.row] += int(d.start > 0 and labels[d.row, d.start] != IGNORE_INDEX)
        # Composer weighs microbatches by this count (accumulate_train_batch_on_tokens). The model
        # divides its summed loss by it, so LLM-Foundry's count (with the boundary labels) is
        # consistent too; any other count weighs microbatches wrongly.
        if isinstance(batch.get("loss_generating_tokens"), list):
            for r, given in enumerate(batch["loss_generating_tokens"]):
                actual, boundary = targets_per_row[r], boundary_per_row[r]
                if int(given) == actual + boundary and boundary:
                    boundary_counted += boundary
                elif int(given) != actual:
                    foundry = f" or {actual + boundary} with the labels at document starts" if boundary else ""
                    problems.append(
                        f"loss_generating_tokens[{r}] = {int(given)} but the model trains on {actual} targets in "
                        f"row {r}{foundry}"
                    )
                    break
    # SpeedMonitor's tokens/s counts these; padding in them would inflate it.
    if isinstance(batch.get("total_tokens"), list):
        real_per_row = real.sum(axis=1)
        for r, given in enumerate(batch["total_tokens"]):
            if int(given) != int(real_per_row[r]):
                problems.append(f"total_tokens[{r}] = {int(given)} but row {r} has {int(real_per_row[r])} real tokens")
                break
    token_ids = np.concatenate([host["input_ids"][d.row, d.start : d.end] for d in docs]) if docs else None
    return BatchDocs(docs, (B, S), problems, token_ids, targets_per_row, boundary_counted)


# ---------------------------------------------------------------------------------------------
# Shared plumbing.


def _composer_model(state: State) -> ComposerPadFreeCausalLM:
    model = state.model
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model  # type: ignore[return-value]


def _check_model(state: State, callback: str) -> None:
    model = _composer_model(state)
    if not isinstance(model, ComposerPadFreeCausalLM):
        raise TypeError(
            f"{callback} verifies padfree_causal_lm models; this run's model is {type(model).__name__}. Set "
            f"`model.name: padfree_causal_lm`, or remove {callback} from `callbacks`."
        )


def _options(cls: type[Callback]) -> list[str]:
    """The YAML options a callback's constructor takes."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]


def _reject_unknown_options(unknown: Mapping[str, Any], cls: type[Callback]) -> None:
    """A ValueError naming each of `unknown`, the closest option callback `cls` takes, and the
    callbacks that do take it: LLM-Foundry's `build_callback` passes a YAML section as keyword
    arguments, so without this a misplaced option (`strict` on `padfree_stats`) is a bare TypeError."""
    if not unknown:
        return
    name = next(n for n, c in _CALLBACKS.items() if c is cls)
    known = _options(cls)
    problems = []
    for option in sorted(unknown):
        close = difflib.get_close_matches(option, known, n=1)
        takers = [n for n, c in _CALLBACKS.items() if option in _options(c)]
        if close:
            problems.append(f"{option}: did you mean {close[0]!r}?")
        elif takers:
            problems.append(f"{option}: an option of {', '.join(takers)}, not of {name}")
        else:
            problems.append(f"{option}: not an option of {name}")
    raise ValueError(
        f"unknown option(s) for {name}: {'; '.join(problems)}. {name} takes {', '.join(known)}; rename or "
        "remove the others."
    )


class _RunState:
    """Composer's checkpoints hold what a callback's `state_dict` returns (Composer's `Serializable`
    gives `{}`): here its `.summary`, run-long counters included, and the once-per-run warnings
    already given, so a run resumed from a checkpoint counts on instead of starting again from 0."""

    summary: dict[str, Any]
    _run_flags: tuple[str, ...] = ()  # attributes that say a once-per-run warning was given

    def state_dict(self) -> dict[str, Any]:
        return {"summary": dict(self.summary), **{flag: getattr(self, flag) for flag in self._run_flags}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A checkpoint written before the callbacks had any state holds {}: the counts start at 0 then.
        self.summary.update(state.get("summary", {}))
        for flag in self._run_flags:
            setattr(self, flag, state.get(flag, getattr(self, flag)))


def _interval(value: int, name: str) -> int:
    if not is_positive_int(value):
        raise ValueError(f"{name}: interval={value!r} must be a positive number of batches.")
    return value


def _max_rows(value: int, name: str) -> int:
    if not is_positive_int(value):
        raise ValueError(f"{name}: max_rows={value!r} must be >= 1.")
    return value


def _tolerance(value: float, name: str, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{name}: {option}={value!r} must be a finite number >= 0.")
    return float(value)


def _due(state: State, interval: int, batch_finished: bool = False) -> bool:
    """Whether the current batch (0-based) is a multiple of `interval`. At `BATCH_END` Composer has
    already counted the current batch in `timestamp.batch`."""
    index = int(state.timestamp.batch) - int(batch_finished)
    return index % interval == 0


def _every_rank_has_documents(state: State, docs: BatchDocs) -> bool:
    """Whether every rank's batch has a document to probe. A batch of padding only (rows of empty
    text samples) has none; as the probes run forwards on every rank or on none (FSDP gathers
    weights on all ranks), they are then skipped on all, with a warning."""
    per_rank, _ = _across_ranks(state, int(not docs.docs))
    missing = [r for r, n in enumerate(per_rank) if n]
    if missing:
        log.warning("the batch of rank(s) %s is padding only: the probes skip this batch on every rank.", missing)
    return not missing


def _probe_batch(state: State, rows: list[int], with_labels: bool = False) -> dict[str, Tensor]:
    """The probe rows of the batch, on the training device. At `BATCH_END` Composer's `state.batch`
    may still be on the host (it moves microbatches one at a time); the wrapped model would move
    its inputs itself, an unwrapped reference model would not."""
    batch = state.batch
    keys = _PROBE_KEYS + (("labels",) if with_labels else ())
    index = torch.tensor(rows, device=batch["input_ids"].device)
    probe = {k: batch[k].index_select(0, index) for k in keys if batch.get(k) is not None}
    return state.device.batch_to_device(probe)


def _pick_rows(docs: BatchDocs, max_rows: int) -> tuple[list[int], list[Document]]:
    """The rows a probe uses, the row with the most documents first, then the other rows in order,
    `max_rows` at most; and the documents in those rows."""
    if not docs.docs:
        raise ValueError(f"the batch has no documents to probe: {'; '.join(docs.problems)}")
    per_row = np.bincount([d.row for d in docs.docs], minlength=docs.shape[0])
    first = int(per_row.argmax())
    others = [r for r in range(docs.shape[0]) if r != first and per_row[r] > 0]
    rows = [first, *others[: max_rows - 1]]
    return rows, [d for d in docs.docs if d.row in rows]


@contextlib.contextmanager
def _probe_mode(state: State) -> Iterator[None]:
    """No gradients, eval mode (restored after), the training precision."""
    with torch.no_grad(), model_eval_mode(state.model), get_precision_context(state.precision, state.precision_config):
        yield


class _ProbeClock:
    """Seconds spent in probe forwards, so `padfree_stats` can leave them out of a batch's time
    whichever order the callbacks run in at `BATCH_END`."""

    seconds = 0.0

    @classmethod
    @contextlib.contextmanager
    def measure(cls, state: State) -> Iterator[None]:
        _sync(state)  # the training step's queued kernels belong to the step, not the probe
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync(state)
            cls.seconds += time.perf_counter() - start


def _report(callback: str, problems: list[str], failed_ranks: list[int], strict: bool) -> None:
    """Fail (`strict`) or warn when a check failed on any rank: every rank raises, so that none is
    left waiting in a collective; each gives its own problems or names the ranks that failed."""
    if not failed_ranks:
        return
    if problems:
        message = f"{callback}: " + "; ".join(problems)
    else:
        message = f"{callback}: checks failed on rank(s) {failed_ranks}; their logs say which"
    if strict:
        raise PadFreeCheckError(message)
    if problems or dist.get_global_rank() == 0:
        log.warning(message)


def _across_ranks(state: State, failures: int, maxima: tuple[float, ...] = ()) -> tuple[list[int], tuple[float, ...]]:
    """Each rank's count of failed checks, and `maxima` maxed over all ranks: Composer's loggers
    write rank 0's metrics, and each rank checks its own batch. Every rank calls this at the same
    event (a collective on more than one rank)."""
    world, rank = dist.get_world_size(), dist.get_global_rank()
    if world == 1:
        return [failures], maxima
    values = torch.zeros(world + len(maxima), dtype=torch.float32)
    values[rank] = failures  # the other ranks' slots are 0 here: MAX gathers every rank's count
    # NaN as +inf: a MAX reduction may drop NaN, and a NaN difference is the largest there is.
    values[world:] = torch.tensor(maxima, dtype=torch.float32).nan_to_num(nan=float("inf"))
    values = state.device.tensor_to_device(values)
    dist.all_reduce(values, reduce_operation="MAX")
    values = values.cpu()
    return [int(v) for v in values[:world]], tuple(float(v) for v in values[world:])


# ---------------------------------------------------------------------------------------------
# padfree_audit


@dataclass
class _ForwardRecord:
    unpads: list[Unpadded] = field(default_factory=list)
    embed_inputs: list[Tensor] = field(default_factory=list)  # the token ids the embedding computed on
    # Why the embedding was called as a module (a hook, a wrapper), when it was: None for the plain one.
    embedding_note: str | None = None
    layer_inputs: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)  # (layer, x shape)
    # layer, backend, meta (None: not one the forward's backend prepared), q's shape and dtype
    attends: list[tuple[int, str, Any, tuple[int, ...], torch.dtype]] = field(default_factory=list)
    prepared: list[Any] = field(default_factory=list)  # the metadata `Backend.prepare` returned


@dataclass
class _BatchTotals:
    """What the audited forwards (microbatches) of one batch saw on this rank, logged once at the
    batch's end: loggers keep one value per key and step, so a value per microbatch would keep
    only the last microbatch's."""

    forwards: int = 0
    real_tokens: int = 0
    documents: int = 0
    boundary_targets_counted: int = 0
    unpad_calls: list[int] = field(default_factory=list)  # per forward
    varlen_layers: list[int] = field(default_factory=list)  # per forward
    embedding_padded: bool = False  # an embedding computed on `[B,S]` ids in some forward
    problems: list[str] = field(default_factory=list)


def _worst(per_forward: list[int], expected: int) -> int:
    """The count farthest from `expected` (the larger on a tie): one forward that unpadded twice,
    or ran the kernel in fewer layers, shows in the batch's value instead of being averaged away."""
    return max(per_forward, key=lambda n: (abs(n - expected), n))


class PadFreeAudit(_RunState, Callback):
    """Check a due batch and the training forward on it (see the module docstring).

    Each microbatch's forward is checked on its own; at the end of the batch the audit logs, once,
    what its audited forwards saw on this rank: `real_tokens`, `documents` and
    `boundary_targets_counted` summed over them, `unpad_calls` and `varlen_layers` of the forward
    farthest from one unpad and from every layer (`num_layers`), `embedding_padded`; and over all
    ranks `passed` and `checks_failed`. `forwards_audited` counts the run's audited forwards. The
    audit's own work is left out of `padfree_stats`' timing.

    A hooked or wrapped embedding (a forward hook, as HF Trainer's NEFTune installs; a replaced
    `forward`; a wrapper class) is called by the model on stock Llama's re-padded `[B,S]` ids, on
    purpose: such a hook may read the shape (NEFTune scales its noise by it), and every decoder
    layer after it still runs on `[T]` tokens. The audit then checks those ids against the batch,
    logs `embedding_padded` 1.0 (0.0 when the embedding computed on `[T]` ids), warns once, and
    keeps the reason in `.summary["embedding_note"]`. It does not count as a failed check, even
    with `strict`, since the configuration is supported; read `embedding_padded` to tell it apart.

    Args:
        interval: audit the forwards of every `interval`-th batch (all its microbatches), from the first.
        strict: raise `PadFreeCheckError` at the end of a batch whose checks failed on any rank,
            instead of only logging it.

    Raises:
        ValueError: when constructed with an unknown option, or one of the wrong kind or out of range.
        TypeError: at init, if the run's model is not `padfree_causal_lm`.
        ValueError: at init, when the run has more than one `padfree_audit`.
        PadFreeCheckError: with `strict`, when a check fails.
    """

    _run_flags = ("_warned_padded_embedding",)

    def __init__(self, interval: int = 100, strict: bool = False, **unknown: Any):
        _reject_unknown_options(unknown, PadFreeAudit)
        self.interval = _interval(interval, "padfree_audit")
        self.strict = check_flag(strict, "padfree_audit", "strict")
        self.summary: dict[str, Any] = {"forwards_audited": 0, "checks_failed": 0}
        self._record: _ForwardRecord | None = None
        self._batch_docs: BatchDocs | None = None
        self._cleanup: contextlib.ExitStack | None = None
        self._totals = _BatchTotals()  # of the batch being audited
        self._warned_padded_embedding = False

    def init(self, state: State, logger: Logger) -> None:
        _check_model(state, "padfree_audit")
        audits = [c for c in state.callbacks if isinstance(c, PadFreeAudit)]
        if len(audits) > 1:  # each would instrument the same forward, over the other's instruments
            raise ValueError(f"{len(audits)} padfree_audit callbacks in one run; keep one.")

    def fit_start(self, state: State, logger: Logger) -> None:
        model = _composer_model(state)
        device = next(model.parameters()).device
        with get_precision_context(state.precision, state.precision_config):  # as in the training forward
            backend = model.model.model.attention_backend(device)
        logger.log_hyperparameters({"padfree/attn_backend": backend.name})

    def before_forward(self, state: State, logger: Logger) -> None:
        if not _due(state, self.interval) or padding_only(state.batch):  # nothing to audit in padding
            return
        with _ProbeClock.measure(state):
            self._batch_docs = read_batch(state.batch)
            self._record = _ForwardRecord()
            self._cleanup = contextlib.ExitStack()
            self._cleanup.enter_context(_instrument(_composer_model(state), self._record))

    def after_forward(self, state: State, logger: Logger) -> None:
        if self._record is None:
            return
        self._uninstall()
        record, docs = self._record, self._batch_docs
        self._record = self._batch_docs = None
        assert docs is not None, "padfree_audit: forward record without the batch it belongs to"
        with _ProbeClock.measure(state):
            forward_problems, varlen_layers = _check_forward(state, record, docs)
        totals = self._totals
        totals.problems += docs.problems + forward_problems
        totals.forwards += 1
        totals.real_tokens += docs.num_tokens
        totals.documents += len(docs.docs)
        totals.boundary_targets_counted += docs.boundary_targets_counted
        totals.unpad_calls.append(len(record.unpads))
        totals.varlen_layers.append(varlen_layers)
        if record.embedding_note is not None and any(ids.dim() == 2 for ids in record.embed_inputs):
            totals.embedding_padded = True
            self.summary["embedding_note"] = record.embedding_note
            if not self._warned_padded_embedding:
                log.warning("padfree_audit: %s", record.embedding_note)
                self._warned_padded_embedding = True
        self.summary["forwards_audited"] += 1

    def batch_end(self, state: State, logger: Logger) -> None:
        if not _due(state, self.interval, batch_finished=True):  # the same batches on every rank
            return
        totals, self._totals = self._totals, _BatchTotals()
        # Each microbatch's forward is checked; a problem of the batch shows once.
        problems = list(dict.fromkeys(totals.problems))
        with _ProbeClock.measure(state):
            per_rank, _ = _across_ranks(state, len(problems))
        failed_ranks = [r for r, n in enumerate(per_rank) if n]
        self.summary["checks_failed"] += sum(per_rank)
        metrics = {
            "padfree/audit/passed": float(not failed_ranks),
            "padfree/audit/checks_failed": float(sum(per_rank)),
            "padfree/audit/ranks_failed": float(len(failed_ranks)),
        }
        if totals.forwards:  # none when this rank's batch was padding only
            num_layers = _composer_model(state).config.num_hidden_layers
            metrics |= {
                "padfree/audit/forwards_audited": float(self.summary["forwards_audited"]),
                "padfree/audit/unpad_calls": float(_worst(totals.unpad_calls, 1)),
                "padfree/audit/varlen_layers": float(_worst(totals.varlen_layers, num_layers)),
                "padfree/audit/num_layers": float(num_layers),
                "padfree/audit/real_tokens": float(totals.real_tokens),
                "padfree/audit/documents": float(totals.documents),
                "padfree/audit/boundary_targets_counted": float(totals.boundary_targets_counted),
                "padfree/audit/embedding_padded": float(totals.embedding_padded),
            }
        # The run-long counts stay the summary's own (ints, saved in checkpoints); the rest is this batch's.
        run_long = ("/checks_failed", "/forwards_audited")
        self.summary.update({k.rsplit("/", 1)[1]: v for k, v in metrics.items() if not k.endswith(run_long)})
        logger.log_metrics(metrics)
        _report("padfree_audit", problems, failed_ranks, self.strict)

    def close(self, state: State, logger: Logger) -> None:
        self._uninstall()

    def _uninstall(self) -> None:
        if self._cleanup is not None:
            self._cleanup.close()
            self._cleanup = None


def _check_forward(state: State, record: _ForwardRecord, docs: BatchDocs) -> tuple[list[str], int]:
    """What is wrong with the recorded forward, and in how many layers the varlen kernel ran right."""
    inner = _composer_model(state).model
    L, T = _composer_model(state).config.num_hidden_layers, docs.num_tokens
    varlen_layers = 0
    problems = []
    if len(record.unpads) != 1:
        problems.append(f"the forward unpadded {len(record.unpads)} times; it must unpad exactly once")
    embed_shapes = [tuple(ids.shape) for ids in record.embed_inputs]
    if record.embedding_note is not None and embed_shapes == [docs.shape]:
        # A hooked or wrapped embedding, given stock Llama's `[B,S]` layout on purpose (reported,
        # not failed): its real positions must hold the batch's real tokens.
        ids_BS = record.embed_inputs[0].cpu().numpy()
        if docs.token_ids is not None and not np.array_equal(
            np.concatenate([ids_BS[d.row, d.start : d.end] for d in docs.docs]), docs.token_ids
        ):
            problems.append("the hooked embedding's [B, S] token ids are not the batch's at its real tokens")
    elif embed_shapes != [(T,)]:
        problems.append(f"the embedding computed on inputs of shapes {embed_shapes}; expected one [T] = [{T}] call")
    elif docs.token_ids is not None and not np.array_equal(record.embed_inputs[0].cpu().numpy(), docs.token_ids):
        problems.append("the embedding's [T] token ids are not the batch's real tokens in row-major order")
    layers_seen = [layer for layer, _ in record.layer_inputs]
    if sorted(layers_seen) != list(range(L)):
        problems.append(f"decoder layers ran as {layers_seen}; expected each of the {L} layers once")
    padded = [(layer, shape) for layer, shape in record.layer_inputs if len(shape) != 2 or shape[0] != T]
    if padded:
        problems.append(f"decoder layer inputs were not [T, D] = [{T}, D] in (layer, shape) {padded[:3]}")
    if len(record.prepared) != 1:
        problems.append(f"the attention backend prepared metadata {len(record.prepared)} times; once per forward, "
                        "for every layer, expected")  # fmt: skip
    if not record.unpads:
        return problems, varlen_layers
    meta = record.unpads[0].meta
    for layer, backend, attend_meta, q_shape, dtype in record.attends:
        # The backend the configuration gives for the dtype attention ran in (`auto` depends on it).
        expected_backend = inner.model.attention_backend(meta.cu_seqlens_N1.device, dtype).name
        same_meta = (
            attend_meta is not None
            and attend_meta.cu_seqlens_N1 is meta.cu_seqlens_N1
            and attend_meta.doc_lens == meta.doc_lens
        )
        if backend == expected_backend and backend in BACKENDS and same_meta and q_shape[0] == T:
            varlen_layers += 1
        elif not same_meta:
            problems.append(f"layer {layer} attended with different varlen metadata than the one unpad built")
        else:
            problems.append(f"layer {layer} ran backend {backend!r} on q of shape {q_shape} "
                            f"(expected {expected_backend!r} on [{T}, ...])")  # fmt: skip
    if len(record.attends) != L:
        problems.append(f"the varlen kernel ran {len(record.attends)} times; expected once in each of {L} layers")
    if meta.doc_lens != docs.doc_lens:
        problems.append(f"the model saw documents of lengths {list(meta.doc_lens)[:8]}...; the batch has "
                        f"{list(docs.doc_lens)[:8]}...")  # fmt: skip
    elif not np.array_equal(meta.position_ids_T.cpu().numpy(), docs.positions()):
        problems.append("RoPE positions differ from 0, 1, 2, ... within each document")
    if meta.max_seqlen != max(docs.doc_lens, default=0):
        problems.append(f"max_seqlen = {meta.max_seqlen}, longest document = {max(docs.doc_lens, default=0)}")
    num_loss_tokens = getattr(state.outputs, "num_loss_tokens", None)
    expected_targets = sum(docs.targets_per_row) if docs.targets_per_row is not None else None
    if num_loss_tokens is not None and expected_targets is not None and int(num_loss_tokens) != expected_targets:
        problems.append(f"the loss was taken over {int(num_loss_tokens)} targets; the batch's labels have "
                        f"{expected_targets} within documents")  # fmt: skip
    return problems, varlen_layers


@contextlib.contextmanager
def _instrument(model: nn.Module, record: _ForwardRecord) -> Iterator[None]:
    """Observe one forward: count `unpad` calls, embedding and attention inputs, and kernel calls.

    The decoder-layer pre-hook hands the layer a `Backend` whose `attend` (and `attend_rope`, the
    entry the eager fused block calls) records its call and then runs the original kernel on the
    same arguments: outputs and gradients are unchanged. (Hooks on the layer also fire through
    FSDP and activation-checkpointing wrappers.) The embedding's input is seen by wrapping the
    decoder's `forward_tokens` for the forward. A plain `nn.Embedding` computes on the `[T]` ids
    that method gets, which are recorded: a hook on it would make the model leave its plain and
    fused tied-embedding paths (`modeling._plain`), so the audit would no longer see the path it
    audits. An embedding that already has a hook or a wrapper is called by the model as a module
    (on `[B,S]` ids): one more pre-hook, installed for that call, changes nothing and records the
    ids it computes on, after the user's own pre-hooks.

    Layers compiled by `compile_layers` with a backend torch.compile traces run inside a compiled
    graph, where no hook fires and no Python wrapper may run without changing the graph: the
    calls of the compiled stack (every layer; no hook fires) and of a compiled layer are recorded
    as they are made, with the prepared metadata they are given (the `attn_extra` that the
    forward's `Backend.prepare` returned, recorded by wrapping the decoder's `attention_backend`).
    Everything is put back as it was, wrappers the user installed included.
    """
    layers = [m for m in model.modules() if isinstance(m, modeling.PadFreeDecoderLayer)]
    decoders = [m for m in model.modules() if isinstance(m, modeling.PadFreeLlamaModel)]

    def recording(decoder: modeling.PadFreeLlamaModel) -> Callable[..., Tensor]:
        forward_tokens = decoder.forward_tokens

        def forward_tokens_recorded(input_ids_T: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            embed = decoder.embed_tokens
            if modeling._plain(embed, nn.Embedding):
                record.embed_inputs.append(input_ids_T.detach())
                return forward_tokens(input_ids_T, *args, **kwargs)
            record.embedding_note = _embedding_note(embed)
            handle = embed.register_forward_pre_hook(lambda m, inputs: record.embed_inputs.append(inputs[0].detach()))
            try:
                return forward_tokens(input_ids_T, *args, **kwargs)
            finally:
                handle.remove()

        return forward_tokens_recorded

    def recording_backend(attention_backend: Callable[..., Any]) -> Callable[..., Any]:
        def attention_backend_recorded(*args: Any, **kwargs: Any) -> Any:
            backend = attention_backend(*args, **kwargs)

            def prepare(*prepare_args: Any) -> Any:
                prepared = backend.prepare(*prepare_args)
                record.prepared.append(prepared)
                return prepared

            return backend._replace(prepare=prepare)

        return attention_backend_recorded

    def on_layer(layer: modeling.PadFreeDecoderLayer, args: tuple) -> tuple:
        x_TD, meta, rope, backend = args
        index = layer.self_attn.layer_idx
        record.layer_inputs.append((index, tuple(x_TD.shape)))

        def attend(q_TNH: Tensor, k_TKH: Tensor, v_TKH: Tensor, meta_: Any, scale: float) -> Tensor:
            record.attends.append((index, backend.name, meta_, tuple(q_TNH.shape), q_TNH.dtype))
            return backend.attend(q_TNH, k_TKH, v_TKH, meta_, scale)

        def attend_rope(q_TNH: Tensor, k_TKH: Tensor, v_TKH: Tensor, cos: Tensor, sin: Tensor, meta_: Any,
                        scale: float) -> Tensor:  # fmt: skip
            record.attends.append((index, backend.name, meta_, tuple(q_TNH.shape), q_TNH.dtype))
            return backend.attend_rope(q_TNH, k_TKH, v_TKH, cos, sin, meta_, scale)

        wrapped = backend._replace(attend=attend, attend_rope=attend_rope if backend.attend_rope else None)
        return (x_TD, meta, rope, wrapped)

    def recording_compiled(compiled_for: Callable[[str], Callable], stack: bool) -> Callable[[str], Callable]:
        def compiled_recorded(compile_backend: str) -> Callable:
            compiled = compiled_for(compile_backend)

            def call(layers: Any, x_TD: Tensor, cos: Tensor, sin: Tensor, attn_extra: Any, attend: Callable,
                     *rest: Any) -> Tensor:  # fmt: skip
                name = next((b.name for b in BACKENDS.values() if b.traceable is attend), repr(attend))
                meta = next((m for m in record.prepared if m.attn_extra is attn_extra), None)
                dtype = linear_dtype(x_TD.device.type, x_TD.dtype)  # what `_autocast_dtype` casts q to
                for layer in layers if stack else [layers]:
                    index = layer.self_attn.layer_idx
                    if stack:  # no pre-hook fires inside the stack's graph
                        record.layer_inputs.append((index, tuple(x_TD.shape)))
                    record.attends.append((index, name, meta, tuple(x_TD.shape[:1]), dtype))
                return compiled(layers, x_TD, cos, sin, attn_extra, attend, *rest)

            return call

        return compiled_recorded

    def counting_unpad(*args: Any, **kwargs: Any) -> Unpadded:
        out = originals["unpad"](*args, **kwargs)
        record.unpads.append(out)
        return out

    # The model calls `unpad` and the compiled layers through its module's globals; wrapping those
    # names for this forward is how the audit sees the calls without a hook inside the model.
    patched = {
        "unpad": counting_unpad,
        "_compiled_stack": recording_compiled(modeling._compiled_stack, stack=True),
        "_compiled_layer": recording_compiled(modeling._compiled_layer, stack=False),
    }
    originals = {name: getattr(modeling, name) for name in patched}
    # An instance attribute the user set (a wrapper) is put back after; otherwise the class's method.
    saved = [(d, name, vars(d).get(name)) for d in decoders for name in ("forward_tokens", "attention_backend")]
    handles = [layer.register_forward_pre_hook(on_layer) for layer in layers]
    try:
        for decoder in decoders:
            decoder.forward_tokens = recording(decoder)
            decoder.attention_backend = recording_backend(decoder.attention_backend)
        for name, value in patched.items():
            setattr(modeling, name, value)
        yield
    finally:
        for name, value in originals.items():
            setattr(modeling, name, value)
        for decoder, name, value in saved:
            if value is None:
                vars(decoder).pop(name, None)
            else:
                setattr(decoder, name, value)
        for h in handles:
            h.remove()


def _embedding_note(embed: nn.Module) -> str:
    """Why the model calls this embedding as a module, on `[B,S]` ids, and what that means."""
    hooks = nn.modules.module
    kind = "nn.Embedding" if type(embed) is nn.Embedding else f"{type(embed).__name__} (not a plain nn.Embedding)"
    reasons = []
    if embed._forward_hooks or embed._forward_pre_hooks:
        reasons.append(f"{len(embed._forward_hooks) + len(embed._forward_pre_hooks)} forward hook(s)")
    if "forward" in vars(embed):
        reasons.append("a replaced forward")
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        reasons.append("global module hooks")
    with_reasons = f" with {', '.join(reasons)}" if reasons else ""
    return (
        f"the embedding ({kind}{with_reasons}) computed on stock Llama's re-padded [B, S] ids, which the model "
        "gives a hooked or wrapped embedding on purpose (a hook such as NEFTune's may read the shape); reported, "
        "not failed, and the layers after it are still audited on [T] tokens. Remove the hook or wrapper to embed "
        "[T] ids."
    )


# ---------------------------------------------------------------------------------------------
# padfree_isolation


class PadFreeIsolation(_RunState, Callback):
    """Perturb one document of a live batch; every other document's logits must not move.

    Args:
        interval: probe every `interval`-th batch, from the first.
        strict: raise `PadFreeCheckError` when another document's logits moved by more than `atol`.
        atol: the largest |delta| allowed on other documents' logits (0: bit-identical).
        max_rows: rows of the batch the probe uses (the row with the most documents first); the
            probe holds two `[max_rows, S, V]` logit tensors.

    Raises:
        ValueError: when constructed with an unknown option, or one of the wrong kind or out of range.
        TypeError: at init, if the run's model is not `padfree_causal_lm`.
        PadFreeCheckError: with `strict`, when isolation fails.
    """

    _run_flags = ("_warned_unpacked",)

    def __init__(self, interval: int = 500, strict: bool = False, atol: float = 0.0, max_rows: int = 2, **unknown: Any):
        _reject_unknown_options(unknown, PadFreeIsolation)
        self.interval = _interval(interval, "padfree_isolation")
        self.strict = check_flag(strict, "padfree_isolation", "strict")
        self.atol = _tolerance(atol, "padfree_isolation", "atol")
        self.max_rows = _max_rows(max_rows, "padfree_isolation")
        self.summary: dict[str, float] = {"probes": 0, "probes_failed": 0}
        self._warned_unpacked = False

    def init(self, state: State, logger: Logger) -> None:
        _check_model(state, "padfree_isolation")

    def batch_end(self, state: State, logger: Logger) -> None:
        if not _due(state, self.interval, batch_finished=True):
            return
        with _ProbeClock.measure(state):  # the whole probe, reading the batch included
            self._probe(state, logger)

    def _probe(self, state: State, logger: Logger) -> None:
        docs = read_batch(state.batch)
        if not _every_rank_has_documents(state, docs):
            return
        rows, row_docs = _pick_rows(docs, self.max_rows)
        probe = _probe_batch(state, rows)
        target = next(d for d in row_docs if d.row == rows[0])  # the first document of the busiest row
        r = rows.index(target.row)
        vocab = _composer_model(state).config.vocab_size
        perturbed = dict(probe, input_ids=probe["input_ids"].clone())
        cols = slice(target.start, target.end)
        # Every token of the document changes (a shift by half the vocabulary); nothing else does.
        perturbed["input_ids"][r, cols] = (perturbed["input_ids"][r, cols] + vocab // 2) % vocab
        with _probe_mode(state):
            # Two forwards on every rank, always, so FSDP ranks stay in step.
            before = state.model(probe).logits
            after = state.model(perturbed).logits
            delta_BS = _max_abs_diff_per_token(after, before)
            del before, after
        others = [d for d in row_docs if d != target]
        other_mask = torch.zeros_like(delta_BS, dtype=torch.bool)
        for d in others:
            other_mask[rows.index(d.row), d.start : d.end] = True
        other_diff = float(delta_BS[other_mask].max()) if others else 0.0
        target_diff = float(delta_BS[r, cols].max())
        same_row = sum(d.row == target.row for d in others)

        problems = []
        if not other_diff <= self.atol:  # NaN too
            problems.append(f"perturbing document (row {target.row}, columns {target.start}..{target.end - 1}) "
                            f"moved other documents' logits by up to {other_diff:.3g} > atol {self.atol}")  # fmt: skip
        if target_diff == 0.0:
            problems.append("the perturbed document's own logits did not change: the probe tested nothing")
        if same_row == 0 and not self._warned_unpacked:
            # Not a failure (nothing was packed, so nothing could leak within a row), but the probe
            # then says nothing about the packed case it exists for.
            log.warning(
                "padfree_isolation: no row of the probed batch holds two documents, so only documents of "
                "other rows were compared; isolation within a packed row was not tested at this probe."
            )
            self._warned_unpacked = True
        per_rank, (other_diff_all,) = _across_ranks(state, len(problems), (other_diff,))
        failed_ranks = [r for r, n in enumerate(per_rank) if n]
        self.summary["probes"] += 1
        self.summary["probes_failed"] += bool(failed_ranks)
        metrics = {
            "padfree/isolation/passed": float(not failed_ranks),
            "padfree/isolation/max_abs_diff_other_docs": other_diff_all,
            "padfree/isolation/max_abs_diff_perturbed_doc": target_diff,
            "padfree/isolation/documents_compared": float(len(others)),
            "padfree/isolation/same_row_documents_compared": float(same_row),
        }
        self.summary.update({k.rsplit("/", 1)[1]: v for k, v in metrics.items()})
        logger.log_metrics(metrics)
        _report("padfree_isolation", problems, failed_ranks, self.strict)


def _max_abs_diff_per_token(a_BSV: Tensor, b_BSV: Tensor, positions: int = 1024) -> Tensor:
    """max over V of |a - b| in fp32, `[B,S]`, taken `positions` columns at a time: the fp32
    differences of whole `[B,S,V]` logits would take B·S·V·4 bytes each (8 GiB for two 8,192-token
    rows of Llama 3's vocabulary). A NaN on either side gives NaN."""
    chunks = zip(a_BSV.split(positions, dim=1), b_BSV.split(positions, dim=1))
    return torch.cat([(a.float() - b.float()).abs_().amax(dim=-1) for a, b in chunks], dim=1)


# ---------------------------------------------------------------------------------------------
# padfree_parity


class PadFreeParity(_RunState, Callback):
    """Compare the model on a live batch with stock HF `LlamaForCausalLM` on the padded layout.

    The reference is stock HF with the model's current weights (gathered in full under FSDP) in
    fp32, one document per right-padded row; the model runs under the training precision. In
    fp32 training the two must agree to a fixed tolerance. In 16-bit precisions (or with 16-bit
    weights, such as FSDP's bf16 `param_dtype` under `amp_bf16`), how far a correct model lands
    from fp32 depends on its depth, its weights and the documents' lengths; there stock HF runs
    the same rows a second time, in the training precision and the model's weight dtype, and the
    model may be at most twice as far from the fp32 reference as stock HF is (never less than
    the fixed 16-bit tolerance). The reference runs the documents in groups of bounded padded
    size, and holds a full fp32 copy of the weights (its 16-bit run casts one module's at a
    time), on the training device, only during a probe: between probes its parameters are empty.

    Args:
        interval: compare every `interval`-th batch, from the first.
        strict: raise `PadFreeCheckError` when a difference exceeds its tolerance.
        max_rows: rows of the live batch compared (the row with the most documents first).
        loss_atol: largest |loss difference| from the fp32 reference allowed; None:
            `default_parity_tolerance` (1e-4 in fp32, 1e-2 in fp32 with TF32 products on a
            GPU), in 16-bit precisions at least 1e-2 and twice stock HF's own difference (1e-2
            where that is not finite: stock HF overflowed). Not checked when the compared rows
            have no target (`loss_compared` 0).
        logits_rtol: largest max|delta logits| / max|reference logits|; None: the same default.

    Raises:
        ValueError: when constructed with an unknown option, or one of the wrong kind or out of range.
        TypeError: at init, if the run's model is not `padfree_causal_lm`.
        ValueError: at a due batch without labels (strict or not: the setup cannot be compared).
        PadFreeCheckError: with `strict`, when parity fails.
    """

    def __init__(
        self,
        interval: int = 500,
        strict: bool = False,
        max_rows: int = 2,
        loss_atol: float | None = None,
        logits_rtol: float | None = None,
        **unknown: Any,
    ):
        _reject_unknown_options(unknown, PadFreeParity)
        self.interval = _interval(interval, "padfree_parity")
        self.strict = check_flag(strict, "padfree_parity", "strict")
        self.max_rows = _max_rows(max_rows, "padfree_parity")
        self.loss_atol = None if loss_atol is None else _tolerance(loss_atol, "padfree_parity", "loss_atol")
        self.logits_rtol = None if logits_rtol is None else _tolerance(logits_rtol, "padfree_parity", "logits_rtol")
        self.summary: dict[str, float] = {"probes": 0, "probes_failed": 0}
        self._reference: nn.Module | None = None

    def init(self, state: State, logger: Logger) -> None:
        _check_model(state, "padfree_parity")

    def batch_end(self, state: State, logger: Logger) -> None:
        if not _due(state, self.interval, batch_finished=True):
            return
        with _ProbeClock.measure(state):  # the whole probe, reading the batch included
            self._probe(state, logger)

    def _probe(self, state: State, logger: Logger) -> None:
        docs = read_batch(state.batch)
        if docs.targets_per_row is None:
            keys = sorted(k for k, v in state.batch.items() if v is not None)
            raise ValueError(
                f"padfree_parity compares losses and needs batches with labels; this batch has only {keys}. "
                "Use a train loader whose batches carry labels (padfree_text, padfree_finetuning, LLM-Foundry's "
                "text and finetuning loaders do), or remove padfree_parity from `callbacks`."
            )
        if not _every_rank_has_documents(state, docs):
            return
        rows, row_docs = _pick_rows(docs, self.max_rows)
        probe = _probe_batch(state, rows, with_labels=True)
        weights_dtype = _weights_dtype(state)
        floor = default_parity_tolerance(state.precision, state.device.name == "gpu", weights_dtype)
        # Stock HF in the training precision sets the 16-bit tolerances: not needed when both are given.
        stock_dtype = None
        if _low_precision(state.precision, weights_dtype) and None in (self.loss_atol, self.logits_rtol):
            stock_dtype = weights_dtype
        diffs = self._compare(state, probe, rows, row_docs, stock_dtype)
        # Rows without a target (prompts only) have no loss to compare: ours is 0, stock HF's the
        # mean over no targets, NaN. Their logits are still compared.
        loss_compared = sum(docs.targets_per_row[r] for r in rows) > 0
        loss_diff = abs(diffs.loss_ours - diffs.loss_ref) if loss_compared else 0.0
        stock_loss_diff = diffs.stock_loss_diff if loss_compared else 0.0
        loss_atol = _parity_tolerance(self.loss_atol, floor, stock_loss_diff)
        logits_rtol = _parity_tolerance(self.logits_rtol, floor, diffs.stock_logits_rel)

        def stock(diff: float) -> str:
            return f"; stock HF in this precision: {diff:.3g}" if stock_dtype is not None else ""

        problems = []
        if not loss_diff <= loss_atol:
            problems.append(f"loss {diffs.loss_ours:.6g} vs padded fp32 reference {diffs.loss_ref:.6g}: "
                            f"|diff| {loss_diff:.3g} > {loss_atol:.3g}{stock(stock_loss_diff)}")  # fmt: skip
        if not diffs.logits_rel <= logits_rtol:
            problems.append(f"logits differ from the padded fp32 reference by {diffs.logits_diff:.3g} (relative "
                            f"{diffs.logits_rel:.3g} > {logits_rtol:.3g}{stock(diffs.stock_logits_rel)})")  # fmt: skip
        maxima = (loss_diff, diffs.logits_diff, diffs.logits_rel, stock_loss_diff, diffs.stock_logits_rel)
        per_rank, maxima = _across_ranks(state, len(problems), maxima)
        failed_ranks = [r for r, n in enumerate(per_rank) if n]
        self.summary["probes"] += 1
        self.summary["probes_failed"] += bool(failed_ranks)
        metrics = {
            "padfree/parity/passed": float(not failed_ranks),
            "padfree/parity/loss_padfree": diffs.loss_ours,
            "padfree/parity/loss_reference": diffs.loss_ref,
            "padfree/parity/loss_abs_diff": maxima[0],
            "padfree/parity/logits_max_abs_diff": maxima[1],
            "padfree/parity/logits_max_rel_diff": maxima[2],
            "padfree/parity/documents": float(len(row_docs)),
            "padfree/parity/loss_compared": float(loss_compared),
        }
        if stock_dtype is not None:
            metrics["padfree/parity/stock_loss_abs_diff"] = maxima[3]
            metrics["padfree/parity/stock_logits_max_rel_diff"] = maxima[4]
        self.summary.update({k.rsplit("/", 1)[1]: v for k, v in metrics.items()})
        logger.log_metrics(metrics)
        _report("padfree_parity", problems, failed_ranks, self.strict)

    def _compare(
        self,
        state: State,
        probe: dict[str, Tensor],
        rows: list[int],
        row_docs: list[Document],
        stock_dtype: torch.dtype | None,
    ) -> _ParityDiffs:
        """The model's loss and logits against the fp32 padded reference's; with `stock_dtype`,
        also stock HF's in the training precision with weights of that dtype. The reference runs
        the documents in groups of at most `_REFERENCE_CELLS` padded positions (or one document),
        so its fp32 `[docs, L, V]` logits stay bounded however long the longest document is."""
        probe_docs = [d._replace(row=rows.index(d.row)) for d in row_docs]
        ref_nll = stock_nll = 0.0  # summed over the targets, from each group's mean
        targets = 0
        try:
            reference = self._reference_with_current_weights(state)
            with _probe_mode(state):
                ours = state.model(probe)
            loss_ours, ours_BSV = float(ours.loss), ours.logits
            del ours
            # Largest differences, as tensors: a NaN anywhere stays NaN (Python's max would drop it).
            logits_diff, ref_max, stock_logits_diff = (ours_BSV.new_zeros((), dtype=torch.float32) for _ in range(3))
            for group in _reference_groups(probe_docs, _REFERENCE_CELLS):
                padded = _one_document_per_row(probe, group)
                real_ref = padded["attention_mask"].bool()
                n = int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())  # HF's targets: shifted within a row
                targets += n
                with torch.no_grad():  # fp32 weights, no autocast: the training precision's context is not entered
                    nll, ref_TV = _nll_and_real_logits(reference(**padded), real_ref, n)
                ref_nll += nll
                rows_T = torch.cat([torch.full((d.length,), d.row) for d in group]).to(ours_BSV.device)
                cols_T = torch.cat([torch.arange(d.start, d.end) for d in group]).to(ours_BSV.device)
                ours_TV = ours_BSV[rows_T, cols_T].float()  # the group's tokens in the reference's row-major order
                logits_diff = torch.maximum(logits_diff, (ours_TV - ref_TV).abs().max())
                ref_max = torch.maximum(ref_max, ref_TV.abs().max())
                del ours_TV
                if stock_dtype is not None:
                    with _probe_mode(state), _weights_cast_as_used(reference, stock_dtype):
                        nll, stock_TV = _nll_and_real_logits(reference(**padded), real_ref, n)
                    stock_nll += nll
                    stock_logits_diff = torch.maximum(stock_logits_diff, (stock_TV - ref_TV).abs().max())
                    del stock_TV
        finally:
            if self._reference is not None:
                _release_parameters(self._reference)
        loss_ref = ref_nll / targets if targets else float("nan")
        stock_loss_diff = abs(stock_nll / targets - loss_ref) if targets and stock_dtype is not None else 0.0
        ref_max = max(float(ref_max), 1e-30)  # a NaN maximum stays NaN
        return _ParityDiffs(loss_ours, loss_ref, float(logits_diff), float(logits_diff) / ref_max, stock_loss_diff,
                            float(stock_logits_diff) / ref_max)  # fmt: skip

    def _reference_with_current_weights(self, state: State) -> nn.Module:
        """Stock HF `LlamaForCausalLM` with the model's current weights in fp32, on its device."""
        from transformers import LlamaForCausalLM

        model = _composer_model(state)
        with _full_parameters(state.model):
            params = {_clean_name(n): p for n, p in model.model.named_parameters()}
            device = next(iter(params.values())).device
            if self._reference is None:
                config = model.config.to_llama_config()
                # Stock HF attention on padded rows: the reference path, not our kernels. Built on
                # the CPU with the CPU generator restored after, so its (overwritten) random init
                # leaves the training run's random stream untouched.
                with torch.random.fork_rng(devices=[]):
                    self._reference = LlamaForCausalLM._from_config(
                        config, attn_implementation="sdpa", torch_dtype=torch.float32
                    ).eval()
                _release_parameters(self._reference)
            ref_params = dict(self._reference.named_parameters())
            missing = sorted(set(ref_params) - set(params))
            if missing:
                raise RuntimeError(f"padfree_parity: the model has no parameters for reference weights {missing[:5]}")
            with torch.no_grad():  # the current weights, copied once: straight to the device, in fp32
                for name, p in ref_params.items():
                    p.data = params[name].detach().to(device=device, dtype=torch.float32, copy=True)
            self._reference.to(device)  # its buffers (RoPE's inverse frequencies, fp32)
        return self._reference


class _ParityDiffs(NamedTuple):
    loss_ours: float
    loss_ref: float
    logits_diff: float  # max |delta logits|, the model's vs the fp32 reference's
    logits_rel: float  # that over max |reference logits|
    stock_loss_diff: float  # stock HF in the training precision vs the fp32 reference (0 when not run)
    stock_logits_rel: float


def _nll_and_real_logits(out: Any, real_BS: Tensor, targets: int) -> tuple[float, Tensor]:
    """A stock HF forward's loss summed over its `targets` (from HF's mean; 0 without targets,
    whose mean is NaN) and its real tokens' logits in fp32, `[T,V]` in row-major order."""
    return (float(out.loss) * targets if targets else 0.0), out.logits[real_BS].float()


def _parity_tolerance(given: float | None, floor: float, stock_diff: float) -> float:
    """The user's tolerance, else twice stock HF's own difference in the training precision (0
    where that was not run), and at least the default `floor`. A stock difference that is not
    finite (stock HF overflowed, e.g. in fp16) sets nothing: the floor, not a tolerance of inf."""
    if given is not None:
        return given
    return max(floor, 2 * stock_diff) if math.isfinite(stock_diff) else floor


def _low_precision(precision: Precision, weights_dtype: torch.dtype) -> bool:
    """Whether the model's products run in 16 bits: a 16-bit training precision, or 16-bit weights."""
    return precision != Precision.FP32 or weights_dtype in (torch.bfloat16, torch.float16)


def _weights_dtype(state: State) -> torch.dtype:
    """The dtype of the weights the model's forward runs with: FSDP's mixed-precision `param_dtype`
    where it has one (Composer's `PURE` and `DEFAULT` under `amp_bf16`: bf16, from fp32 shards),
    else the parameters' own."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    for m in state.model.modules():
        if isinstance(m, FullyShardedDataParallel) and m.mixed_precision.param_dtype is not None:
            return m.mixed_precision.param_dtype
    return next(p.dtype for p in _composer_model(state).parameters() if p.is_floating_point())


@contextlib.contextmanager
def _weights_cast_as_used(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Run `module` with its parameters in `dtype`, each submodule's cast when that submodule runs
    and put back after it: one submodule's copy at a time, never a second copy of the whole model
    (a tied weight is cast again by each module that uses it)."""
    originals: dict[int, tuple[nn.Parameter, Tensor]] = {}

    def cast(m: nn.Module, args: Any) -> None:
        for p in m.parameters(recurse=False):
            originals.setdefault(id(p), (p, p.data))
            p.data = originals[id(p)][1].to(dtype)

    def restore(m: nn.Module, args: Any, out: Any) -> None:
        for p in m.parameters(recurse=False):
            p.data = originals.pop(id(p))[1]

    owners = [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]
    handles = [h for m in owners for h in (m.register_forward_pre_hook(cast), m.register_forward_hook(restore))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for p, data in originals.values():  # a forward that raised: put back what it had cast
            p.data = data


def _release_parameters(module: nn.Module) -> None:
    """Free a module's parameter storage, keeping their dtypes (and any ties between them)."""
    for p in module.parameters():
        p.data = torch.empty(0, dtype=p.dtype)


def default_parity_tolerance(precision: Precision, on_gpu: bool, weights_dtype: torch.dtype = torch.float32) -> float:
    """`padfree_parity`'s default `loss_atol` and `logits_rtol` against its fp32 reference: 1e-4 in
    fp32, 1e-2 in fp32 whose CUDA matrix products run in TF32 (Composer's GPU default,
    `allow_tf32`). In 16-bit precisions or with 16-bit weights (pure bf16 training under precision
    fp32), 1e-2 is the least: the probe allows twice stock HF's own difference in that precision
    when that is more."""
    if _low_precision(precision, weights_dtype):
        return 1e-2
    return 1e-2 if on_gpu and torch.get_float32_matmul_precision() != "highest" else 1e-4


@contextlib.contextmanager
def _full_parameters(model: nn.Module) -> Iterator[None]:
    """Full (unsharded) parameters under FSDP, read-only; nothing to do otherwise."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        with FullyShardedDataParallel.summon_full_params(model, writeback=False, recurse=True):
            yield
    else:
        yield


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _reference_groups(docs: list[Document], max_cells: int) -> list[list[Document]]:
    """`docs` in groups whose one-document-per-row padded batch has at most `max_cells` positions
    (a longer document alone), longest documents first, so that little of it is padding."""
    groups: list[list[Document]] = []
    for d in sorted(docs, key=lambda d: -d.length):
        if groups and (len(groups[-1]) + 1) * groups[-1][0].length <= max_cells:
            groups[-1].append(d)
        else:
            groups.append([d])
    return groups


def _one_document_per_row(probe: Mapping[str, Tensor], docs: list[Document]) -> dict[str, Tensor]:
    """The conventional padded batch of `docs`: one document per row, right-padded with pad id 0."""
    ids, labels = probe["input_ids"], probe["labels"]
    L = max(d.length for d in docs)
    out_ids = ids.new_zeros((len(docs), L))
    out_labels = labels.new_full((len(docs), L), IGNORE_INDEX)
    mask = ids.new_zeros((len(docs), L))
    for i, d in enumerate(docs):
        n = d.length
        out_ids[i, :n] = ids[d.row, d.start : d.end]
        out_labels[i, :n] = labels[d.row, d.start : d.end]
        mask[i, :n] = 1
    return {"input_ids": out_ids, "attention_mask": mask, "labels": out_labels}


# ---------------------------------------------------------------------------------------------
# padfree_stats


class PadFreeStats(Callback):
    """Log what padding-free training saves and how fast it runs, on every `interval`-th batch.

    Args:
        interval: measure every `interval`-th batch, from the first.

    Raises:
        ValueError: when constructed with an unknown option, or one of the wrong kind or out of range.
        TypeError: at init, if the run's model is not `padfree_causal_lm`.
    """

    def __init__(self, interval: int = 10, **unknown: Any):
        _reject_unknown_options(unknown, PadFreeStats)
        self.interval = _interval(interval, "padfree_stats")
        self.summary: dict[str, float] = {}
        self._start: float | None = None
        self._probe_seconds_at_start = 0.0
        self._peak_flops: float = 0.0

    def init(self, state: State, logger: Logger) -> None:
        _check_model(state, "padfree_stats")

    def fit_start(self, state: State, logger: Logger) -> None:
        self._peak_flops = float(get_gpu_flops_available(state) or 0.0)

    def batch_start(self, state: State, logger: Logger) -> None:
        if _due(state, self.interval):
            _sync(state)
            self._start = time.perf_counter()
            self._probe_seconds_at_start = _ProbeClock.seconds

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._start is None:
            return
        _sync(state)
        probes = _ProbeClock.seconds - self._probe_seconds_at_start  # isolation/parity ran before us
        seconds = time.perf_counter() - self._start - probes
        self._start = None
        docs = read_batch(state.batch)
        B, S = docs.shape
        T, N = docs.num_tokens, len(docs.docs)
        max_len = max(docs.doc_lens, default=0)
        flops = _composer_model(state).flops_per_batch(state.batch)
        metrics = {
            "padfree/stats/real_token_fraction": T / (B * S),
            "padfree/stats/pad_positions_skipped": float(B * S - T),
            "padfree/stats/padded_batch_pad_fraction": 1.0 - T / (N * max_len) if N else 0.0,
            "padfree/stats/documents_per_row": N / B,
            "padfree/stats/max_seqlen": float(max_len),
            "padfree/stats/real_tokens": float(T),
            "padfree/stats/real_tokens_per_sec": T / seconds,
            "padfree/stats/flops_per_sec": flops / seconds,
        }
        if self._peak_flops > 0:
            metrics["padfree/stats/mfu"] = flops / seconds / self._peak_flops
        self.summary.update({k.rsplit("/", 1)[1]: v for k, v in metrics.items()})
        logger.log_metrics(metrics)


def _sync(state: State) -> None:
    if state.device.name == "gpu":
        torch.cuda.synchronize()


# The registry names of the callbacks (setup.py's entry points), for errors that name the right one.
_CALLBACKS: dict[str, type[Callback]] = {
    "padfree_audit": PadFreeAudit,
    "padfree_isolation": PadFreeIsolation,
    "padfree_parity": PadFreeParity,
    "padfree_stats": PadFreeStats,
}


__all__ = [
    "BatchDocs",
    "Document",
    "PadFreeAudit",
    "PadFreeCheckError",
    "PadFreeIsolation",
    "PadFreeParity",
    "PadFreeStats",
    "read_batch",
]
