"""Print packing statistics of `padfree_finetuning` for a dataset and config, and write them as JSON.

For each packing mode it builds the loader through LLM-Foundry's `build_dataloader` (so the numbers
are those of a real run), iterates one epoch and reports: examples, examples LLM-Foundry filtered
before packing, examples the packer dropped (always 0), rows of padding that even out the ranks
(always 0 on one rank), examples truncated to `max_seq_len`, rows, steps, padding efficiency (real
tokens / (rows * max_tokens_per_row)), the same over the batch tensors actually built (columns are
trimmed to the longest row), documents per row and examples per step.

    # prompt/response JSONL; the tokenizer is trained on the data itself (offline, no download)
    python scripts/packing_stats.py --data alpaca_eval_outputs.jsonl \
        --prompt-key instruction --response-key output --max-seq-len 2048

    # the train_loader of a run YAML whose variables are filled in (e.g. a copy of
    # yamls/sft_llama3_1b.yaml), with the run's tokenizer saved in a local directory
    python scripts/packing_stats.py --config my-sft.yaml --tokenizer ./my-tokenizer
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

COLUMNS = (
    ("mode", "{}"),
    ("examples", "{}"),
    ("filtered", "{}"),
    ("dropped", "{}"),
    ("empty_rows", "{}"),
    ("truncated", "{}"),
    ("rows", "{}"),
    ("steps", "{}"),
    ("efficiency", "{:.4f}"),
    ("tensor_efficiency", "{:.4f}"),
    ("docs_per_row_mean", "{:.2f}"),
    ("docs_per_row_max", "{}"),
    ("examples_per_step_mean", "{:.1f}"),
    ("examples_per_step_min", "{}"),
    ("examples_per_step_max", "{}"),
)


def packing_stats(loader_cfg: dict[str, Any], tokenizer: Any, device_batch_size: int) -> dict[str, Any]:
    """Build `loader_cfg` (a `padfree_finetuning` train_loader section), iterate epoch 0, count."""
    from llmfoundry.data.dataloader import build_dataloader

    from foundry_padfree.data.dataspec import count_documents

    start = time.perf_counter()
    spec = build_dataloader(copy.deepcopy(loader_cfg), tokenizer, device_batch_size)
    loader = spec.dataloader
    sampler, dataset = loader.batch_sampler, loader.dataset
    capacity = sampler.row_capacity
    rows = steps = real = cells = documents = 0
    docs_per_row_max = 0
    examples_per_step = []
    for batch in loader:
        steps += 1
        rows += batch["input_ids"].shape[0]
        cells += batch["input_ids"].numel()
        real += sum(batch["total_tokens"])
        n = count_documents(batch)
        documents += n
        examples_per_step.append(n)
        docs_per_row_max = max(docs_per_row_max, int(batch["sequence_id"].max()) + 1)
    plan = sampler.plan(0)
    placed = {i for step in plan.batches for shares in step for row in shares for i in row}
    return {
        "mode": sampler.mode,
        "examples": len(dataset),
        "filtered": _filtered_by_llmfoundry(loader_cfg["dataset"], len(dataset)),
        "dropped": len(dataset) - len(placed),
        "empty_rows": plan.empty_rows,
        "truncated": dataset.truncated_examples,
        "rows": rows,
        "steps": steps,
        "efficiency": real / (rows * capacity),
        "tensor_efficiency": real / cells,
        "docs_per_row_mean": documents / rows,
        "docs_per_row_max": docs_per_row_max,
        "examples_per_step_mean": documents / steps,
        "examples_per_step_min": min(examples_per_step),
        "examples_per_step_max": max(examples_per_step),
        "real_tokens": real,
        "row_capacity": capacity,
        "device_batch_size": device_batch_size,
        "seconds": time.perf_counter() - start,
    }


def _filtered_by_llmfoundry(dataset_cfg: dict[str, Any], kept: int) -> int | None:
    """Examples LLM-Foundry's HF builder removed before packing (None for streaming data)."""
    if "hf_name" not in dataset_cfg:
        return None
    import datasets

    raw = datasets.load_dataset(dataset_cfg["hf_name"], split=dataset_cfg["split"], **dataset_cfg.get("hf_kwargs", {}))
    return len(raw) - kept


def format_table(results: list[dict[str, Any]]) -> str:
    cells = [[name for name, _ in COLUMNS]]
    for result in results:
        cells.append(["-" if result[name] is None else fmt.format(result[name]) for name, fmt in COLUMNS])
    widths = [max(len(row[c]) for row in cells) for c in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in cells)


def _jsonl_loader_cfg(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "name": "padfree_finetuning",
        "dataset": {
            "hf_name": "json",
            "hf_kwargs": {"data_files": str(Path(args.data).resolve())},
            "split": "train",
            "preprocessing_fn": {"prompt": args.prompt_key, "response": args.response_key},
            "max_seq_len": args.max_seq_len,
            "decoder_only_format": True,
            "shuffle": True,
            "shuffle_seed": args.seed,
        },
        "num_workers": 0,
        "packing_buffer_size": args.buffer_size,
    }


def _config_loader_cfg(path: str) -> dict[str, Any]:
    cfg = OmegaConf.load(path)
    section = cfg.train_loader if "train_loader" in cfg else cfg
    loader_cfg = OmegaConf.to_container(section, resolve=True)
    if loader_cfg.get("name") != "padfree_finetuning":
        raise ValueError(f"{path}: the loader is {loader_cfg.get('name')!r}; this tool reports on padfree_finetuning.")
    return loader_cfg


def _tokenizer(args: argparse.Namespace) -> tuple[Any, str]:
    if args.tokenizer:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(args.tokenizer, model_max_length=args.max_seq_len), args.tokenizer
    if not args.data:
        raise ValueError("with --config, pass --tokenizer (a local tokenizer directory) so lengths are real.")
    from foundry_padfree.data.tokenizer import train_tokenizer

    texts = []
    with open(args.data, encoding="utf-8") as f:
        for k, line in enumerate(f):
            if args.tokenizer_sample and k >= args.tokenizer_sample:
                break
            row = json.loads(line)
            texts += [row[args.prompt_key], row[args.response_key]]
    tok = train_tokenizer(texts, vocab_size=args.vocab_size, model_max_length=args.max_seq_len)
    return tok, f"byte-level BPE, {len(tok)} tokens, trained on {len(texts) // 2} examples of the data"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="prompt/response JSONL file")
    source.add_argument("--config", help="run YAML (its train_loader) or a loader section, name padfree_finetuning")
    parser.add_argument("--prompt-key", default="prompt")
    parser.add_argument("--response-key", default="response")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--tokenizer", help="local tokenizer directory; default: train one on --data")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the tokenizer trained on --data")
    parser.add_argument("--tokenizer-sample", type=int, default=0, help="train it on the first N examples (0: all)")
    parser.add_argument("--modes", default="budget,flatten", help="comma-separated packing modes")
    parser.add_argument("--rows-per-step", type=int, default=8, help="device_batch_size in budget mode")
    parser.add_argument("--examples-per-step", type=int, default=64, help="device_batch_size in flatten mode")
    parser.add_argument("--buffer-size", type=int, default=1024, help="packing_buffer_size")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    tokenizer, tokenizer_desc = _tokenizer(args)
    base_cfg = _jsonl_loader_cfg(args) if args.data else _config_loader_cfg(args.config)
    results = []
    for mode in args.modes.split(","):
        cfg = {**base_cfg, "packing_mode": mode}
        batch_size = args.rows_per_step if mode == "budget" else args.examples_per_step
        results.append(packing_stats(cfg, tokenizer, batch_size))
    dataset_cfg = base_cfg["dataset"]
    print(f"data: {args.data or args.config}; max_seq_len {dataset_cfg['max_seq_len']}; tokenizer: {tokenizer_desc}")
    print(
        f"budget: {args.rows_per_step} rows/step; flatten: {args.examples_per_step} examples/step; "
        f"packing_buffer_size {base_cfg.get('packing_buffer_size', 1024)}"
    )
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
