"""The shipped YAMLs, run end to end through LLM-Foundry's `train_from_yaml` on CPU.

`train_from_yaml` is what LLM-Foundry's `scripts/train/train.py` (and our `scripts/train.py`) calls:
it parses the YAML, merges command-line-style overrides, and builds every component from the
registries, so these tests also prove that our entry-point names are wired up.

- the CPU YAML on a small slice of the demo corpus, with microbatching: every verification
  callback fires and passes, the loss goes down, and the exported HF checkpoint loads into stock
  `LlamaForCausalLM` with the trained model's logits;
- the same YAML through `scripts/train.py` in a subprocess;
- the SmolLM2-135M pretraining and Llama-3.2-1B SFT YAMLs, shrunk from the command line to one
  tiny layer, for two steps each;
- typos and unknown values fail before training, naming the bad key or value and the fix.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from composer.loggers import InMemoryLogger
from llmfoundry.command_utils import train_from_yaml
from transformers import AutoTokenizer, LlamaForCausalLM

from foundry_padfree import demo
from foundry_padfree.data.tokenizer import stdlib_texts, train_tokenizer
from tests.data_helpers import prompt_response_rows, write_jsonl, write_mds

REPO = Path(__file__).resolve().parent.parent
CPU_YAML = REPO / "yamls" / "padfree-llama-cpu.yaml"
PRETRAIN_YAML = REPO / "yamls" / "pretrain_smollm2_135m.yaml"
SFT_YAML = REPO / "yamls" / "sft_llama3_1b.yaml"

# One tiny layer; the shipped configs keep everything else (tied embeddings, RoPE settings).
TINY_MODEL = [
    "model.config_overrides.num_hidden_layers=1",
    "model.config_overrides.hidden_size=64",
    "model.config_overrides.intermediate_size=128",
    "model.config_overrides.num_attention_heads=4",
    "model.config_overrides.num_key_value_heads=2",
    "model.config_overrides.head_dim=16",
]
# FSDP and bf16 autocast are for GPUs; on one CPU process the run is plain fp32.
CPU_RUN = ["fsdp_config=null", "precision=fp32", "train_loader.num_workers=0", "progress_bar=false"]


def _logged(trainer, key: str) -> list[float]:
    memory = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    return [float(v) for _, v in memory.data.get(key, [])]


@pytest.fixture(scope="module")
def demo_run_dir(tmp_path_factory) -> Path:
    """The demo's data, tokenizer and model config from 300 standard-library docstrings."""
    run_dir = tmp_path_factory.mktemp("demo")
    prepared = demo.prepare(run_dir, max_documents=300)
    assert prepared["train_rows"] >= 16, prepared
    return run_dir


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE saved to disk (pad 0, bos 1, eos 2)."""
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(stdlib_texts(), vocab_size=512, save_dir=path, model_max_length=4096)
    return path


def _cpu_yaml_overrides(run_dir: Path, hf_folder: Path, batches: int) -> list[str]:
    return [
        f"variables.run_dir={run_dir}",
        f"max_duration={batches}ba",
        "global_train_batch_size=8",
        "device_train_microbatch_size=4",  # two microbatches per step
        "scheduler.t_warmup=0ba",
        "eval_first=false",
        f"eval_interval={batches}ba",
        "eval_subset_num_batches=2",
        "progress_bar=false",
        "console_log_interval=1ba",
        "callbacks.padfree_audit.interval=2",
        "callbacks.padfree_isolation.interval=3",
        "callbacks.padfree_parity.interval=3",
        "callbacks.padfree_stats.interval=2",
        f"callbacks.hf_checkpointer.save_folder={hf_folder}",
    ]


@pytest.mark.slow
def test_cpu_yaml_trains_verifies_and_exports(demo_run_dir, tmp_path):
    batches = 8
    overrides = [*_cpu_yaml_overrides(demo_run_dir, tmp_path / "hf", batches), "loggers.inmemory={}"]
    trainer = train_from_yaml(str(CPU_YAML), overrides)

    assert int(trainer.state.timestamp.batch) == batches
    # Every callback fired (the first batch is always due) and passed, in strict mode.
    audit_passed = _logged(trainer, "padfree/audit/passed")
    assert len(audit_passed) >= 2 and all(v == 1.0 for v in audit_passed), audit_passed
    num_layers = trainer.state.model.config.num_hidden_layers
    assert set(_logged(trainer, "padfree/audit/varlen_layers")) == {num_layers}
    assert set(_logged(trainer, "padfree/audit/unpad_calls")) == {1.0}
    assert _logged(trainer, "padfree/isolation/passed") and set(_logged(trainer, "padfree/isolation/passed")) == {1.0}
    assert set(_logged(trainer, "padfree/isolation/max_abs_diff_other_docs")) == {0.0}
    assert min(_logged(trainer, "padfree/isolation/max_abs_diff_perturbed_doc")) > 0  # the probe changed something
    assert _logged(trainer, "padfree/parity/passed") and set(_logged(trainer, "padfree/parity/passed")) == {1.0}
    assert _logged(trainer, "padfree/stats/real_tokens_per_sec")

    # One finite loss per step, and training lowers it (fresh weights, lr 3e-3, no warmup).
    loss = _logged(trainer, "loss/train/total")
    assert len(loss) == batches and all(math.isfinite(v) for v in loss), loss
    assert np.mean(loss[-2:]) < loss[0] - 0.3, loss
    assert _logged(trainer, "metrics/eval/LanguageCrossEntropy")

    # hf_checkpointer's export is a stock Llama checkpoint with the trained model's logits.
    hf_dir = tmp_path / "hf" / "huggingface" / f"ba{batches}"
    stock = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    assert stock.config.model_type == "llama"
    ours = trainer.state.model.model.eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_run_dir / "tokenizer")
    texts = ["Return the number of items.", "class Path:\n    A filesystem path, and its parts."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        real = batch["attention_mask"].bool()
        expected = ours(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[real]
        got = stock(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[real]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    trainer.close()


@pytest.mark.slow
def test_scripts_train_runs_the_cpu_yaml(demo_run_dir, tmp_path):
    overrides = _cpu_yaml_overrides(demo_run_dir, tmp_path / "hf", batches=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "scripts/train.py", str(CPU_YAML), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "hf" / "huggingface" / "ba2" / "config.json").exists()


@pytest.mark.slow
def test_pretrain_smollm2_yaml_runs_shrunk(tiny_tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ids = [t for text in stdlib_texts() for t in (*tokenizer(text)["input_ids"], tokenizer.eos_token_id)]
    row_len = 64
    rows = [np.array(ids[i : i + row_len], dtype=np.int32) for i in range(0, 16 * row_len, row_len)]
    for split in ("train", "val"):
        write_mds(tmp_path / "data" / split, {"tokens": "ndarray:int32"}, [{"tokens": r} for r in rows])
    overrides = [
        f"variables.data_local={tmp_path / 'data'}",
        f"variables.tokenizer_dir={tiny_tokenizer_dir}",
        f"variables.save_folder={tmp_path / 'out'}",
        f"variables.eos_token_id={tokenizer.eos_token_id}",
        f"variables.max_seq_len={row_len}",
        *TINY_MODEL,
        f"model.config_overrides.vocab_size={len(tokenizer)}",
        *CPU_RUN,
        "eval_loader.num_workers=0",
        "global_train_batch_size=4",
        "device_train_microbatch_size=2",
        "device_eval_batch_size=4",
        "max_duration=2ba",
        "eval_interval=2ba",
        "eval_subset_num_batches=1",
        "loggers.inmemory={}",
    ]
    trainer = train_from_yaml(str(PRETRAIN_YAML), overrides)
    config = trainer.state.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.rope_theta) == (1, 64, 100000)
    assert config.tie_word_embeddings
    loss = _logged(trainer, "loss/train/total")
    assert len(loss) == 2 and all(math.isfinite(v) for v in loss), loss
    assert set(_logged(trainer, "padfree/audit/passed")) == {1.0}
    assert set(_logged(trainer, "padfree/parity/passed")) == {1.0}  # stock HF Llama at rope_theta 100000 too
    assert _logged(trainer, "metrics/eval/LanguageCrossEntropy")
    assert (tmp_path / "out" / "hf" / "huggingface" / "ba2" / "config.json").exists()
    trainer.close()


def _sft_overrides(tokenizer_dir: Path, tmp_path: Path) -> list[str]:
    data = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": r["q"], "response": r["a"]} for r in prompt_response_rows(24)]
    )
    return [
        f"variables.model_dir={REPO / 'yamls' / 'model_configs' / 'llama3.2-1b'}",
        "model.pretrained=false",  # the shipped config directory has no weights
        f"variables.tokenizer_dir={tokenizer_dir}",
        f"variables.data_files={data}",
        f"variables.save_folder={tmp_path / 'out'}",
        "variables.max_seq_len=128",
        "variables.max_tokens_per_row=256",
        *TINY_MODEL,
        "model.config_overrides.vocab_size=512",
        *CPU_RUN,
        "global_train_batch_size=2",
        "device_train_microbatch_size=1",
        "max_duration=2ba",
        "loggers.inmemory={}",
    ]


@pytest.mark.slow
def test_sft_llama3_yaml_runs_shrunk(tiny_tokenizer_dir, tmp_path):
    trainer = train_from_yaml(str(SFT_YAML), _sft_overrides(tiny_tokenizer_dir, tmp_path))
    config = trainer.state.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim) == (1, 64, 16)
    assert config.rope_scaling["rope_type"] == "llama3" and config.tie_word_embeddings
    loss = _logged(trainer, "loss/train/total")
    assert len(loss) == 2 and all(math.isfinite(v) for v in loss), loss
    assert set(_logged(trainer, "padfree/audit/passed")) == {1.0}
    # Budget packing: several examples share a row of max_tokens_per_row tokens.
    assert max(_logged(trainer, "padfree/stats/documents_per_row")) > 1
    assert (tmp_path / "out" / "hf" / "huggingface" / "ba2" / "config.json").exists()
    trainer.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.atn_backend=flex", r"atn_backend: did you mean 'attn_backend'\?"),
        (
            "model.attn_backend=flesh",
            r"attn_backend='flesh' is not a known backend; use one of auto, triton, flash_attn",
        ),
    ],
)
def test_cpu_yaml_model_typos_fail_fast(demo_run_dir, tmp_path, override, match):
    overrides = [*_cpu_yaml_overrides(demo_run_dir, tmp_path / "hf", batches=1), override]
    with pytest.raises(ValueError, match=match):
        train_from_yaml(str(CPU_YAML), overrides)


@pytest.mark.slow
def test_sft_yaml_loader_typo_fails_fast(tiny_tokenizer_dir, tmp_path):
    overrides = [*_sft_overrides(tiny_tokenizer_dir, tmp_path), "train_loader.packing_mod=budget"]
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['packing_mod'\].*packing_mode"):
        train_from_yaml(str(SFT_YAML), overrides)


@pytest.mark.parametrize("yaml_path", [PRETRAIN_YAML, SFT_YAML], ids=["pretrain", "sft"])
def test_required_paths_must_be_given(yaml_path):
    # Data and tokenizer paths are `???` in the YAML: the error names the variable to set.
    with pytest.raises(Exception, match=r"Missing mandatory value: variables\.(data_local|tokenizer_dir|model_dir)"):
        train_from_yaml(str(yaml_path), [])


def test_demo_without_its_yaml_says_what_to_do(tmp_path, capsys):
    # A regular (non-editable) install ships the package but not the checkout's yamls/.
    from foundry_padfree import demo

    with pytest.raises(SystemExit):
        demo.main(["--run-dir", str(tmp_path), "--yaml", str(tmp_path / "missing.yaml")])
    assert "run it from a checkout (pip install -e .), or pass --yaml PATH" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before preparing anything
