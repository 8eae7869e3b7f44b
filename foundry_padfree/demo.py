"""The main job: padding-free training through LLM-Foundry, offline, on CPU, in minutes.

    python -m foundry_padfree.demo [--run-dir runs/demo] [--prepare-only] [key=value ...]

1. Corpus: the docstrings of the Python standard library found on this machine (modules, classes
   and functions, each with its name and signature), one document each, in a fixed order; every
   25th document goes to the validation split.
2. Tokenizer: a byte-level BPE trained on the training split with `tokenizers`.
3. Data: MDS shards (`tokens` column, as LLM-Foundry's `convert_dataset_hf --concat_tokens`
   writes): documents end with EOS and are concatenated into rows of `max_seq_len` tokens.
4. Model: a tiny stock Llama `config.json`.
5. Training: `yamls/padfree-llama-cpu.yaml` with the paths filled in (written to
   `<run-dir>/train.yaml`), run by LLM-Foundry's `train_from_yaml` with the verification
   callbacks in strict mode and LLM-Foundry's `hf_checkpointer`.
6. Check: stock `transformers.LlamaForCausalLM` loads the exported checkpoint, its logits match
   the trained model's, and it generates text.
7. A short report; the exit status is 1 if any check failed.

Extra `key=value` arguments override the YAML (`max_duration=30ba`, `model.attn_backend=flex`).
Nothing is downloaded: the Hugging Face libraries are put in offline mode.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, PreTrainedTokenizerBase  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CPU_YAML = REPO / "yamls" / "padfree-llama-cpu.yaml"
# Standard-library folders that hold tests, demos or vendored code rather than library docs.
_SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
EOS_TOKEN_ID = 2  # train_tokenizer's fixed id for </s>
VAL_EVERY = 25


def stdlib_documents(max_documents: int | None = None, min_chars: int = 40) -> list[str]:
    """Docstrings of the standard library, one document each, in a fixed order.

    Each document is the object's dotted name (with the signature for functions) on its first line,
    then its docstring. Documents shorter than `min_chars` characters are left out.

    Args:
        max_documents: stop after this many (None: all, about 6,000 on CPython 3.11).
        min_chars: the shortest docstring kept.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts))
    docs: list[str] = []
    for path in files:
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for name, doc in _docstrings(path, module):
            if len(doc) >= min_chars:
                docs.append(f"{name}\n{doc}")
                if max_documents is not None and len(docs) >= max_documents:
                    return docs
    if not docs:
        raise RuntimeError(f"found no docstrings under {root}; is the Python standard library installed?")
    return docs


def _docstrings(path: Path, module: str) -> Iterator[tuple[str, str]]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    stack: list[tuple[ast.AST, str]] = [(tree, module)]
    while stack:
        node, name = stack.pop(0)
        doc = ast.get_docstring(node)  # type: ignore[arg-type]
        if doc:
            yield name, doc
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                stack.append((child, f"{name}.{child.name}({ast.unparse(child.args)})"))
            elif isinstance(child, ast.ClassDef):
                stack.append((child, f"{name}.{child.name}"))


def split_train_val(docs: list[str]) -> tuple[list[str], list[str]]:
    """Every `VAL_EVERY`-th document to validation, the rest to training."""
    return [d for i, d in enumerate(docs) if i % VAL_EVERY], [d for i, d in enumerate(docs) if not i % VAL_EVERY]


def write_mds(docs: list[str], tokenizer: PreTrainedTokenizerBase, out: Path, max_seq_len: int) -> int:
    """Tokenize, end each document with EOS, concatenate, cut into rows of `max_seq_len` tokens and
    write them as MDS with a `tokens` (int32) column; the last partial row is dropped, as
    LLM-Foundry's `--concat_tokens` does. Returns the number of rows."""
    from streaming import MDSWriter

    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    stream = np.fromiter((t for doc in ids for t in (*doc, tokenizer.eos_token_id)), dtype=np.int32)
    rows = len(stream) // max_seq_len
    if rows == 0:
        raise ValueError(f"{len(docs)} documents make {len(stream)} tokens, less than one row of {max_seq_len}.")
    with MDSWriter(out=str(out), columns={"tokens": "ndarray:int32"}, compression=None) as writer:
        for r in range(rows):
            writer.write({"tokens": stream[r * max_seq_len : (r + 1) * max_seq_len]})
    return rows


def tiny_llama_config(vocab_size: int, max_seq_len: int, **fields: Any) -> LlamaConfig:
    """The demo's model: a 4-layer GQA Llama of about 1M parameters (plus embeddings)."""
    config = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_seq_len,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=EOS_TOKEN_ID,
    )
    config.update(fields)
    return LlamaConfig(**config)


def prepare(
    run_dir: Path,
    max_seq_len: int = 128,
    vocab_size: int = 2048,
    max_documents: int | None = 4000,
    model_fields: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write corpus-derived tokenizer, MDS splits and model config under `run_dir` (replacing them)."""
    from foundry_padfree.data.tokenizer import train_tokenizer

    for sub in ("tokenizer", "data", "model_config", "hf"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)
    docs = stdlib_documents(max_documents)
    train_docs, val_docs = split_train_val(docs)
    tokenizer = train_tokenizer(train_docs, vocab_size, save_dir=run_dir / "tokenizer", model_max_length=max_seq_len)
    assert tokenizer.eos_token_id == EOS_TOKEN_ID, f"tokenizer EOS id {tokenizer.eos_token_id} != {EOS_TOKEN_ID}"
    rows = {split: write_mds(split_docs, tokenizer, run_dir / "data" / split, max_seq_len)
            for split, split_docs in (("train", train_docs), ("val", val_docs))}  # fmt: skip
    tiny_llama_config(len(tokenizer), max_seq_len, **(model_fields or {})).save_pretrained(run_dir / "model_config")
    return {"documents": len(docs), "train_rows": rows["train"], "val_rows": rows["val"], "vocab": len(tokenizer)}


def write_train_yaml(run_dir: Path, overrides: list[str], yaml_path: Path = CPU_YAML) -> Path:
    """The CPU YAML with `variables.run_dir` set, an in-memory logger added (for the report) and
    the command-line overrides merged; written to `<run_dir>/train.yaml`."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(yaml_path)
    cfg.variables.run_dir = str(run_dir)
    cfg.loggers = cfg.get("loggers") or {}
    cfg.loggers.inmemory = {}
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_cli(overrides))
    path = run_dir / "train.yaml"
    OmegaConf.save(cfg, path)
    return path


def verify_export(trainer: Any, run_dir: Path, val_docs: list[str], tokenizer: PreTrainedTokenizerBase) -> dict:
    """Load the exported checkpoint with stock `LlamaForCausalLM`; compare logits with the trained
    model on validation documents (HF padding) and generate a continuation."""
    from transformers import LlamaForCausalLM

    # hf_checkpointer writes <save_folder>/huggingface/ba<step>.
    hf_dir = run_dir / "hf" / "huggingface" / f"ba{int(trainer.state.timestamp.batch)}"
    stock = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    ours = trainer.state.model.model.eval()
    batch = tokenizer(val_docs[:4], return_tensors="pt", padding=True, truncation=True, max_length=64)
    with torch.no_grad():
        real = batch["attention_mask"].bool()
        # The trained model may sit on a GPU (it takes the host batch as it is); the export is read on the CPU.
        expected = ours(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().cpu()[real]
        got = stock(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[real]
        prompt = tokenizer("Return the", return_tensors="pt", add_special_tokens=False)["input_ids"]
        generated = stock.generate(prompt, max_new_tokens=24, do_sample=False, no_repeat_ngram_size=3,
                                   pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    diff = float((got - expected).abs().max())
    return {
        "path": hf_dir,
        "class": type(stock).__name__,
        "model_type": stock.config.model_type,
        "logits_max_abs_diff": diff,
        "logits_max_rel_diff": diff / max(float(got.abs().max()), 1e-30),
        "sample": tokenizer.decode(generated[0], skip_special_tokens=True),
    }


def _series(trainer: Any, key: str) -> list[float]:
    from composer.loggers import InMemoryLogger

    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    return [float(v) for _, v in memory.data.get(key, [])]


def _callback(trainer: Any, cls: type) -> Any:
    return next((c for c in trainer.state.callbacks if isinstance(c, cls)), None)


def report(trainer: Any, export: dict, prepared: dict) -> tuple[str, bool]:
    """A human-readable summary of the run, and whether every check passed."""
    from composer.core import Precision

    from foundry_padfree.callbacks import (
        PadFreeAudit,
        PadFreeIsolation,
        PadFreeParity,
        PadFreeStats,
        default_parity_tolerance,
    )

    train_loss = _series(trainer, "loss/train/total")
    eval_ce = _series(trainer, "metrics/eval/LanguageCrossEntropy")
    window = max(1, min(10, len(train_loss) // 4))
    first, last = float(np.mean(train_loss[:window])), float(np.mean(train_loss[-window:]))
    loss_down = last < first and (len(eval_ce) < 2 or eval_ce[-1] < eval_ce[0])
    on_gpu = trainer.state.device.name == "gpu"
    audit, isolation = _callback(trainer, PadFreeAudit), _callback(trainer, PadFreeIsolation)
    parity, stats = _callback(trainer, PadFreeParity), _callback(trainer, PadFreeStats)
    checks = {
        "loss went down": loss_down,
        "audit": audit is not None and audit.summary["forwards_audited"] > 0 and audit.summary["checks_failed"] == 0,
        "isolation": isolation is not None
        and isolation.summary["probes"] > 0
        and not isolation.summary["probes_failed"],
        "parity": parity is not None and parity.summary["probes"] > 0 and not parity.summary["probes_failed"],
        "stock HF loads the checkpoint": export["class"] == "LlamaForCausalLM" and export["model_type"] == "llama",
        # fp32 forwards on both sides, as padfree_parity judges them (TF32 products on a GPU).
        "stock HF logits match": export["logits_max_rel_diff"] <= default_parity_tolerance(Precision.FP32, on_gpu),
    }
    pad_fraction = _series(trainer, "padfree/stats/padded_batch_pad_fraction")
    tokens_per_sec = _series(trainer, "padfree/stats/real_tokens_per_sec")
    eval_line = f"{eval_ce[0]:.3f} -> {eval_ce[-1]:.3f}" if len(eval_ce) >= 2 else "n/a"
    ok = "ok" if all(checks.values()) else "FAILED"
    lines = [
        "",
        "=" * 78,
        f"foundry_padfree main job: {ok}",
        "=" * 78,
        f"corpus          {prepared['documents']} standard-library docstrings, vocab {prepared['vocab']}, "
        f"{prepared['train_rows']} train / {prepared['val_rows']} val rows",
        f"training        {int(trainer.state.timestamp.batch)} steps, {int(trainer.state.timestamp.token)} real tokens",
        f"train loss      {first:.3f} (first {window} steps) -> {last:.3f} (last {window})   [{_mark(loss_down)}]",
        f"eval loss       {eval_line}",
        f"audit           {audit.summary['forwards_audited']} forwards audited, "
        f"{audit.summary['checks_failed']} failed checks (one unpad per forward; varlen kernel in "
        f"{audit.summary.get('varlen_layers', 0):.0f}/{audit.summary.get('num_layers', 0):.0f} layers, one "
        f"metadata object)   [{_mark(checks['audit'])}]",
        f"isolation       {isolation.summary['probes']} probes ({isolation.summary['probes_failed']} failed), last: "
        f"max |delta logits| of other documents "
        f"{isolation.summary.get('max_abs_diff_other_docs', float('nan')):.3g} "
        f"(perturbed document: {isolation.summary.get('max_abs_diff_perturbed_doc', float('nan')):.3g})   "
        f"[{_mark(checks['isolation'])}]",
        f"parity          vs stock HF Llama on padded rows: |delta loss| {parity.summary.get('loss_abs_diff', 0):.2g}, "
        f"max |delta logits| {parity.summary.get('logits_max_abs_diff', 0):.2g}   [{_mark(checks['parity'])}]",
        f"padding avoided {np.mean(pad_fraction):.1%} of a one-document-per-row padded batch would be padding; "
        f"{stats.summary.get('documents_per_row', 0):.1f} documents per row",
        f"throughput      {np.mean(tokens_per_sec):,.0f} real tokens/s ({_where(on_gpu)})",
        f"HF checkpoint   {export['path']}",
        f"                stock {export['class']} (model_type {export['model_type']}) loads it; max |delta logits| "
        f"vs the trained model {export['logits_max_abs_diff']:.2g}   [{_mark(checks['stock HF logits match'])}]",
        f"                greedy sample: {export['sample']!r}",
        "=" * 78,
    ]
    return "\n".join(lines), all(checks.values())


def _where(on_gpu: bool) -> str:
    return torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"


def _mark(passed: bool) -> str:
    return "ok" if passed else "FAILED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="where everything is written")
    parser.add_argument("--prepare-only", action="store_true", help="write data, tokenizer and config; no training")
    parser.add_argument("--max-documents", type=int, default=4000, help="corpus size (documents)")
    parser.add_argument("--yaml", type=Path, default=CPU_YAML, help="the run YAML (default: the checkout's CPU YAML)")
    parser.add_argument("overrides", nargs="*", help="YAML overrides, key=value (OmegaConf dotlist)")
    args = parser.parse_args(argv)
    if not args.prepare_only and not args.yaml.is_file():
        parser.error(
            f"the run YAML {args.yaml} does not exist. The demo trains from yamls/padfree-llama-cpu.yaml of a "
            "foundry_padfree checkout, which a regular install does not ship: run it from a checkout "
            "(pip install -e .), or pass --yaml PATH to a copy."
        )
    run_dir = args.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)

    print(f"Preparing corpus, tokenizer, MDS data and model config under {run_dir} ...", flush=True)
    prepared = prepare(run_dir, max_documents=args.max_documents)
    print(f"  {prepared}", flush=True)
    if args.prepare_only:
        return 0

    from llmfoundry.command_utils import train_from_yaml
    from transformers import AutoTokenizer

    yaml_path = write_train_yaml(run_dir, args.overrides, args.yaml)
    print(f"Training with LLM-Foundry: {yaml_path}", flush=True)
    trainer = train_from_yaml(str(yaml_path))
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    _, val_docs = split_train_val(stdlib_documents(args.max_documents))
    export = verify_export(trainer, run_dir, val_docs, tokenizer)
    trainer.close()  # ends Composer's progress bars before the report
    text, ok = report(trainer, export, prepared)
    print(text, flush=True)
    (run_dir / "report.txt").write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
