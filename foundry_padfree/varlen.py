"""Unpad once: turn a `[B,S]` batch into real tokens and one varlen metadata object.

Shape legend: B batch rows, S row length, T real tokens in the batch, N documents in the batch.

A batch row holds one document (HF padding, left or right) or several (LLM-Foundry packing,
`sequence_id` 0..k-1 per row and -1 on padding; or HF padding-free `position_ids` that restart
at 0). `unpad` reads whichever of those the caller gave and returns:

- `VarlenMeta`: `indices_T` (where each real token sits in the flattened `[B*S]` batch),
  `cu_seqlens_N1` (document starts in the `[T]` token stream, int32, as every varlen kernel wants),
  `max_seqlen`, `position_ids_T` (restarting at 0 per document, for RoPE), and the host-side
  document lengths. The model builds it once per forward and hands the same object to every layer.
- the real tokens' ids, and the labels shifted *within* each document (the model shifts, as in HF,
  but never across a boundary), with the positions of the supervised ones.

All checks and the host-side values come from a single device-to-host copy of one `uint8 [B,S]`
tensor of flags: that copy is the one sync of a forward. A batch still on the host (CPU tensors,
pinned for speed) with a CUDA `device` needs no sync at all: it is read where it is, and only the
real tokens and the metadata are copied to the GPU, without waiting for the work queued there.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Bits of the flags tensor copied to the host once per forward.
_REAL, _NEW_DOC, _SEQ_ID_DECREASES, _POS_OUT_OF_RANGE, _SUPERVISED, _BAD_LABEL = (1 << i for i in range(6))


class VarlenMeta(NamedTuple):
    """Where the real tokens are and where each document starts; immutable, built once per forward.

    Attributes:
        indices_T: (T,), int64. Index of each real token in the row-major flattened `[B*S]` batch.
        cu_seqlens_N1: (N+1,), int32. Start of each document in the token stream, then T.
        max_seqlen: length of the longest document.
        position_ids_T: (T,), int64. Position of each token within its document (RoPE input).
        doc_lens: host copy of the N document lengths (reference kernel, FLOP counts, stats).
        batch_size: B, to re-pad outputs to `[B,S,...]`.
        seq_len: S.
        attn_extra: what an attention backend derived once from this metadata (flex's block mask).
    """

    indices_T: Tensor
    cu_seqlens_N1: Tensor
    max_seqlen: int
    position_ids_T: Tensor
    doc_lens: tuple[int, ...]
    batch_size: int
    seq_len: int
    attn_extra: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.indices_T)

    @property
    def num_docs(self) -> int:
        return len(self.doc_lens)

    def doc_ids_T(self) -> Tensor:
        """(T,), int64: the document each token belongs to (0..N-1), computed on device, no sync."""
        tokens = torch.arange(self.num_tokens, device=self.cu_seqlens_N1.device)
        return torch.searchsorted(self.cu_seqlens_N1[1:].long(), tokens, right=True)

    def pad(self, x_T: Tensor, fill: float = 0.0) -> Tensor:
        """Scatter per-token values `(T, *F)` back to `(B, S, *F)`, `fill` at padding."""
        out = x_T.new_full((self.batch_size * self.seq_len, *x_T.shape[1:]), fill)
        out[self.indices_T] = x_T
        return out.view(self.batch_size, self.seq_len, *x_T.shape[1:])


class Unpadded(NamedTuple):
    """The result of `unpad`: metadata, real-token ids and per-document shifted targets."""

    meta: VarlenMeta
    input_ids_T: Tensor  # (T,), int64
    targets_T: Tensor | None  # (T,), int64: the next token of the same document, or IGNORE_INDEX
    # (T_sup,), int64: indices into T of the tokens the loss reads. Tokens with a target, except for
    # a dense batch (no mask, no packing), where every token is listed: without a sync the number of
    # targets is unknown, and the loss skips IGNORE_INDEX ones itself.
    supervised_T: Tensor | None
    # Whether every token `supervised_T` lists has a target (all but a dense batch's).
    supervised_have_targets: bool = False


def unpad(
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    sequence_id: Tensor | None = None,
    position_ids: Tensor | None = None,
    labels: Tensor | None = None,
    max_positions: int | None = None,
    vocab_size: int | None = None,
    device: torch.device | str | None = None,
) -> Unpadded:
    """Gather the real tokens of a `[B,S]` batch and describe its documents.

    Args:
        input_ids: (B, S), integer token ids.
        attention_mask: (B, S), 1 on real tokens and 0 on padding (HF): before, after or around
            each row's real tokens, never between them.
        sequence_id: (B, S), integer; document index within the row (LLM-Foundry), -1 on padding;
            must not decrease along a row.
        position_ids: (B, S) or (1, S) for every row, integer; used as given, and a 0 starts a new
            document (HF padding-free convention). Without them positions count from 0 in each document.
        labels: (B, S), integer, unshifted as in HF; IGNORE_INDEX where there is no target.
        max_positions: the largest allowed position + 1 (`max_position_embeddings`), or None.
        vocab_size: labels of real tokens must be IGNORE_INDEX or in `[0, vocab_size)`; None: any.
        device: where the outputs go (default: the batch's device). A CPU batch bound for a GPU is
            read on the host, so unpadding it waits for nothing the GPU is doing.

    Raises:
        ValueError: for a batch that cannot be read without guessing, naming the value and the fix.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}.")
    if input_ids.dtype not in (torch.int64, torch.int32):  # what the embedding takes
        raise ValueError(
            f"input_ids has dtype {input_ids.dtype}; token ids must be an int64 (or int32) tensor "
            "(convert with input_ids.long())."
        )
    B, S = input_ids.shape
    if B == 0 or S == 0:
        raise ValueError(f"input_ids has shape {(B, S)}: a batch needs at least one row of at least one token.")
    device = input_ids.device if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" means the current one, as in torch
        device = torch.device("cuda", torch.cuda.current_device())
    if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[0] == 1:
        position_ids = position_ids.expand(B, -1)  # one row for every row of the batch, as HF broadcasts it
    for name, t in (("attention_mask", attention_mask), ("sequence_id", sequence_id),
                    ("position_ids", position_ids), ("labels", labels)):  # fmt: skip
        if t is not None and tuple(t.shape) != (B, S):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but input_ids has {(B, S)}; "
                "every per-token tensor of the batch must have the same [batch, seq_len] shape."
            )
        if t is not None and name != "attention_mask" and not _is_integer(t):
            raise ValueError(f"{name} has dtype {t.dtype}; it must be an integer tensor (convert with {name}.long()).")
        if t is not None and t.device != input_ids.device:
            raise ValueError(
                f"{name} is on {t.device} but input_ids on {input_ids.device}; pass the whole batch on one device."
            )
    if input_ids.device != device and input_ids.device.type != "cpu":
        raise ValueError(
            f"the batch is on {input_ids.device} and device={device}: only a batch on the CPU can be "
            "unpadded for another device; move it to the CPU or to the model's device."
        )

    if attention_mask is None and sequence_id is None and position_ids is None:
        if labels is not None and vocab_size is not None and labels.device.type == "cpu":  # no sync to avoid
            bad = torch.nonzero(bad_labels(labels, vocab_size))
            if len(bad):
                raise _bad_label_error(labels, *(int(v) for v in bad[0]), vocab_size)
            vocab_size = None  # checked
        return _unpad_dense(_to(input_ids, device), _to(labels, device), max_positions, vocab_size)

    real_BS = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask is not None:
        real_BS &= attention_mask.bool()
    if sequence_id is not None:
        real_BS &= sequence_id >= 0
    flags_BS = real_BS.to(torch.uint8) * _REAL
    if sequence_id is not None:
        change_BS = torch.zeros_like(real_BS)
        change_BS[:, 1:] = sequence_id[:, 1:] != sequence_id[:, :-1]
        flags_BS |= change_BS.to(torch.uint8) * _NEW_DOC
        decrease_BS = torch.zeros_like(real_BS)
        decrease_BS[:, 1:] = (sequence_id[:, 1:] < sequence_id[:, :-1]) & real_BS[:, 1:]
        flags_BS |= decrease_BS.to(torch.uint8) * _SEQ_ID_DECREASES
    if position_ids is not None:
        flags_BS |= (position_ids == 0).to(torch.uint8) * _NEW_DOC
        bad_BS = position_ids < 0
        if max_positions is not None:  # in int64: a limit past a narrower dtype's range would wrap
            bad_BS |= position_ids.long() >= max_positions
        flags_BS |= bad_BS.to(torch.uint8) * _POS_OUT_OF_RANGE
    if labels is not None:
        flags_BS |= (labels != IGNORE_INDEX).to(torch.uint8) * _SUPERVISED
        if vocab_size is not None:
            flags_BS |= bad_labels(labels, vocab_size).to(torch.uint8) * _BAD_LABEL

    flags = flags_BS.cpu().numpy()  # the one device-to-host sync of a forward
    real = (flags & _REAL).astype(bool)
    _check_rows(real, flags, position_ids, labels, vocab_size)
    if labels is not None:
        _warn_if_labels_outside_documents(real, flags)

    indices = np.flatnonzero(real)
    T = len(indices)
    first_in_row = np.zeros_like(real)
    first_in_row[np.arange(B), real.argmax(axis=1)] = True
    new_doc_T = ((flags & _NEW_DOC).astype(bool) | first_in_row).reshape(-1)[indices]
    starts_N = np.flatnonzero(new_doc_T)
    cu_seqlens = np.append(starts_N, T).astype(np.int32)
    doc_lens = np.diff(cu_seqlens)
    max_seqlen = int(doc_lens.max())

    if position_ids is None:
        if max_positions is not None and max_seqlen > max_positions:
            doc = int(doc_lens.argmax())
            raise ValueError(
                f"document {doc} of the batch has {max_seqlen} tokens, more than "
                f"max_position_embeddings ({max_positions}); truncate or split it (max_seq_len)."
            )
        positions = np.arange(T) - np.repeat(starts_N, doc_lens)
    supervised_T = last_T = None
    if labels is not None:
        # The target of token t is the label at t+1, unless t ends its document.
        last = np.zeros(T, dtype=bool)
        last[cu_seqlens[1:] - 1] = True
        has_target = np.append((flags.reshape(-1)[indices[1:]] & _SUPERVISED).astype(bool), False) & ~last
        supervised_T = _to_device(np.flatnonzero(has_target), torch.int64, device)
        last_T = _to_device(last, torch.bool, device)

    indices_T = _to_device(indices, torch.int64, device)
    cu_seqlens_N1 = _to_device(cu_seqlens, torch.int32, device)
    # The real tokens of a [B,S] tensor, gathered where the batch is and then copied.
    host_indices = torch.from_numpy(indices) if input_ids.device != device else indices_T

    def real_tokens(t_BS: Tensor) -> Tensor:
        return _to(t_BS.reshape(-1)[host_indices], device)

    if position_ids is None:
        position_ids_T = _to_device(positions, torch.int64, device)
    else:
        position_ids_T = real_tokens(position_ids).long()
    meta = VarlenMeta(
        indices_T=indices_T,
        cu_seqlens_N1=cu_seqlens_N1,
        max_seqlen=max_seqlen,
        position_ids_T=position_ids_T,
        doc_lens=tuple(int(n) for n in doc_lens),
        batch_size=B,
        seq_len=S,
    )
    targets_T = _shift_targets(real_tokens(labels), meta, last_T) if labels is not None else None
    return Unpadded(meta, real_tokens(input_ids), targets_T, supervised_T, supervised_have_targets=True)


def _is_integer(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _unpad_dense(
    input_ids: Tensor, labels: Tensor | None, max_positions: int | None, vocab_size: int | None
) -> Unpadded:
    """Every token is real and each row is one document: no sync, no gather."""
    B, S = input_ids.shape
    device = input_ids.device
    if max_positions is not None and S > max_positions:
        raise ValueError(
            f"rows of {S} tokens are longer than max_position_embeddings ({max_positions}); "
            "truncate them (max_seq_len) or pass position_ids/sequence_id for packed rows."
        )
    if labels is not None and vocab_size is not None and labels.device.type != "cpu":
        # Checked on the device (a device-side assert), to keep this path free of syncs. A batch
        # with an attention_mask, or given on the host, gets the full error message instead.
        torch._assert_async(
            ~bad_labels(labels, vocab_size).any(),
            f"labels hold values outside [0, {vocab_size}) that are not IGNORE_INDEX ({IGNORE_INDEX}); "
            f"mark tokens without a target with {IGNORE_INDEX}.",
        )
    cu_seqlens_N1 = torch.arange(0, B * S + 1, S, dtype=torch.int32, device=device)
    meta = VarlenMeta(
        indices_T=torch.arange(B * S, device=device),
        cu_seqlens_N1=cu_seqlens_N1,
        max_seqlen=S,
        position_ids_T=torch.arange(S, device=device).repeat(B),
        doc_lens=(S,) * B,
        batch_size=B,
        seq_len=S,
    )
    targets_T = _shift_targets(labels.reshape(-1), meta) if labels is not None else None
    supervised_T = None
    if targets_T is not None:
        # Without a sync we cannot know how many targets there are: take every token and let the
        # loss ignore IGNORE_INDEX ones.
        supervised_T = meta.indices_T
    return Unpadded(meta, input_ids.reshape(-1), targets_T, supervised_T)


def _shift_targets(labels_T: Tensor, meta: VarlenMeta, last_T: Tensor | None = None) -> Tensor:
    """(T,), int64: label of the next token of the same document; IGNORE_INDEX at each doc's end.

    `labels_T` (T,) are the real tokens' labels; `last_T` (T,) bool marks the last token of each
    document; None for a dense batch (one document per row, no padding)."""
    targets_T = torch.roll(labels_T.long(), -1)
    if last_T is None:  # every row is one document: its last token is the row's last column
        targets_T.view(meta.batch_size, meta.seq_len)[:, -1] = IGNORE_INDEX
        return targets_T
    return targets_T.masked_fill(last_T, IGNORE_INDEX)  # not an index_put: that would sync


def bad_labels(labels: Tensor, vocab_size: int) -> Tensor:
    """(B, S) bool: labels that are neither IGNORE_INDEX nor a token id of the vocabulary."""
    labels = labels.long()  # a vocabulary size past a narrower dtype's range would wrap
    return (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))


def _check_rows(
    real: np.ndarray,
    flags: np.ndarray,
    position_ids: Tensor | None,
    labels: Tensor | None = None,
    vocab_size: int | None = None,
) -> None:
    S = real.shape[1]
    counts = real.sum(axis=1)
    if not counts.any():
        raise ValueError(
            "no row of the batch has a real token (attention_mask/sequence_id all padding); there is nothing to run."
        )
    # A row of padding only (HF accepts one) holds no document; its outputs stay padding.
    used = counts > 0
    first = real.argmax(axis=1)
    last = S - 1 - real[:, ::-1].argmax(axis=1)
    holes = np.flatnonzero((last - first + 1 != counts) & used)
    if len(holes):
        r = int(holes[0])
        raise ValueError(
            f"row {r} has padding between real tokens (attention_mask {real[r].astype(int).tolist()}); "
            "padding must sit before or after a row's real tokens, not between them."
        )
    decreases = np.argwhere(flags & _SEQ_ID_DECREASES)
    if len(decreases):
        r, c = (int(v) for v in decreases[0])
        raise ValueError(
            f"sequence_id decreases in row {r} at column {c}; sequence_id must be non-decreasing "
            "within a row (documents numbered 0..k-1 left to right, -1 on padding)."
        )
    bad_pos = np.argwhere((flags & _POS_OUT_OF_RANGE).astype(bool) & real)
    if len(bad_pos):
        r, c = (int(v) for v in bad_pos[0])
        value = int(position_ids[r, c])  # error path only: a second sync is fine here
        raise ValueError(
            f"position_ids[{r}, {c}] = {value} is outside [0, max_position_embeddings); "
            "a document is longer than the position limit: truncate or split it (max_seq_len)."
        )
    bad_label = np.argwhere((flags & _BAD_LABEL).astype(bool) & real)
    if len(bad_label):
        raise _bad_label_error(labels, *(int(v) for v in bad_label[0]), vocab_size)  # error path: a sync is fine


def _bad_label_error(labels: Tensor, r: int, c: int, vocab_size: int) -> ValueError:
    return ValueError(
        f"labels[{r}, {c}] = {int(labels[r, c])} is neither a token id in [0, vocab_size={vocab_size}) nor "
        f"IGNORE_INDEX ({IGNORE_INDEX}); mark tokens without a target with {IGNORE_INDEX}."
    )


def _warn_if_labels_outside_documents(real: np.ndarray, flags: np.ndarray) -> None:
    """Warn (once per kind) about labels that no token of their document predicts: on padding, or
    on the first real token of a left-padded row. Stock Llama shifts labels along the padded row
    and trains on them from the padding position before; here they are not targets."""
    if _warned.issuperset(_WARNED_LABELS):  # both said: no work on the batch at later steps
        return
    supervised = (flags & _SUPERVISED).astype(bool)
    on_padding = np.argwhere(supervised & ~real)
    first = real.argmax(axis=1)
    left_padded = np.flatnonzero(real.any(axis=1) & (first > 0))
    after_padding = left_padded[supervised[left_padded, first[left_padded]]]
    if len(on_padding):
        r, c = (int(v) for v in on_padding[0])
        _warn_once(_WARNED_LABELS[0], f"labels[{r}, {c}] is on padding and is not {IGNORE_INDEX}: padding is no "
                   f"document's token, so no loss is taken on it here, while stock LlamaForCausalLM (which shifts "
                   f"labels along the padded row) trains on it. Set labels to {IGNORE_INDEX} on padding "
                   f"(labels[attention_mask == 0] = {IGNORE_INDEX}) to get stock Llama's loss exactly.")  # fmt: skip
    if len(after_padding):
        r = int(after_padding[0])
        _warn_once(_WARNED_LABELS[1], f"labels[{r}, {int(first[r])}], on the first real token of "
                   f"left-padded row {r}, is not {IGNORE_INDEX}: no token of its document comes before it, so it "
                   f"is not a target here, while stock LlamaForCausalLM trains on it from the padding position "
                   f"before it. Set it to {IGNORE_INDEX} to get stock Llama's loss exactly.")  # fmt: skip


_warned: set[str] = set()
_WARNED_LABELS = ("labels on padding", "labels after left padding")


def _warn_once(kind: str, message: str) -> None:
    if kind not in _warned:
        _warned.add(kind)
        log.warning("%s (Given once per process.)", message)


def _to_device(array: np.ndarray, dtype: torch.dtype, device: torch.device) -> Tensor:
    return _to(torch.from_numpy(np.ascontiguousarray(array)).to(dtype), device)


def _to(t: Tensor | None, device: torch.device) -> Tensor | None:
    """`t` on `device`; from the host to a GPU through pinned memory, without waiting for the GPU."""
    if t is None or t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)
