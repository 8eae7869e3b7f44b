"""Tiny Composer runs of `padfree_causal_lm` on hand-made packed batches (CPU, fp32, seconds)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from composer import Trainer
from composer.core import DataSpec
from composer.loggers import InMemoryLogger
from composer.utils import dist
from llmfoundry.data.utils import get_tokens_per_batch_func
from torch.utils.data import DataLoader

from foundry_padfree.composer_model import ComposerPadFreeCausalLM
from tests.conftest import tiny_config

VOCAB = 97
SEQ_LEN = 16
# Document lengths of each packed row (padding fills the rest of the 16 columns).
ROWS = [[5, 3, 7], [4, 6], [16], [2, 2, 2, 9], [10, 1], [3, 12], [6, 6, 4], [8]]


def write_model_dir(path: Path, **overrides) -> Path:
    """A stock Llama config directory (what a YAML's `pretrained_model_name_or_path` points at)."""
    tiny_config(**overrides).to_llama_config().save_pretrained(path)
    return path


def composer_model(model_dir: Path, seed: int = 0, tokenizer=None, **options) -> ComposerPadFreeCausalLM:
    """`padfree_causal_lm` with fresh weights drawn after seeding with `seed`."""
    options.setdefault("attn_backend", "sdpa")
    torch.manual_seed(seed)
    return ComposerPadFreeCausalLM(tokenizer=tokenizer, pretrained_model_name_or_path=str(model_dir), pretrained=False,
                                   **options)  # fmt: skip


def packed_row(doc_lens: list[int], seed: int, seq_len: int = SEQ_LEN) -> dict:
    """One right-padded packed row as our loaders emit it: -100 labels at padding and document starts."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(seq_len, dtype=torch.long)
    seq_id = torch.full((seq_len,), -1, dtype=torch.long)
    labels = torch.full((seq_len,), -100, dtype=torch.long)
    col = 0
    for k, n in enumerate(doc_lens):
        ids[col : col + n] = torch.randint(3, VOCAB, (n,), generator=gen)
        seq_id[col : col + n] = k
        labels[col + 1 : col + n] = ids[col + 1 : col + n]
        col += n
    real = seq_id >= 0
    return {
        "input_ids": ids,
        "attention_mask": real.long(),
        "sequence_id": seq_id,
        "labels": labels,
        "total_tokens": int(real.sum()),
        "loss_generating_tokens": int((labels[1:] != -100).sum()),
    }


def collate(rows: list[dict]) -> dict:
    return {k: torch.stack([r[k] for r in rows]) if isinstance(rows[0][k], torch.Tensor) else [r[k] for r in rows]
            for k in rows[0]}  # fmt: skip


def packed_batch(rows: list[list[int]] = ROWS[:4], seed: int = 0) -> dict:
    return collate([packed_row(doc_lens, seed + i) for i, doc_lens in enumerate(rows)])


def train_loader(batch_size: int = 4, rows: list[list[int]] = ROWS, seq_len: int = SEQ_LEN) -> DataSpec:
    data = [packed_row(doc_lens, i, seq_len) for i, doc_lens in enumerate(rows)]
    sampler = dist.get_sampler(data, shuffle=False) if dist.get_world_size() > 1 else None  # rows split by rank
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate, sampler=sampler)
    return DataSpec(loader, get_num_tokens_in_batch=get_tokens_per_batch_func())


def fit(
    model: ComposerPadFreeCausalLM,
    callbacks: list,
    batches: int = 2,
    microbatch: int = 2,
    rows: list[list[int]] = ROWS,
    seq_len: int = SEQ_LEN,
    **kwargs,
) -> Trainer:
    """Train `batches` steps of 4 of `rows` (document lengths per row, in rows of `seq_len`
    tokens) with an in-memory logger."""
    torch.manual_seed(0)
    trainer = Trainer(
        model=model,
        train_dataloader=train_loader(rows=rows, seq_len=seq_len),
        max_duration=f"{batches}ba",
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        device_train_microbatch_size=microbatch,
        accumulate_train_batch_on_tokens=True,
        callbacks=callbacks,
        loggers=[InMemoryLogger()],
        progress_bar=False,
        log_to_console=False,
        seed=0,
        **kwargs,
    )
    trainer.fit()
    return trainer


def logged(trainer: Trainer, key: str) -> list[float]:
    """Every value logged under `key`, in order."""
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    return [float(v) for _, v in memory.data.get(key, [])]


def _dense_attend(q_TNH, k_TKH, v_TKH, scale, **sdpa):
    """SDPA over the whole `[T]` token stream (GQA heads expanded), with `sdpa`'s mask."""
    groups = q_TNH.shape[1] // k_TKH.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1).transpose(0, 1) for t in (k_TKH, v_TKH))
    return F.scaled_dot_product_attention(q_TNH.transpose(0, 1), k, v, scale=scale, **sdpa).transpose(0, 1)


def leaky_attend(q_TNH, k_TKH, v_TKH, meta, scale):
    """Plain causal attention over the whole packed stream: documents see their predecessors."""
    return _dense_attend(q_TNH, k_TKH, v_TKH, scale, is_causal=True)


def within_rows_attend(q_TNH, k_TKH, v_TKH, meta, scale):
    """Causal over each row's whole token stream, never across rows: a document sees the earlier
    documents of its row (the leak packing causes), and documents of other rows see nothing."""
    row_T = meta.indices_T // meta.seq_len
    allowed = (row_T[:, None] == row_T[None, :]) & torch.ones(len(row_T), len(row_T), dtype=torch.bool).tril()
    return _dense_attend(q_TNH, k_TKH, v_TKH, scale, attn_mask=allowed)
