"""Composer eval of a `padfree_finetuning` loader, for `test_multiprocess.py` to launch on N ranks.

    python -m composer.cli.launcher -n 2 tests/eval_ranks.py WORKDIR

WORKDIR holds `seven.jsonl` and `five.jsonl` (prompt/response rows) and `model/` (a stock Llama
config directory). Rank 0 writes `WORKDIR/eval_<world size>.json`: per dataset, the target tokens
`LanguageCrossEntropy` scored (summed over ranks) and the metric's value.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from composer import Trainer
from composer.core import Evaluator
from composer.utils import dist

from foundry_padfree.data.finetuning import build_padfree_finetuning_dataloader
from tests.composer_helpers import composer_model
from tests.data_helpers import tokenizer


def main(workdir: Path) -> None:
    dist.initialize_dist("cpu")
    evaluators, tok = [], tokenizer()  # trained once: a BPE fit on the stdlib's docstrings
    for name in ("seven", "five"):
        dataset = dict(hf_name="json", hf_kwargs={"data_files": str(workdir / f"{name}.jsonl")}, split="train",
                       max_seq_len=512, decoder_only_format=True, shuffle=False)  # fmt: skip
        loader = build_padfree_finetuning_dataloader(tok, 2, dataset, packing_mode="flatten")
        evaluators.append(Evaluator(label=name, dataloader=loader, metric_names=["LanguageCrossEntropy"],
                                    device_eval_microbatch_size=2))  # fmt: skip
    trainer = Trainer(model=composer_model(workdir / "model"), eval_dataloader=evaluators, device="cpu",
                      progress_bar=False, log_to_console=False)  # fmt: skip
    trainer.eval()
    out = {}
    for name in ("seven", "five"):
        metric = trainer.state.eval_metrics[name]["LanguageCrossEntropy"]
        loss = float(metric.compute())  # on every rank: compute() syncs the ranks
        # `total_items` is this rank's count again after compute().
        scored = torch.tensor([float(metric.total_items)])
        dist.all_reduce(scored)
        out[name] = {"scored_targets": int(scored.item()), "loss": loss}
    if dist.get_global_rank() == 0:
        (workdir / f"eval_{dist.get_world_size()}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
