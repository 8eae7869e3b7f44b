"""Check multi-GPU training: the same YAML on 1 and on 2 GPUs, losses side by side, scaling, resume.

    python scripts/multigpu_check.py --out runs/multigpu            # 2 GPUs, under 8 minutes
    python scripts/multigpu_check.py --out /tmp/multigpu --cpu      # 2 CPU processes (gloo), tiny

What it does, with the composer launcher (`python -m composer.cli.launcher -n N scripts/train.py`):

1. Prepares data offline with `foundry_padfree.demo.prepare` (standard-library docstrings, a BPE
   tokenizer, MDS rows). The GPU model is Llama-3.2-1B-shaped (16 layers, d=2048, GQA 32/8 heads
   of 64, vocab 128256, tied embeddings) through `model.config_overrides`; `--cpu` keeps the demo's
   tiny Llama.
2. Runs `padfree_text` training for `--batches` steps on 1 process, then on 2 processes at the
   same global batch and microbatch size (GPU: amp_bf16 and FSDP FULL_SHARD, which LLM-Foundry
   drops on one process; CPU: fp32 and DDP). The 2-process run saves a checkpoint halfway
   (sharded under FSDP); a third run loads it and trains the second half again.
3. Reports per-step losses of the three runs, real tokens/s per device
   (`padfree/stats/real_tokens_per_sec`, each rank timing its own batches), scaling efficiency
   = (2-device total tokens/s) / (2 x 1-device tokens/s), and whether the ranks saw different data.

Per-step records come from a small logger destination (`StepRecord`, written to
`<work>/step_record.py` and loaded by the YAML's `code_paths`): every rank writes
`records/rank<r>.json` with, per step, the logged train loss (already averaged over ranks by
Composer), a hash of each of its rows' real tokens, its token counts and its logged throughput.

The same module registers our components in code if their entry points are missing (the project
used from a checkout on PYTHONPATH without `pip install`, as on an offline GPU machine).

Writes `<out>/multigpu.json` and `<out>/multigpu.md`. Every launched process gets
`NCCL_NVLS_ENABLE=0` and `TORCH_SYMM_MEM_DISABLE_MULTICAST=1`: NVLink multicast (NVLS) is left
off, as shared multi-GPU hosts require; it only matters for all-reduce bandwidth on NVSwitch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "scripts" / "train.py"
CPU_YAML = REPO / "yamls" / "padfree-llama-cpu.yaml"
PRETRAIN_YAML = REPO / "yamls" / "pretrain_smollm2_135m.yaml"
SFT_YAML = REPO / "yamls" / "sft_llama3_1b.yaml"
# Set for every launched process: NVLink multicast off (see the module docstring).
DIST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
# Llama-3.2-1B's shape (meta-llama/Llama-3.2-1B config.json), applied to the demo's config. RoPE
# settings are left out: they do not change the cost, and transformers 5 moved `rope_theta`.
LLAMA_3_2_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,  # the demo's config.json sets its own (32), which would otherwise stay
    "vocab_size": 128256,
    "tie_word_embeddings": True,
}
WARMUP_STEPS = 3  # steps left out of throughput means (first-step allocation, kernel selection)

# The verification callbacks' results, recorded per step and required for a shipped run to pass.
CHECK_KEYS = ("padfree/audit/passed", "padfree/isolation/passed", "padfree/parity/passed")
# How far the parity probe found the model, and stock HF in the training precision, from stock HF in fp32.
PARITY_KEYS = ("padfree/parity/logits_max_rel_diff", "padfree/parity/stock_logits_max_rel_diff")
STEP_RECORD_SOURCE = '''\
"""`step_record`: a logger destination that writes per-step records of this rank to JSON."""

import hashlib
import json
import time
from pathlib import Path

import torch
from composer.loggers import LoggerDestination
from composer.utils import dist
from llmfoundry.registry import loggers

KEYS = ("loss/train/total", "padfree/stats/real_tokens_per_sec", "padfree/stats/mfu", *__CHECK_KEYS__, *__PARITY_KEYS__)


class StepRecord(LoggerDestination):
    """Per step: loss (logged, all ranks' mean), this rank's row hashes and token counts, throughput.

    Args:
        out_dir: writes `<out_dir>/rank<r>.json` (rewritten after every batch).
    """

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.records = []
        self._last_end = None

    def fit_start(self, state, logger):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._last_end = time.perf_counter()

    def after_dataloader(self, state, logger):
        batch = state.batch
        real = batch["attention_mask"].bool()
        ids = batch["input_ids"].to("cpu", torch.int64)
        rows = [ids[b][real[b].cpu()].numpy().tobytes() for b in range(ids.shape[0])]
        self.records.append({
            "step": int(state.timestamp.batch) + 1,
            "rows": len(rows),
            "real_tokens": int(real.sum()),
            "loss_tokens": int((batch["labels"] != -100).sum()),
            "row_sha1": [hashlib.sha1(row).hexdigest()[:16] for row in rows],
        })

    def log_metrics(self, metrics, step=None):
        if self.records:
            for key in KEYS:
                if key in metrics:
                    self.records[-1][key] = float(metrics[key])

    def batch_end(self, state, logger):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.records[-1]["step_seconds"] = now - self._last_end
        self._last_end = now
        self._write()

    def fit_end(self, state, logger):
        self._write()

    def _write(self):
        path = self.out_dir / f"rank{dist.get_global_rank()}.json"
        path.write_text(json.dumps({"world_size": dist.get_world_size(), "steps": self.records}, indent=1))


loggers.register("step_record", func=StepRecord)


def _register_missing_components():
    """Register our components in code when their entry points are absent: the project used from a
    checkout on PYTHONPATH, without `pip install` (as on a machine with no internet)."""
    from importlib.metadata import entry_points

    from llmfoundry import registry

    names = {
        ("models", "padfree_causal_lm"): "foundry_padfree.composer_model:ComposerPadFreeCausalLM",
        ("dataloaders", "padfree_text"): "foundry_padfree.data.text:build_padfree_text_dataloader",
        ("dataloaders", "padfree_finetuning"): "foundry_padfree.data.finetuning:build_padfree_finetuning_dataloader",
        ("callbacks", "padfree_audit"): "foundry_padfree.callbacks:PadFreeAudit",
        ("callbacks", "padfree_isolation"): "foundry_padfree.callbacks:PadFreeIsolation",
        ("callbacks", "padfree_parity"): "foundry_padfree.callbacks:PadFreeParity",
        ("callbacks", "padfree_stats"): "foundry_padfree.callbacks:PadFreeStats",
    }
    import importlib

    for (kind, name), target in names.items():
        if not entry_points(group=f"llmfoundry_{kind}", name=name):
            module, attr = target.split(":")
            getattr(registry, kind).register(name, func=getattr(importlib.import_module(module), attr))


_register_missing_components()
'''.replace("__CHECK_KEYS__", repr(CHECK_KEYS)).replace("__PARITY_KEYS__", repr(PARITY_KEYS))


def write_step_record(path: Path) -> Path:
    """Write the `step_record` logger module (for a YAML's `code_paths`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(STEP_RECORD_SOURCE)
    return path


def read_records(record_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """`{rank: [per-step record, ...]}` as the `step_record` logger wrote them."""
    out = {}
    for path in sorted(record_dir.glob("rank*.json")):
        out[int(path.stem.removeprefix("rank"))] = json.loads(path.read_text())["steps"]
    if not out:
        raise FileNotFoundError(f"no rank*.json records under {record_dir}; did the run start training?")
    return out


def train_yaml(
    path: Path,
    data_dir: Path,
    *,
    batches: int,
    global_batch: int,
    microbatch: int,
    record_module: Path,
    precision: str = "fp32",
    fsdp: bool = False,
    model_overrides: dict[str, Any] | None = None,
    train_loader: dict[str, Any] | None = None,
    max_seq_len: int | None = None,
    stats: bool = True,
    audit_interval: int = 1,
    extra: dict[str, Any] | None = None,
    yaml_path: Path = CPU_YAML,
) -> Path:
    """The CPU YAML trimmed for a short distributed check, written to `path`.

    Evaluation, the HF export and the expensive probes (isolation, parity) are removed; the
    strict audit stays (every `audit_interval`-th batch from the first). `train_loader` replaces
    the loader section if given; `extra` is merged into the top level last.
    """
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(yaml_path)
    cfg.variables.run_dir = str(data_dir)
    if max_seq_len is not None:
        cfg.variables.max_seq_len = max_seq_len
    cfg.code_paths = [str(record_module)]
    cfg.max_duration = f"{batches}ba"
    cfg.global_train_batch_size = global_batch
    cfg.device_train_microbatch_size = microbatch
    cfg.precision = precision
    cfg.progress_bar = False
    cfg.console_log_interval = "1ba"
    cfg.python_log_level = "warning"
    cfg.eval_first = False
    cfg.eval_interval = 1  # unused without an eval loader, but LLM-Foundry wants a valid value
    for key in ("eval_loader", "eval_subset_num_batches"):
        cfg.pop(key, None)
    cfg.scheduler.t_warmup = "2ba"
    callbacks: dict[str, Any] = {"padfree_audit": {"interval": audit_interval, "strict": True}}
    if stats:
        callbacks["padfree_stats"] = {"interval": 1}
    cfg.callbacks = callbacks
    cfg.loggers = {"step_record": {"out_dir": "${variables.run_dir}/records"}}
    if model_overrides:
        cfg.model = OmegaConf.merge(cfg.model, model_overrides)
    if train_loader is not None:
        cfg.train_loader = train_loader
    if fsdp:
        # FULL_SHARD with bf16 compute and fp32 gradient reductions (DEFAULT), so that the 2-GPU
        # losses stay close to 1 GPU's; sharded checkpoints (one file per rank).
        cfg.fsdp_config = {
            "sharding_strategy": "FULL_SHARD",
            "mixed_precision": "DEFAULT",
            "activation_checkpointing": False,
            "limit_all_gathers": True,
            "state_dict_type": "sharded",
        }
    if extra:
        cfg = OmegaConf.merge(cfg, extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path)
    return path


def launch(
    nprocs: int, yaml: Path, overrides: list[str], log_path: Path, timeout: float = 600, script: Path = TRAIN_SCRIPT
) -> float:
    """`composer -n nprocs scripts/train.py yaml overrides` (or another `script` with those
    arguments); returns wall seconds. Raises with the log's tail if it fails."""
    rank_log = str(log_path.parent / f"{log_path.stem}.rank{{rank}}.log")  # non-zero ranks' output
    command = [sys.executable, "-m", "composer.cli.launcher", "-n", str(nprocs), "--stdout", rank_log,
               "--stderr", rank_log, str(script), str(yaml), *overrides]  # fmt: skip
    env = {**os.environ, **DIST_ENV, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # The project importable from this checkout in every rank, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        print("+", " ".join(command), flush=True)
        code = subprocess.run(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
        ).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        tails = []
        for p in [log_path, *sorted(log_path.parent.glob(f"{log_path.stem}.rank*"))]:
            tails.append(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-40:]))
        raise RuntimeError(f"composer -n {nprocs} exited with {code} after {seconds:.0f}s:\n" + "\n".join(tails))
    return seconds


# --- the check --------------------------------------------------------------------------------
def _per_device_rate(steps: list[dict[str, Any]], warmup: int) -> float:
    """Mean real tokens/s of one rank over the steps after `warmup`: `padfree_stats`' timing of the
    batch (forward, backward, communication, optimizer), else the wall time between batch ends."""
    kept = steps[warmup:] or steps[-1:]
    rates = [s.get("padfree/stats/real_tokens_per_sec") or s["real_tokens"] / s["step_seconds"] for s in kept]
    return sum(rates) / len(rates)


def _wall_rate(records: dict[int, list[dict[str, Any]]], warmup: int) -> float:
    """All ranks' real tokens per second of wall time, after `warmup`: the median over steps of
    (tokens of the step, all ranks) / (the slowest rank's time from one batch end to the next).
    The median leaves out the step that also wrote the checkpoint (sharded save of the model and
    optimizer: seconds), which only the 2-process run has."""
    steps = range(warmup, len(records[0])) if len(records[0]) > warmup else range(len(records[0]) - 1, len(records[0]))
    rates = [
        sum(r[k]["real_tokens"] for r in records.values()) / max(r[k]["step_seconds"] for r in records.values())
        for k in steps
    ]
    return float(statistics.median(rates))


def _rows_split(one: dict[int, list[dict]], two: dict[int, list[dict]]) -> list[str]:
    """Problems with how the 2 ranks' rows relate to the 1-process rows, step by step (none: ok)."""
    problems = []
    for k, (a, b) in enumerate(zip(two[0], two[1])):
        if set(a["row_sha1"]) & set(b["row_sha1"]):
            problems.append(f"step {k + 1}: ranks 0 and 1 trained on the same row(s)")
        if k < len(one[0]) and sorted(a["row_sha1"] + b["row_sha1"]) != sorted(one[0][k]["row_sha1"]):
            problems.append(f"step {k + 1}: the 2 ranks' rows together differ from the 1-process batch")
    return problems


def _losses(records: dict[int, list[dict[str, Any]]]) -> list[float]:
    return [s.get("loss/train/total", float("nan")) for s in records[0]]


def _max_rel_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)), default=float("nan"))


def summarize(settings: dict[str, Any], one: dict, two: dict, resumed: dict, walls: dict[str, float]) -> dict:
    """The JSON report: losses side by side, throughput, scaling, checks."""
    batches, half, warmup = settings["batches"], settings["resume_from"], settings["warmup_steps"]
    loss_one, loss_two, loss_resumed = _losses(one), _losses(two), _losses(resumed)
    rate_one = _per_device_rate(one[0], warmup)
    rate_two = {rank: _per_device_rate(steps, warmup) for rank, steps in two.items()}
    split_problems = _rows_split(one, two)
    one_vs_two = _max_rel_diff(loss_two, loss_one)
    resume_diff = _max_rel_diff(loss_resumed, loss_two[half:])
    checks = {
        "ranks got distinct rows that together make the 1-process batch": not split_problems,
        f"2-process losses within rel {settings['loss_rtol']:g} of 1-process": one_vs_two <= settings["loss_rtol"],
        "resumed run starts at the step after the checkpoint": [s["step"] for s in resumed[0]]
        == list(range(half + 1, batches + 1)),
        "resumed run trains on the same rows": all(
            [s["row_sha1"] for s in resumed[r]] == [s["row_sha1"] for s in two[r][half:]] for r in two
        ),
        f"resumed losses within rel {settings['resume_rtol']:g} of the uninterrupted run": resume_diff
        <= settings["resume_rtol"],
    }
    return {
        "settings": settings,
        "steps": [
            {
                "step": k + 1,
                "loss_1": loss_one[k],
                "loss_2": loss_two[k],
                "loss_2_resumed": loss_resumed[k - half] if k >= half else None,
                "real_tokens_1": one[0][k]["real_tokens"],
                "real_tokens_2": [two[r][k]["real_tokens"] for r in sorted(two)],
                "tokens_per_sec_1": one[0][k].get("padfree/stats/real_tokens_per_sec"),
                "tokens_per_sec_2": [two[r][k].get("padfree/stats/real_tokens_per_sec") for r in sorted(two)],
            }
            for k in range(min(len(loss_one), len(loss_two)))
        ],
        "loss_max_rel_diff_1_vs_2": one_vs_two,
        "loss_max_rel_diff_resumed": resume_diff,
        "tokens_per_sec_per_device_1": rate_one,
        "tokens_per_sec_per_device_2": rate_two,
        "tokens_per_sec_total_2": sum(rate_two.values()),
        "scaling_efficiency": sum(rate_two.values()) / (2 * rate_one),
        "scaling_efficiency_wall": _wall_rate(two, warmup) / (2 * _wall_rate(one, warmup)),
        "mfu_1": _mean([s.get("padfree/stats/mfu") for s in one[0][warmup:]]),
        "mfu_2": _mean([s.get("padfree/stats/mfu") for r in two.values() for s in r[warmup:]]),
        "launch_seconds": walls,
        "row_split_problems": split_problems,
        "checks": checks,
        "passed": all(checks.values()),
    }


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def markdown(report: dict) -> str:
    s = report["settings"]
    device, devices = ("CPU process", "CPU processes") if s["cpu"] else ("GPU", "GPUs")
    lines = [
        f"# Multi-device check: 1 vs 2 {devices} ({s['device_name']})",
        "",
        f"Model {s['model']}, {s['precision']}, {s['parallelism']}; `padfree_text`, {s['max_seq_len']}-token rows, "
        f"global batch {s['global_batch']} rows, microbatch {s['microbatch']}, {s['batches']} steps; the 2-{device} "
        f"run saved at step {s['resume_from']} and a third run resumed from it.",
        "",
        f"| step | loss, 1 {device} | loss, 2 {devices} | rel diff | loss, resumed | tok/s, 1 {device} | "
        f"tok/s per {device}, 2 {devices} |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["steps"]:
        resumed = "" if row["loss_2_resumed"] is None else f"{row['loss_2_resumed']:.5f}"
        rel = abs(row["loss_2"] - row["loss_1"]) / abs(row["loss_1"])
        rate_1 = _fmt(row["tokens_per_sec_1"])
        rate_2 = " / ".join(_fmt(v) for v in row["tokens_per_sec_2"])
        lines.append(f"| {row['step']} | {row['loss_1']:.5f} | {row['loss_2']:.5f} | {rel:.1e} | {resumed} | "
                     f"{rate_1} | {rate_2} |")  # fmt: skip
    per_device_2 = ", ".join(f"rank {r}: {_fmt(v)}" for r, v in report["tokens_per_sec_per_device_2"].items())
    lines += [
        "",
        f"Real tokens/s per {device} (mean after {s['warmup_steps']} warm-up steps, `padfree/stats/"
        f"real_tokens_per_sec`): 1 {device} {_fmt(report['tokens_per_sec_per_device_1'])}; 2 {devices} "
        f"{per_device_2}; total {_fmt(report['tokens_per_sec_total_2'])}.",
        "",
        f"**Scaling efficiency** (2-{device} total tok/s) / (2 x 1-{device} tok/s): "
        f"**{report['scaling_efficiency']:.1%}** (median wall time per step, data loading and callbacks included: "
        f"{report['scaling_efficiency_wall']:.1%}).",
    ]
    if report["mfu_1"] is not None:
        lines.append(f"MFU: 1 {device} {report['mfu_1']:.1%}, 2 {devices} {report['mfu_2']:.1%}.")
    walls = ", ".join(f"{k} {v:.0f}s" for k, v in report["launch_seconds"].items())
    lines += ["", f"Launches (wall, start-up included): {walls}.", "", "Checks:", ""]
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in report["checks"].items()]
    lines += [f"  - {p}" for p in report["row_split_problems"][:5]]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="writes multigpu.json and multigpu.md here")
    parser.add_argument("--work", type=Path, help="data, logs and checkpoints (default: <out>/work, replaced)")
    parser.add_argument("--cpu", action="store_true", help="2 CPU processes (gloo, DDP), the tiny model, fp32")
    parser.add_argument("--batches", type=int, help="steps per run (default: 14 on GPU, 3 with --cpu)")
    parser.add_argument("--global-batch", type=int, help="rows per step, all devices (default: 16 GPU, 8 CPU)")
    parser.add_argument("--microbatch", type=int, help="rows per microbatch (default: 8 GPU, 2 CPU)")
    parser.add_argument("--max-seq-len", type=int, help="row length in tokens (default: 2048 GPU, 128 CPU)")
    parser.add_argument("--max-documents", type=int, help="corpus documents (default: all (about 6,300) GPU, 300 CPU)")
    parser.add_argument(
        "--shipped",
        action="store_true",
        help="instead: run the shipped pretraining and SFT YAMLs on 2 GPUs (FSDP with and without "
        "activation checkpointing, DDP, full-checkpoint resume); writes shipped.json and shipped.md",
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=SHIPPED_RUNS,
        help="with --shipped: only these runs (default: all five, about 10 minutes on 2 x H200); "
        "sft_1b_fsdp_ac_resumed needs sft_1b_fsdp_ac",
    )
    args = parser.parse_args(argv)
    if args.runs and not args.shipped:
        parser.error("--runs selects runs of --shipped.")
    if args.runs and "sft_1b_fsdp_ac_resumed" in args.runs and "sft_1b_fsdp_ac" not in args.runs:
        parser.error("--runs sft_1b_fsdp_ac_resumed resumes from sft_1b_fsdp_ac's checkpoint: add sft_1b_fsdp_ac.")
    cpu = args.cpu
    batches = args.batches or (3 if cpu else 14)  # 14 x 16 rows fit the docstrings of CPython 3.11 and 3.12
    if batches < 2:
        parser.error(f"--batches {batches}: at least 2 (a checkpoint halfway, then a resumed run).")
    global_batch = args.global_batch or (8 if cpu else 16)
    microbatch = args.microbatch or (2 if cpu else 8)
    if global_batch % 2 or (global_batch // 2) % microbatch:
        parser.error(f"--global-batch {global_batch} must split into 2 devices of whole microbatches of {microbatch}.")
    max_seq_len = args.max_seq_len or (128 if cpu else 2048)
    if not cpu:
        import torch

        if torch.cuda.device_count() < 2:
            parser.error(f"found {torch.cuda.device_count()} CUDA GPU(s); this check needs 2 (or use --cpu).")
        device_name = torch.cuda.get_device_name(0)
    else:
        import platform

        device_name = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, gloo"
    out = args.out.resolve()
    work = (args.work or out / "work").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)

    if str(REPO) not in sys.path:  # a checkout on no path: import the project from here
        sys.path.insert(0, str(REPO))
    from foundry_padfree.demo import prepare

    start = time.perf_counter()
    max_documents = args.max_documents or (300 if cpu else None)
    prepared = prepare(work / "data", max_seq_len=max_seq_len, max_documents=max_documents)
    print(f"prepared {prepared} in {time.perf_counter() - start:.0f}s", flush=True)
    # All steps within one epoch: at an epoch's end 1 and 2 ranks may drop different remainders
    # (the streaming dataset evens out the ranks' shares), and the steps would no longer match.
    if prepared["train_rows"] < global_batch * batches:
        raise SystemExit(
            f"{prepared['train_rows']} training rows of {max_seq_len} tokens < {batches} steps x {global_batch} rows; "
            "use fewer --batches, a smaller --global-batch or --max-seq-len, or more --max-documents."
        )
    record_module = write_step_record(work / "step_record.py")
    if args.shipped:
        if cpu:
            parser.error("--shipped runs the full-size YAMLs on 2 GPUs; it has no --cpu mode.")
        results = shipped_runs(work, work / "data", record_module, runs=tuple(args.runs or SHIPPED_RUNS))
        (out / "shipped.json").write_text(json.dumps(results, indent=1, default=str))
        text = shipped_markdown(results)
        (out / "shipped.md").write_text(text)
        print(text, flush=True)
        return 0 if all(r["ok"] for r in results.values()) else 1
    half = batches // 2
    settings = {
        "cpu": cpu,
        "device_name": device_name,
        "model": "tiny Llama (demo)" if cpu else "Llama-3.2-1B shape (config_overrides)",
        "precision": "fp32" if cpu else "amp_bf16",
        "parallelism": "DDP (gloo)" if cpu else "FSDP FULL_SHARD, fp32 reductions, sharded checkpoints",
        "batches": batches,
        "global_batch": global_batch,
        "microbatch": microbatch,
        "max_seq_len": max_seq_len,
        "resume_from": half,
        "warmup_steps": min(WARMUP_STEPS, batches - 1),
        # fp32: only the summation order differs. bf16: rounding differs with the microbatch
        # grouping and FSDP's reduce-scatter, and grows over steps.
        "loss_rtol": 1e-5 if cpu else 2e-2,
        "resume_rtol": 1e-6 if cpu else 1e-2,
        "data": prepared,
    }
    model_overrides = None if cpu else {"config_overrides": LLAMA_3_2_1B}
    # GPU: the audit syncs, so it runs on the first (warm-up) batch only; the demo's learning rate
    # is for its tiny model.
    gpu_extra = {"optimizer": {"lr": 3e-4}}
    yaml = train_yaml(work / "train.yaml", work / "data", batches=batches, global_batch=global_batch,
                      microbatch=microbatch, record_module=record_module, precision=settings["precision"],
                      fsdp=not cpu, model_overrides=model_overrides, max_seq_len=max_seq_len,
                      audit_interval=1 if cpu else batches, extra=None if cpu else gpu_extra)  # fmt: skip
    runs = {"one": (1, []), "two": (2, []), "resumed": (2, [])}
    checkpoints = work / "two" / "checkpoints"
    runs["two"][1].extend([f"save_folder={checkpoints}", f"save_interval={half}ba",
                           "save_num_checkpoints_to_keep=-1", "save_overwrite=true"])  # fmt: skip
    walls, records = {}, {}
    for name, (nprocs, overrides) in runs.items():
        if name == "resumed":
            overrides.append(f"load_path={_checkpoint(checkpoints, half)}")
        overrides.append(f"loggers.step_record.out_dir={work / name / 'records'}")
        print(f"[{name}] composer -n {nprocs}", flush=True)
        walls[name] = launch(nprocs, yaml, overrides, work / name / "launch.log")
        records[name] = read_records(work / name / "records")
        print(f"[{name}] done in {walls[name]:.0f}s", flush=True)
    report = summarize(settings, records["one"], records["two"], records["resumed"], walls)
    (out / "multigpu.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (out / "multigpu.md").write_text(text)
    print(text, flush=True)
    print(f"wrote {out / 'multigpu.json'} and {out / 'multigpu.md'}", flush=True)
    return 0 if report["passed"] else 1


# --- the shipped YAMLs -------------------------------------------------------------------------
SHIPPED_RUNS = ("pretrain_135m_fsdp_ac", "pretrain_135m_ddp", "sft_1b_fsdp_ac", "sft_1b_fsdp_ac_resumed",
                "sft_1b_fsdp_no_ac")  # fmt: skip


def shipped_runs(
    work: Path,
    prepared_dir: Path,
    record_module: Path,
    batches: int = 6,
    extra: tuple[str, ...] = (),
    runs: tuple[str, ...] = SHIPPED_RUNS,
) -> dict[str, Any]:
    """`composer -n 2` on the shipped pretraining and SFT YAMLs at their full model sizes, offline,
    for `batches` steps each, in the parallelism variants they are meant for.

    Overridden: paths, the run length, batch sizes, logging, a one-batch warm-up, two loader
    workers, the check tokenizer's EOS id, evaluation's cadence and size, and for SFT fresh
    weights and the checkpoint interval and retention (the models, precision, FSDP settings and
    callbacks are the YAMLs'): SmolLM2-135M pretraining on the demo's MDS rows
    with FSDP FULL_SHARD + activation checkpointing as shipped, then with DDP; Llama-3.2-1B SFT on
    prompt/response pairs from standard-library docstrings, as shipped (FULL_SHARD, PURE, activation
    checkpointing, full checkpoints saved halfway), resumed from that checkpoint, and with activation
    checkpointing off. `extra` overrides go last in every run (the tests shrink the models with them);
    `runs` names the runs to do, of `SHIPPED_RUNS`.
    """
    from foundry_padfree.data.tokenizer import stdlib_texts

    texts = stdlib_texts()
    sft_data = work / "sft.jsonl"
    with sft_data.open("w") as f:  # ~2,000 pairs of varied lengths, as `prompt_response_rows` in the tests
        for k in range(2000):
            prompt = texts[(7 * k) % len(texts)]
            response = " ".join(texts[(13 * k + j) % len(texts)] for j in range(1 + k % 6))
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    half = batches // 2
    common = [f"code_paths=[{record_module}]", f"max_duration={batches}ba", "progress_bar=false",
              "console_log_interval=1ba", "python_log_level=warning", "scheduler.t_warmup=1ba",
              "train_loader.num_workers=2", "callbacks.padfree_stats.interval=1"]  # fmt: skip
    pretrain = [*common, f"variables.data_local={prepared_dir / 'data'}",
                f"variables.tokenizer_dir={prepared_dir / 'tokenizer'}", "variables.eos_token_id=2",
                "global_train_batch_size=32", "device_train_microbatch_size=8", "device_eval_batch_size=8",
                f"eval_interval={batches}ba", "eval_subset_num_batches=2", "eval_loader.num_workers=2"]  # fmt: skip
    sft = [*common, f"variables.model_dir={REPO / 'yamls' / 'model_configs' / 'llama3.2-1b'}",
           "model.pretrained=false", f"variables.tokenizer_dir={prepared_dir / 'tokenizer'}",
           f"variables.data_files={sft_data}", "global_train_batch_size=8", "device_train_microbatch_size=1",
           f"save_interval={half}ba", "save_num_checkpoints_to_keep=-1"]  # fmt: skip
    variants = {
        "pretrain_135m_fsdp_ac": (PRETRAIN_YAML, pretrain),
        "pretrain_135m_ddp": (PRETRAIN_YAML, [*pretrain, "fsdp_config=null"]),
        "sft_1b_fsdp_ac": (SFT_YAML, sft),
        "sft_1b_fsdp_ac_resumed": (SFT_YAML, sft),
        "sft_1b_fsdp_no_ac": (SFT_YAML, [*sft, "fsdp_config.activation_checkpointing=false"]),
    }
    results: dict[str, Any] = {}
    for name, (yaml, overrides) in variants.items():
        if name not in runs:
            continue
        run_dir = work / name
        overrides = [*overrides, f"variables.save_folder={run_dir}", f"run_name={name}",
                     f"loggers.step_record.out_dir={run_dir / 'records'}", *extra]  # fmt: skip
        print(f"[{name}] composer -n 2 {yaml.name}", flush=True)
        try:
            if name.endswith("_resumed"):
                overrides.append(f"load_path={_checkpoint(work / 'sft_1b_fsdp_ac' / 'checkpoints', half)}")
            wall = launch(2, yaml, overrides, run_dir / "launch.log", timeout=400)
            records = read_records(run_dir / "records")
        except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired) as e:
            results[name] = {"yaml": yaml.name, "ok": False, "error": str(e)[-3000:]}
            print(f"[{name}] FAILED: {str(e)[-1500:]}", flush=True)
            continue
        losses = _losses(records)
        expected = batches - half if name.endswith("_resumed") else batches
        rates = {r: _per_device_rate(steps, min(2, len(steps) - 1)) for r, steps in records.items()}
        results[name] = {
            "yaml": yaml.name,
            "overrides": overrides,
            "wall_seconds": wall,
            "steps": [s["step"] for s in records[0]],
            "losses": losses,
            "tokens_per_sec_per_gpu": rates,
            "ranks_distinct_rows": all(
                not set(a["row_sha1"]) & set(b["row_sha1"]) for a, b in zip(records[0], records[1])
            ),
            "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").glob("ep*")),
            # The YAMLs' verification callbacks (non-strict there), each over both ranks, where due.
            "checks": {k.split("/")[1]: [s[k] for s in records[0] if k in s] for k in CHECK_KEYS},
            "parity": {k.rsplit("/", 1)[1]: [s[k] for s in records[0] if k in s] for k in PARITY_KEYS},
        }
        checks_ok = all(v == 1.0 for values in results[name]["checks"].values() for v in values)
        results[name]["ok"] = checks_ok and len(losses) == expected and all(v == v and abs(v) < 1e4 for v in losses)
        print(f"[{name}] done in {wall:.0f}s; losses {[round(v, 4) for v in losses]}", flush=True)
    full, resumed = results.get("sft_1b_fsdp_ac", {}), results.get("sft_1b_fsdp_ac_resumed", {})
    if full.get("ok") and resumed.get("ok"):
        resumed["starts_after_checkpoint"] = resumed["steps"] == list(range(half + 1, batches + 1))
        resumed["loss_max_rel_diff_vs_uninterrupted"] = _max_rel_diff(resumed["losses"], full["losses"][half:])
    no_ac = results.get("sft_1b_fsdp_no_ac", {})
    if full.get("ok") and no_ac.get("ok"):
        no_ac["loss_max_rel_diff_vs_activation_checkpointing"] = _max_rel_diff(no_ac["losses"], full["losses"])
    return results


def shipped_markdown(results: dict[str, Any]) -> str:
    lines = ["# The shipped YAMLs on 2 GPUs (`composer -n 2 scripts/train.py ...`)", "",
             "| run | YAML | ok | steps | losses | real tok/s per GPU | checks passed | checkpoints | notes |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        if not r["ok"] and "error" in r:
            lines.append(f"| {name} | {r['yaml']} | NO | | | | | | {r['error'].splitlines()[-1][:200]} |")
            continue
        notes = []
        if "loss_max_rel_diff_vs_uninterrupted" in r:
            notes.append(f"starts at step {r['steps'][0]}; max rel diff vs uninterrupted "
                         f"{r['loss_max_rel_diff_vs_uninterrupted']:.1e}")  # fmt: skip
        if "loss_max_rel_diff_vs_activation_checkpointing" in r:
            notes.append(
                f"max rel diff vs activation checkpointing on {r['loss_max_rel_diff_vs_activation_checkpointing']:.1e}"
            )
        if not r["ranks_distinct_rows"]:
            notes.append("ranks shared rows!")
        ours, stock = (r.get("parity", {}).get(k.rsplit("/", 1)[1], []) for k in PARITY_KEYS)
        if ours:
            notes.append(f"parity: logits {max(ours):.3g} of their maximum from stock HF in fp32"
                         + (f", stock HF in this precision {max(stock):.3g}" if stock else ""))  # fmt: skip
        rates = " / ".join(_fmt(v) for v in r["tokens_per_sec_per_gpu"].values())
        losses = ", ".join(f"{v:.4f}" for v in r["losses"])
        checks = ", ".join(f"{k} {sum(v == 1.0 for v in vals)}/{len(vals)}" for k, vals in r["checks"].items() if vals)
        lines.append(f"| {name} | {r['yaml']} | {'yes' if r['ok'] else 'NO'} | {r['steps'][0]}-{r['steps'][-1]} | "
                     f"{losses} | {rates} | {checks or 'none due'} | {', '.join(r['checkpoints'])} | "
                     f"{'; '.join(notes)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _checkpoint(folder: Path, batch: int) -> Path:
    """The checkpoint of `batch`: a file for DDP (`ep0-ba<b>-rank0.pt`), a folder when sharded."""
    found = [p for pattern in (f"ep*-ba{batch}-rank0.pt", f"ep*-ba{batch}") for p in sorted(folder.glob(pattern))]
    found = [p for p in found if not p.is_symlink()]
    if not found:
        listing = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no such folder"
        raise FileNotFoundError(f"no checkpoint of batch {batch} in {folder}: {listing}")
    return found[0]


if __name__ == "__main__":
    sys.exit(main())
