"""Tensor parallelism through HF's `from_pretrained(tp_plan="auto")`, for `test_multiprocess.py`
to launch on 2 ranks (gloo, CPU):

    python -m composer.cli.launcher -n 2 tests/tp_ranks.py WORKDIR

Rank 0 saves a stock Llama checkpoint to WORKDIR/stock; each rank loads it sharded by heads into
the padding-free model and into stock Llama, and writes `WORKDIR/tp_rank<r>.json` with both
models' largest |logits difference| from the unsharded stock model on a padded batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from foundry_padfree import PadFreeLlamaForCausalLM


def main(workdir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    stock = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    if rank == 0:
        stock.save_pretrained(workdir / "stock")
    dist.barrier()
    ids = torch.randint(3, 101, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        reference = stock(ids, attention_mask=mask).logits[mask.bool()]
        diffs = {}
        systems = (("stock", LlamaForCausalLM, {}), ("ours", PadFreeLlamaForCausalLM, {"attn_backend": "sdpa"}))
        for name, cls, options in systems:
            model = cls.from_pretrained(workdir / "stock", tp_plan="auto", **options).eval()
            sharded = model.model.layers[0].self_attn.q_proj.weight
            diffs[name] = {
                "max_abs_diff": float((model(ids, attention_mask=mask).logits[mask.bool()] - reference).abs().max()),
                "q_proj_is_sharded": type(sharded).__name__ == "DTensor",
            }
    (workdir / f"tp_rank{rank}.json").write_text(json.dumps(diffs))
    dist.barrier()  # both ranks done before either tears its gloo connections down
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
