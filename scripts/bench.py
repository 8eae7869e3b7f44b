"""Training throughput, side by side: stock HF Llama against foundry_padfree, on real length mixes.

Every system trains the same examples at the same real-token budget per step (forward, backward,
AdamW step; bf16) and is measured the same way: real tokens per second (padding never counts),
step time, peak memory, and real-token MFU, `6 N T_real + 12 L d sum(len_i^2)` FLOPs per step
(`foundry_padfree.training_flops`) over a bf16 matrix-multiply ceiling this script measures on the
same device (and over the H100/H200 datasheet's 989.5 TFLOP/s). On a GPU with `nvidia-smi`, also the
SM clock and power draw during each system's timed steps, sampled every 20 ms: energy per step and
real tokens per joule (`PowerSampler`).

Systems:
    hf_padded        stock `LlamaForCausalLM`, one example per row padded to the longest, SDPA
                     (LLM-Foundry's HF default for fine-tuning).
    hf_concat        stock HF on the same tokens concatenated into rows of `--concat-row-len`, causal
                     SDPA: documents see each other (LLM-Foundry's pretraining path). A speed
                     reference only: its loss is contaminated.
    hf_padfree       stock HF padding-free: one row, `position_ids` restarting per document. From
                     transformers 4.54 SDPA builds the block-diagonal mask from them; the script runs
                     it in a child process with a transformers >= 4.54 when the parent's is older
                     (`--hf-padfree-pythonpath`), and with an older one passes that same mask as an
                     explicit 4D mask (the `--quick` CPU run). `use_cache=False`, as LLM-Foundry
                     builds HF models for training.
    hf_padfree_cache the same with transformers' default `use_cache=True` (GPU only): transformers
                     then skips the packed-sequence mask, so documents see each other (the table
                     says "NOT isolated"); a speed reference for what an unwary user gets.
    hf_padfree_flex  hf_padfree with `attn_implementation="flex_attention"` (GPU, transformers >= 4.54):
                     transformers builds a block mask from the packed `position_ids`, so attention
                     skips the blocks between documents that SDPA's dense mask computes. Stock HF's
                     fastest padding-free path without flash-attn; a reference beside the targets,
                     which the task sets against SDPA.
    ours_eager_<b>   `PadFreeLlamaForCausalLM`, one row + `position_ids`, each attention backend `b`
                     available on the device.
    ours_compiled    the same with `model.compile_layers()` (default backend).

Stock HF models take the batch on the GPU, so their steps start by copying it there. Ours take it
as it leaves the data loader, pinned on the CPU (`--ours-batch host`): the model reads the
documents' layout on the host and copies only the real tokens, so no step waits for the previous
one to drain (`--ours-batch device` copies the batch first, as for HF; unpadding then syncs once).

Targets (the table after the results) are checked on the eager system whose backend `auto` picks, the default:
real tokens/s over the baseline's, with the ratio of median steps beside it (a few stalled steps
move the first and not the second). Each budget draws its batches from a seed of its own, so the
32k steps are the same whatever `--budgets` lists; `ours_compiled` then trains 50 random mixes of
1/64 of the first budget up to all of it, untimed, and counts the graphs they compile. Graphs
compiled during a run's warm-up (a later budget or sweep point reuses the first run's) are
reported in the results table's notes.

Data: the alpaca_eval instruction/response pairs (`scripts/data/alpaca_eval_lengths.json` holds
their character counts; tokens are estimated as ceil(chars / 4), prompts masked out of the loss,
examples cut at `--max-doc-len`), and a synthetic sweep of equal-length documents at one budget.
Token ids are random and so are the weights: nothing is downloaded.

    python scripts/bench.py --out runs/bench.json --plot runs/bench.png   # the full GPU comparison
    python scripts/bench.py --quick --out /tmp/bench.json                  # tiny CPU run (a test)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

# Set before the first CUDA allocation: fewer out-of-memory failures from fragmentation, for every system.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "scripts" / "data" / "alpaca_eval_lengths.json"
NOMINAL_BF16_TFLOPS = 989.5  # H100/H200 SXM dense bf16, datasheet
IGNORE_INDEX = -100
PAD_ID = 0

# Architecture fields of the shapes, as in their HF config.json (weights are random).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
    "llama3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Data: documents as (length, prompt length) per step, then the three batch layouts.


def alpaca_docs(path: Path, max_doc_len: int) -> np.ndarray:
    """(n, 2) int array of (tokens, prompt tokens) per example, tokens = ceil(chars / 4)."""
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.open()]
        instr = np.array([len(r["instruction"]) for r in rows])
        out = np.array([len(r["output"] or "") for r in rows])
    else:
        counts = json.loads(path.read_text())
        instr, out = np.array(counts["instruction_chars"]), np.array(counts["output_chars"])
    prompt = np.maximum(1, np.ceil(instr / 4)).astype(np.int64)
    total = prompt + np.maximum(1, np.ceil(out / 4)).astype(np.int64)
    total = np.minimum(total, max_doc_len)
    prompt = np.minimum(prompt, total - 1)
    return np.stack([total, prompt], axis=1)


def mix_steps(docs: np.ndarray, budgets: list[int], seed: int) -> list[list[tuple[int, int]]]:
    """One list of (length, prompt) per step, drawn without replacement until the step's budget
    is reached; the last document is cut so that every step has exactly its budget of tokens."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    pos = 0
    steps = []
    for budget in budgets:
        step, total = [], 0
        while total < budget:
            if pos == len(order):
                order, pos = rng.permutation(len(docs)), 0
            n, p = (int(v) for v in docs[order[pos]])
            pos += 1
            n = min(n, budget - total)
            if n < 2:  # a 1-token document has no target; give its token to the previous one
                step[-1] = (step[-1][0] + n, step[-1][1])
                total += n
                break
            step.append((n, min(p, n - 1)))
            total += n
        steps.append(step)
    return steps


def sweep_steps(doc_len: int, budget: int, n_steps: int) -> list[list[tuple[int, int]]]:
    """Equal-length documents filling the budget; every token but each document's last is trained."""
    return [[(doc_len, 0)] * max(1, budget // doc_len) for _ in range(n_steps)]


def make_batch(step: list[tuple[int, int]], layout: str, vocab: int, seed: int, row_len: int = 0) -> dict:
    """CPU tensors of one step in `layout`: padded | concat | packed. Same token ids in each layout."""
    g = torch.Generator().manual_seed(seed)
    T = sum(n for n, _ in step)
    ids_T = torch.randint(3, vocab, (T,), generator=g)
    labels_T = ids_T.clone()
    pos_T = torch.empty(T, dtype=torch.long)
    start = 0
    for n, p in step:
        labels_T[start : start + max(p, 1)] = IGNORE_INDEX  # prompt, and the document's first token
        pos_T[start : start + n] = torch.arange(n)
        start += n
    if layout == "packed":
        return dict(input_ids=ids_T[None], position_ids=pos_T[None], labels=labels_T[None])
    if layout == "concat":
        rows = math.ceil(T / row_len)
        ids = torch.full((rows * row_len,), PAD_ID, dtype=torch.long)
        labels = torch.full((rows * row_len,), IGNORE_INDEX, dtype=torch.long)
        ids[:T], labels[:T] = ids_T, labels_T
        # No attention_mask: padding sits only at the end of the last row, after every real token,
        # so plain causal attention never lets a real token see it (and its labels are ignored);
        # a mask would only cost HF its causal fast path.
        return dict(input_ids=ids.view(rows, row_len), labels=labels.view(rows, row_len))
    if layout == "padded":
        S = max(n for n, _ in step)
        ids = torch.full((len(step), S), PAD_ID, dtype=torch.long)
        labels = torch.full((len(step), S), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(step), S), dtype=torch.long)
        start = 0
        for row, (n, _) in enumerate(step):
            ids[row, :n], labels[row, :n], mask[row, :n] = ids_T[start : start + n], labels_T[start : start + n], 1
            start += n
        return dict(input_ids=ids, attention_mask=mask, labels=labels)
    raise ValueError(f"unknown layout {layout!r}; use padded, concat or packed.")


def block_diagonal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, T, T) additive mask, causal within each document: what transformers >= 4.54 SDPA
    builds from packed `position_ids`, for older versions that take a 4D mask as given."""
    doc_T = torch.cumsum(position_ids[0] == 0, 0)
    allowed = (doc_T[:, None] == doc_T[None, :]) & torch.ones(len(doc_T), len(doc_T), dtype=torch.bool).tril()
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


# ----------------------------------------------------------------------------------------------
# Models and the measured training loop.


def hf_model(shape: str, device: torch.device, dtype: torch.dtype, system: str = "hf_concat") -> torch.nn.Module:
    """Stock `LlamaForCausalLM` of `shape` as `system` runs it (SDPA; flex attention for
    `hf_padfree_flex`), with random weights drawn after seeding with 0."""
    import transformers

    # use_cache=False as LLM-Foundry builds HF models for training: with a cache, transformers >= 4.54
    # would also skip the block-diagonal mask of packed position_ids (documents would see each other).
    attn = "flex_attention" if system == "hf_padfree_flex" else "sdpa"
    fields = dict(SHAPES[shape], attn_implementation=attn, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2,
                  use_cache=system == "hf_padfree_cache")  # fmt: skip
    try:
        config = transformers.LlamaConfig(**fields)
    except Exception:  # a transformers that reads RoPE scaling differently: speed does not depend on it
        fields.pop("rope_scaling", None)
        config = transformers.LlamaConfig(**fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    return model.to(dtype)


def ours_model(
    shape: str,
    backend: str,
    compile_backend: str | None,
    device: torch.device,
    dtype: torch.dtype,
    overrides: dict[str, Any] | None = None,
):
    from foundry_padfree import PadFreeLlamaConfig, PadFreeLlamaForCausalLM

    config = PadFreeLlamaConfig(
        **SHAPES[shape], attn_backend=backend, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2, **(overrides or {})
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = PadFreeLlamaForCausalLM(config)
    model = model.to(dtype)
    if compile_backend:
        model.compile_layers(compile_backend)
    return model


def head_dim(shape: str) -> int:
    """The shape's attention head dim as the model takes it: `head_dim`, else hidden size / heads."""
    c = SHAPES[shape]
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def auto_backend(shape: str, device: torch.device) -> str:
    """The attention backend `attn_backend: auto` (the default) gives `shape` on `device` in the
    benchmark's dtype: the eager system the targets are checked on."""
    from foundry_padfree.attention import resolve_backend

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return resolve_backend("auto", device, head_dim(shape), dtype).name


def num_matmul_params(shape: str) -> int:
    """Parameters that take part in a matrix product (the input embedding's lookup does not, unless
    it is tied to the head)."""
    c = SHAPES[shape]
    D, F, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    H = head_dim(shape)
    attn = D * H * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    per_layer = attn + 3 * D * F + 2 * D
    return L * per_layer + D + V * D  # + final norm + head (tied or not, the head is a product)


def step_flops(shape: str, step: list[tuple[int, int]]) -> tuple[float, float]:
    """(all FLOPs, 6 N T FLOPs) of one training step over the real tokens of `step`."""
    from foundry_padfree import PadFreeLlamaConfig, training_flops

    c = SHAPES[shape]
    config = PadFreeLlamaConfig(**{k: v for k, v in c.items() if k != "rope_scaling"})
    N = num_matmul_params(shape)
    lens = [n for n, _ in step]
    return float(training_flops(config, N, lens)), 6.0 * N * sum(lens)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 2) -> float:
    """Mean milliseconds of `fn` over `reps` calls after `warmup` calls: CUDA events around the
    calls on the GPU, wall clock elsewhere. For the kernel-level scripts beside this one."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type != "cuda":
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    sync(device)
    return start.elapsed_time(end) / reps


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


_POWER_CAP = 0x4  # nvidia-smi's clocks_throttle_reasons bit: software power cap (the board's power limit)


class PowerSampler:
    """The GPU's SM clock, power draw and clock-throttle reasons, sampled by `nvidia-smi` every
    `period_ms` while the `with` block runs; `summary()` afterwards ({} without CUDA or nvidia-smi).

    An H200 training step draws up to the board's power limit, and the GPU lowers its clock to stay
    there: a step then takes the time its energy takes at that power (docs/BENCHMARKS.md, "The
    power limit")."""

    def __init__(self, device: torch.device, period_ms: int = 20):
        self.cmd: list[str] | None = None
        self.lines: list[str] = []
        if device.type == "cuda" and shutil.which("nvidia-smi"):
            power = "power.draw.instant" if _smi_knows("power.draw.instant") else "power.draw"
            self.cmd = [
                "nvidia-smi", f"--query-gpu=timestamp,clocks.sm,{power},clocks_throttle_reasons.active",
                "--format=csv,noheader,nounits", "-lms", str(period_ms), "-i", _smi_id(device),
            ]  # fmt: skip

    def start(self) -> PowerSampler:
        """Start sampling ahead of the window (`with` opens it), e.g. while warm-up steps run, so
        that the GPU does not idle for nvidia-smi's start-up right before the timed steps."""
        if self.cmd and not hasattr(self, "proc"):
            self.file = tempfile.TemporaryFile("w+")  # noqa: SIM115 (open until stop())
            self.proc = subprocess.Popen(self.cmd, stdout=self.file, stderr=subprocess.DEVNULL, text=True)
            self.started = time.time()
        return self

    def __enter__(self) -> PowerSampler:
        if self.cmd:
            self.start()
            time.sleep(max(0.0, self.started + 0.25 - time.time()))  # its start-up, before the window opens
        self.t0 = time.time()
        return self

    def __exit__(self, *exc) -> None:
        self.t1 = time.time()
        self.stop()

    def stop(self) -> None:
        if hasattr(self, "proc") and not self.file.closed:
            self.proc.terminate()
            self.proc.wait()
            self.file.seek(0)
            self.lines = self.file.read().splitlines()
            self.file.close()

    def summary(self) -> dict:
        return power_summary(self.lines, self.t0, self.t1)


@functools.cache
def _smi_knows(field: str) -> bool:
    return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv"], capture_output=True).returncode == 0


def _smi_id(device: torch.device) -> str:
    """`nvidia-smi -i` for this CUDA device: its UUID (CUDA_VISIBLE_DEVICES renumbers indices)."""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    return f"GPU-{uuid}" if uuid else str(device.index or 0)


def power_summary(lines: list[str], t0: float, t1: float) -> dict:
    """Median SM clock (MHz), mean power draw (W) and the share of samples held at the power limit,
    over the `nvidia-smi` CSV samples (timestamp, clock, power, throttle reasons) taken between t0
    and t1 (seconds since the epoch)."""
    clocks, watts, capped = [], [], 0
    for line in lines:
        fields = [f.strip() for f in line.split(",")]
        try:
            t = datetime.strptime(fields[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            clock, power, reasons = float(fields[1]), float(fields[2]), int(fields[3], 16)
        except (ValueError, IndexError):  # "[N/A]", or a line cut short when the sampler stopped
            continue
        if t0 <= t <= t1:
            clocks.append(clock)
            watts.append(power)
            capped += bool(reasons & _POWER_CAP)
    if not clocks:
        return {}
    return dict(sm_clock_mhz=float(np.median(clocks)), power_w=float(np.mean(watts)),
                power_capped=capped / len(clocks), power_samples=len(clocks))  # fmt: skip


def dynamo_compiles() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def train(
    model: torch.nn.Module,
    batches: list[dict],
    tokens: list[int],
    warmup: int,
    device: torch.device,
    prepare: Callable[[dict], dict] | None = None,
    extra: list[dict] | None = None,
    count_syncs: bool = False,
    profile: bool = False,
    batch_on_device: bool = True,
) -> dict:
    """Warm up on the first `warmup` batches, time the rest; `extra` batches then run untimed to count
    recompilations (and one to count device-to-host syncs). Returns the measurements.

    A warm-up also runs the largest timed batch once when it is larger than every warm-up batch
    (padded rows change shape every step): a system's first meeting with a larger shape (allocator
    growth, kernel selection) is a one-off cost a long run does not pay per step."""
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=fused, foreach=not fused)
    model.train()
    pinned = [{k: (v.pin_memory() if fused else v) for k, v in b.items()} for b in batches]

    def one_step(batch: dict) -> torch.Tensor:
        batch = _model_input(batch, device, batch_on_device)
        if prepare is not None:
            batch = prepare(batch)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    warm = pinned[:warmup]
    largest = max(pinned[warmup:], key=_batch_size, default=None)
    if warm and largest is not None and all(_batch_size(largest) > _batch_size(b) for b in warm):
        warm = [*warm, largest]
    power = PowerSampler(device).start()
    compiles_at_start = dynamo_compiles()
    try:
        for i, batch in enumerate(warm):
            if i == len(warm) - 1:
                sync(device)
                gc.collect()  # before the last warm-up step, so that the GPU is busy until the timed steps start
            loss = one_step(batch)
    except BaseException:
        power.stop()
        raise
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compiles_before = dynamo_compiles()
    timed = pinned[warmup:]
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in timed]
        with power:
            for (start, end), batch in zip(events, timed):
                start.record()
                loss = one_step(batch)
                end.record()
            sync(device)
        step_ms = [s.elapsed_time(e) for s, e in events]
        total_s = events[0][0].elapsed_time(events[-1][1]) / 1e3
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        step_ms = []
        t0 = time.perf_counter()
        for batch in timed:
            t = time.perf_counter()
            loss = one_step(batch)
            step_ms.append((time.perf_counter() - t) * 1e3)
        total_s = time.perf_counter() - t0
        peak = None
    result = dict(
        status="ok",
        real_tokens_per_s=sum(tokens[warmup:]) / total_s,
        step_ms_median=float(np.median(step_ms)),
        step_ms_mean=float(np.mean(step_ms)),
        step_ms=[float(t) for t in step_ms],
        peak_mem_gib=peak,
        timed_steps=len(timed),
        loss=float(loss.detach()),
        compiles_during_warmup=compiles_before - compiles_at_start,
        compiles_during_timing=dynamo_compiles() - compiles_before,
    )
    if device.type == "cuda" and (sampled := power.summary()):
        result.update(sampled, joules_per_step=sampled["power_w"] * total_s / len(timed),
                      real_tokens_per_joule=result["real_tokens_per_s"] / sampled["power_w"])  # fmt: skip
    if extra:
        pinned_extra = [{k: (v.pin_memory() if fused else v) for k, v in b.items()} for b in extra]
        before = dynamo_compiles()
        for batch in pinned_extra:
            loss = one_step(batch)
        sync(device)
        result["recompile_check_steps"] = len(extra)
        result["recompiles_after_warmup"] = dynamo_compiles() - before
        result["loss_after_check"] = float(loss.detach())
    if count_syncs and device.type == "cuda":
        result.update(count_device_syncs(model, opt, pinned[-1], device, prepare, batch_on_device))
    if profile:
        result["profile"] = profile_step(lambda: one_step(pinned[-1]), device)
    return result


def _model_input(batch: dict, device: torch.device, on_device: bool) -> dict:
    """The pinned host batch as the model gets it: copied to `device` first, or as it is."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()} if on_device else batch


def _batch_size(batch: dict) -> int:
    """Token positions in a batch's rows, padding included: what a padded step's cost grows with."""
    return batch["input_ids"].numel()


def count_device_syncs(model, opt, batch: dict, device: torch.device, prepare=None, batch_on_device=True) -> dict:
    """Device-to-host synchronizations of one training step, by phase (`torch.cuda.set_sync_debug_mode`),
    with the Python line that triggered each one (for ops run by autograd, the `backward()` call)."""
    phases: dict[str, list[str]] = {"forward": [], "backward": [], "optimizer": []}

    def watched(phase: str, fn: Callable[[], Any]) -> Any:
        sync(device)
        with warnings.catch_warnings(record=True) as caught, _explicit_syncs() as explicit:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        phases[phase] += [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
                          and "prototype" not in str(w.message)]  # fmt: skip
        phases[phase] += explicit
        return out

    def forward() -> torch.Tensor:
        b = _model_input(batch, device, batch_on_device)
        return model(**(prepare(b) if prepare is not None else b)).loss

    loss = watched("forward", forward)
    watched("backward", loss.backward)
    watched("optimizer", opt.step)
    opt.zero_grad(set_to_none=True)
    return dict(
        syncs_per_step=sum(len(v) for v in phases.values()),
        syncs_by_phase={k: len(v) for k, v in phases.items()},
        sync_sites=sorted({site for v in phases.values() for site in v}),
    )


@contextlib.contextmanager
def _explicit_syncs():
    """Calls of `torch.cuda.synchronize` and of `Event`/`Stream.synchronize` while open, as
    `file:line` of their callers: waits `set_sync_debug_mode` does not report."""
    sites: list[str] = []
    originals = [(torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"), (torch.cuda.Stream, "synchronize")]
    saved = [getattr(owner, name) for owner, name in originals]

    def spy(fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            sites.append(f"{Path(caller.filename).name}:{caller.lineno}")
            return fn(*args, **kwargs)

        return counted

    for (owner, name), fn in zip(originals, saved):
        setattr(owner, name, spy(fn))
    try:
        yield sites
    finally:
        for (owner, name), fn in zip(originals, saved):
            setattr(owner, name, fn)


# ----------------------------------------------------------------------------------------------
# One run: a system on a shape and a list of steps.


def profile_step(step: Callable[[], Any], device: torch.device, rows: int = 50) -> str:
    """The kernels of one step, by total device time (a table from `torch.profiler`)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


def run_system(
    system: str, shape: str, steps: list, args, device: torch.device, extra_steps=None, profile: bool = False
) -> dict:
    """Train `system` on `steps` (the first `args.warmup` untimed) and measure it."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = SHAPES[shape]["vocab_size"]
    tokens = [sum(n for n, _ in s) for s in steps]
    layout = {"hf_padded": "padded", "hf_concat": "concat"}.get(system, "packed")
    batches = [make_batch(s, layout, vocab, args.seed + i, args.concat_row_len) for i, s in enumerate(steps)]
    extra = [make_batch(s, layout, vocab, 10_000 + i, args.concat_row_len) for i, s in enumerate(extra_steps or [])]
    prepare = None
    info: dict[str, Any] = {}
    if system.startswith("hf_padfree") and device.type == "cuda" and not _packed_sdpa_native():
        # The explicit-mask stand-in below builds a dense T x T mask on the host inside every timed
        # step, and isolates documents even for hf_padfree_cache: a CPU test path, not a measurement.
        return dict(status="not run: needs transformers >= 4.54 (a child process with --hf-padfree-pythonpath)")
    if system == "hf_padfree_flex" and not _packed_sdpa_native():  # no explicit-mask stand-in for flex
        return dict(status="not run: needs transformers >= 4.54 (its flex attention reads packed position_ids)")
    if system.startswith("hf_"):
        import transformers

        info["transformers"] = transformers.__version__
        model = hf_model(shape, device, dtype, system)
        if system.startswith("hf_padfree") and not _packed_sdpa_native():
            info["mask"] = "explicit 4D block-diagonal mask (transformers < 4.54)"

            def prepare(b: dict) -> dict:
                return dict(b, attention_mask=block_diagonal_mask(b["position_ids"].cpu(), dtype).to(device))

        elif system.startswith("hf_padfree"):
            info["mask"] = "built by transformers from packed position_ids"
            info["isolated"] = _documents_isolated(model, device)
    else:
        compiled = system == "ours_compiled"
        backend = args.compiled_backend if compiled else system.removeprefix("ours_eager_")
        model = ours_model(shape, backend, compiled and args.compile_backend, device, dtype, args.ours_config)
        info["attn_backend"] = model.model.attention_backend(device).name
        if args.ours_config:
            info["config"] = args.ours_config
        if compiled:
            info["compiled"] = f"model.compile_layers({args.compile_backend!r})"
        info["batch"] = args.ours_batch
    params = sum(p.numel() for p in model.parameters())
    free_memory(device)
    try:
        ours = system.startswith("ours_")
        on_device = not ours or args.ours_batch == "device"
        result = train(model, batches, tokens, args.warmup, device, prepare, extra, ours, profile, on_device)
    except torch.OutOfMemoryError:
        result = dict(status="OOM")
    except Exception as e:  # report it in the table and go on with the other systems
        traceback.print_exc()
        result = dict(status=f"error: {type(e).__name__}: {str(e)[:300]}")
    if "profile" in result:
        print(f"profile of one step, {shape} {system}:\n{result['profile']}", flush=True)
    del model, batches, extra
    free_memory(device)
    flops, flops_6n = zip(*(step_flops(shape, s) for s in steps[args.warmup :]))
    T = sum(tokens[args.warmup :])
    result.update(info, params=params, tokens_per_step=float(np.mean(tokens[args.warmup :])))
    result["flops_per_token"] = sum(flops) / T
    result["flops_6n_per_token"] = sum(flops_6n) / T
    return result


def _packed_sdpa_native() -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version("4.54")


@torch.no_grad()
def _documents_isolated(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether a document's logits in a packed row equal its logits alone (no cross-document leak)."""
    model.eval()
    g = torch.Generator().manual_seed(1)
    # Lengths in whole 128-token blocks: torch 2.11's flex attention, compiled by transformers with
    # max-autotune, finds no kernel for a 40-token sequence.
    a, b = torch.randint(3, 500, (1, 256), generator=g), torch.randint(3, 500, (1, 128), generator=g)
    packed = torch.cat([a, b], 1).to(device)
    pos = torch.cat([torch.arange(256), torch.arange(128)])[None].to(device)
    together = model(input_ids=packed, position_ids=pos).logits[0, 256:].float()
    alone = model(input_ids=b.to(device)).logits[0].float()
    model.train()
    return bool((together - alone).abs().max() <= 0.05 * alone.abs().max())


# ----------------------------------------------------------------------------------------------
# hf_padfree in a child process (another transformers), and the matrix-multiply ceiling.


def child_env(pythonpath: str | None) -> dict | None:
    """Environment for the hf_padfree child: PYTHONPATH without entries that hold a `transformers`
    older than 4.54 (or as given), or None when that changes nothing (run in this process)."""
    if pythonpath is None:
        entries = [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e]
        kept = [e for e in entries if not (Path(e) / "transformers").is_dir()]
        if kept == entries or _packed_sdpa_native():
            return None
        pythonpath = os.pathsep.join(kept)
    env = dict(os.environ, PYTHONPATH=pythonpath)
    return env


def run_child(tasks: list[dict], args, env: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "tasks.json", Path(tmp) / "results.json"
        src.write_text(json.dumps(dict(tasks=tasks, args=vars(args)), default=str))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--hf-padfree-worker", str(src), str(dst)]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        sys.stdout.write(proc.stdout)
        # The worker writes its results after each task: a crash keeps the rows it finished.
        done = json.loads(dst.read_text()) if dst.exists() else []
        if proc.returncode != 0 or len(done) < len(tasks):
            tail = (proc.stdout + proc.stderr)[-2000:]
            failed = dict(status=f"child failed (rc {proc.returncode}): {tail}")
            done += [failed for _ in tasks[len(done) :]]
        return done


def worker_main(src: str, dst: str) -> None:
    spec = json.loads(Path(src).read_text())
    args = argparse.Namespace(**spec["args"])
    device = torch.device(args.device)
    results = []
    for task in spec["tasks"]:
        t0 = time.time()
        try:
            r = _run_hf_padfree_task(task, args, device)
        except Exception as e:  # report and go on: the parent prints the row as failed
            r = dict(status=f"error: {type(e).__name__}: {str(e)[:300]}")
        results.append(r)
        label = f"{task['system']} {task['shape']} {task['label']}"
        print(f"[child {time.time() - t0:5.1f}s] {label}: {r.get('status')}", flush=True)
        Path(dst).write_text(json.dumps(results))


def _run_hf_padfree_task(task: dict, args, device: torch.device) -> dict:
    import transformers

    if not _packed_sdpa_native():  # position_ids alone would then let documents see each other
        return dict(status=f"not run: the child's transformers {transformers.__version__} is older than 4.54")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape, steps = task["shape"], [[tuple(d) for d in s] for s in task["steps"]]
    vocab = SHAPES[shape]["vocab_size"]
    tokens = [sum(n for n, _ in s) for s in steps]
    batches = [make_batch(s, "packed", vocab, args.seed + i) for i, s in enumerate(steps)]
    model = hf_model(shape, device, dtype, task["system"])
    info = dict(transformers=transformers.__version__, mask="built by transformers from packed position_ids")
    info["isolated"] = _documents_isolated(model, device)
    params = sum(p.numel() for p in model.parameters())
    free_memory(device)
    try:
        result = train(model, batches, tokens, args.warmup, device)
    except torch.OutOfMemoryError:
        result = dict(status="OOM")
    del model
    free_memory(device)
    result.update(info, params=params, tokens_per_step=float(np.mean(tokens[args.warmup :])))
    return result


def matmul_ceiling(device: torch.device, n: int) -> float:
    """TFLOP/s of an n x n x n matrix product (bf16 on CUDA) on random data, mean of 20 after warm-up."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    operands = [torch.randn(n, n, device=device, dtype=dtype) for _ in range(2)]
    tflops = 2 * n**3 / time_ms(lambda: torch.mm(*operands), device, reps=20, warmup=3) / 1e9
    operands.clear()
    free_memory(device)
    return tflops


# ----------------------------------------------------------------------------------------------
# The comparison, the table and the targets.


def default_systems(device: torch.device) -> list[str]:
    from foundry_padfree.attention import available_backends

    backends = available_backends(device)
    if device.type == "cuda":
        backends = [b for b in backends if b != "sdpa"]  # the per-document reference loop
    hf_padfree = ["hf_padfree", "hf_padfree_cache", "hf_padfree_flex"] if device.type == "cuda" else ["hf_padfree"]
    return ["hf_concat", *hf_padfree, *(f"ours_eager_{b}" for b in backends), "ours_compiled", "hf_padded"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shape on CPU, a few steps (the CI test)")
    p.add_argument("--out", type=Path, help="write every measurement as JSON here")
    p.add_argument("--plot", type=Path, help="write a PNG of tokens/s by system and of the length sweep")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama3.2-1b"], choices=sorted(SHAPES))
    p.add_argument("--budgets", nargs="+", type=int, default=[32768, 8192], help="real tokens per step")
    p.add_argument("--systems", nargs="+", default=None, help="default: every system available")
    p.add_argument("--small-budget-systems", nargs="+", default=None,
                   help="systems run at budgets other than the first (default: all but the flex backend)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="timed steps per system")
    p.add_argument("--recompile-steps", type=int, default=50,
                   help="steps of random length mixes after warm-up: ours_compiled's recompile count")  # fmt: skip
    p.add_argument("--compiled-backend", default="auto", help="attention backend of ours_compiled")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of ours_compiled")
    p.add_argument(
        "--ours-config",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="PadFreeLlamaConfig fields for our systems, e.g. fused_kernels=false recompute_mlp=false",
    )
    p.add_argument("--ours-batch", choices=["host", "device"], default="host",
                   help="where our systems get the batch: pinned on the CPU, or copied to the GPU first")  # fmt: skip
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="alpaca_eval .jsonl or its lengths .json")
    p.add_argument("--max-doc-len", type=int, default=2048, help="examples are cut at this many tokens")
    p.add_argument("--concat-row-len", type=int, default=2048, help="row length of hf_concat")
    p.add_argument("--sweep-shape", default="llama3.2-1b", choices=sorted(SHAPES))
    p.add_argument("--sweep-lengths", nargs="*", type=int, default=[256, 2048, 8192, 32768])
    p.add_argument("--sweep-budget", type=int, default=32768)
    p.add_argument("--sweep-systems", nargs="+",
                   default=["hf_padfree", "ours_eager_triton", "ours_eager_torch_varlen", "ours_compiled"])  # fmt: skip
    p.add_argument("--sweep-steps", type=int, default=4, help="timed steps per sweep point")
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--hf-padfree-pythonpath", default=None,
                   help="PYTHONPATH of the hf_padfree child (default: this one minus an old transformers)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", nargs="*", default=[], help="systems to profile for one step (first budget)")
    p.add_argument("--profile-shape", default="llama3.2-1b", choices=sorted(SHAPES))
    p.add_argument("--hf-padfree-worker", nargs=2, metavar=("TASKS", "RESULTS"), help=argparse.SUPPRESS)
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        # Tiny and on the CPU in well under a minute; aot_eager traces the compiled path (graphs,
        # dynamic shapes, recompiles) without inductor's code generation. Explicit options still win.
        p.set_defaults(
            shapes=["tiny"], budgets=[128], warmup=1, steps=2, recompile_steps=3, max_doc_len=48,
            concat_row_len=64, matmul_size=256, sweep_shape="tiny", sweep_lengths=[32], sweep_budget=128,
            sweep_steps=1, sweep_systems=["hf_padfree", "ours_compiled"], device="cpu",
            compile_backend="aot_eager",
        )  # fmt: skip
    args = p.parse_args(argv)
    _check_counts(p, args)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.ours_config = dict(_config_value(item) for item in args.ours_config)
    return args


def _check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error naming the option when a count is out of range."""
    at_least = dict(warmup=0, recompile_steps=0, steps=1, sweep_steps=1, sweep_budget=1, matmul_size=1,
                    max_doc_len=1, concat_row_len=1)  # fmt: skip
    for name, low in at_least.items():
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least {low}")
    for name in ("budgets", "sweep_lengths"):
        bad = [v for v in getattr(args, name) if v < 2]
        if bad:  # a document needs 2 tokens for one of them to have a target
            parser.error(f"--{name.replace('_', '-')} {bad}: token counts must be at least 2")


def _config_value(item: str) -> tuple[str, Any]:
    """`FIELD=VALUE` from the command line, VALUE read as YAML would (true, 8192, flex)."""
    field, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--ours-config {item!r}: expected FIELD=VALUE, e.g. fused_kernels=false")
    return field, {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.hf_padfree_worker:
        worker_main(*args.hf_padfree_worker)
        return {}
    device = torch.device(args.device)
    t_start = time.time()
    docs = alpaca_docs(args.data, args.max_doc_len)
    systems = args.systems or default_systems(device)
    small = args.small_budget_systems or [s for s in systems if s != "ours_eager_flex"]
    n = args.warmup + args.steps
    runs = []  # (shape, label, budget, system, steps, extra)
    for shape in args.shapes:
        for i, budget in enumerate(args.budgets):
            steps = mix_steps(docs, [budget] * n, args.seed + budget)  # the same batches whatever --budgets lists
            for system in systems if i == 0 else [s for s in systems if s in small]:
                extra = None
                if system == "ours_compiled" and i == 0 and args.recompile_steps:
                    rng = np.random.default_rng(args.seed + 99)
                    mixes = rng.integers(max(2, budget // 64), budget + 1, args.recompile_steps)
                    extra = mix_steps(docs, [int(b) for b in mixes], args.seed + 7)
                runs.append((shape, f"alpaca@{budget}", budget, system, steps, extra))
    for length in args.sweep_lengths:
        steps = sweep_steps(length, args.sweep_budget, args.warmup + args.sweep_steps)
        runs += [(args.sweep_shape, f"sweep{length}@{args.sweep_budget}", args.sweep_budget, s, steps, None)
                 for s in args.sweep_systems]  # fmt: skip

    report: dict[str, Any] = dict(
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        python=platform.python_version(),
        precision="bf16 weights, grads and AdamW states (fused AdamW)" if device.type == "cuda" else "fp32",
        data=f"{args.data.name}: tokens = ceil(chars/4), examples cut at {args.max_doc_len}, prompts masked",
        shapes={s: SHAPES[s] for s in {*args.shapes, args.sweep_shape}},
        auto_backend={s: auto_backend(s, device) for s in args.shapes},
        results=[],
    )
    import transformers

    report["transformers"] = transformers.__version__

    # hf_padfree first, all tasks in one child, while this process holds no device memory.
    env = child_env(args.hf_padfree_pythonpath)
    child_runs = [r for r in runs if r[3].startswith("hf_padfree")] if env is not None else []
    child_results = {}
    if child_runs:
        tasks = [dict(shape=r[0], label=r[1], steps=r[4], system=r[3]) for r in child_runs]
        print(f"hf_padfree: {len(tasks)} runs in a child process (PYTHONPATH={env['PYTHONPATH']!r})", flush=True)
        for r, res in zip(child_runs, run_child(tasks, args, env)):
            child_results[id(r)] = res
    report["matmul_tflops"] = matmul_ceiling(device, args.matmul_size)
    print(f"matmul ceiling: {report['matmul_tflops']:.3g} TFLOP/s ({args.matmul_size}^3)", flush=True)

    for run in runs:
        shape, label, budget, system, steps, extra = run
        t0 = time.time()
        if id(run) in child_results:
            result = child_results[id(run)]
            if result.get("status") == "ok":
                flops, flops_6n = zip(*(step_flops(shape, s) for s in steps[args.warmup :]))
                T = sum(sum(n for n, _ in s) for s in steps[args.warmup :])
                result.update(flops_per_token=sum(flops) / T, flops_6n_per_token=sum(flops_6n) / T)
        else:
            profile = system in args.profile and shape == args.profile_shape and label == f"alpaca@{args.budgets[0]}"
            result = run_system(system, shape, steps, args, device, extra, profile)
        docs_per_step = float(np.mean([len(s) for s in steps[args.warmup :]]))  # the timed steps
        result.update(shape=shape, data=label, budget=budget, system=system, docs_per_step=docs_per_step)
        if result.get("status") == "ok":
            tps = result["real_tokens_per_s"]
            result["mfu"] = tps * result["flops_per_token"] / (report["matmul_tflops"] * 1e12)
            result["mfu_6n"] = tps * result["flops_6n_per_token"] / (report["matmul_tflops"] * 1e12)
            result["mfu_nominal"] = tps * result["flops_per_token"] / (NOMINAL_BF16_TFLOPS * 1e12)
        report["results"].append(result)
        print(f"[{time.time() - t_start:6.1f}s +{time.time() - t0:5.1f}s] {shape} {label} {system}: "
              f"{_fmt_rate(result)}", flush=True)  # fmt: skip
        if args.out:
            _write(report, args.out)
    report["targets"] = check_targets(report)
    report["wall_s"] = time.time() - t_start
    print_tables(report)
    if args.out:
        _write(report, args.out)
    if args.plot:
        plot(report, args.plot)
    return report


def _write(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=float))


def _fmt_rate(r: dict) -> str:
    if r.get("status") != "ok":
        return str(r.get("status"))
    return f"{r['real_tokens_per_s'] / 1e3:.1f}k tok/s, {r['step_ms_median']:.0f} ms, {_gib(r)} GiB"


def _gib(r: dict) -> str:
    return "n/a" if r.get("peak_mem_gib") is None else f"{r['peak_mem_gib']:.1f}"


def _find(report: dict, shape: str, data: str, system: str) -> dict | None:
    for r in report["results"]:
        if (r["shape"], r["data"], r["system"]) == (shape, data, system) and r.get("status") == "ok":
            return r
    return None


def check_targets(report: dict) -> list[dict]:
    """The performance targets, each with the measured value (None where a system did not run)."""
    out = []
    budgets = sorted({r["budget"] for r in report["results"] if r["data"].startswith("alpaca")}, reverse=True)
    if not budgets:
        return out
    big, small = f"alpaca@{budgets[0]}", f"alpaca@{budgets[-1]}"
    shapes = sorted({r["shape"] for r in report["results"] if r["data"] == big})

    def row(shape, data, system):
        r = _find(report, shape, data, system)
        if r is None or (system in ("hf_padfree", "hf_padfree_flex") and not r.get("isolated", True)):
            return None  # a padding-free run whose documents saw each other is no reference
        return r

    def eager(shape, data):
        """Our eager system with the backend `auto` picks (the default); without that run, the
        fastest eager backend that ran."""
        auto = report.get("auto_backend", {}).get(shape)
        if auto and (r := row(shape, data, f"ours_eager_{auto}")):
            return r
        rows = [r for r in report["results"] if r["shape"] == shape and r["data"] == data
                and r["system"].startswith("ours_eager") and r.get("status") == "ok"]  # fmt: skip
        return max(rows, key=lambda r: r["real_tokens_per_s"]) if rows else None

    def add(name, value, goal, system=None, median_ratio=None):
        at_most = name.split()[1] in ("peak", "recompiles", "device-to-host")
        ok = None if value is None or goal is None else (value <= goal if at_most else value >= goal)
        out.append(dict(target=name, value=value, goal=goal, met=ok, system=system, median_ratio=median_ratio))

    def speedup(name, shape, data, ours, baseline, goal):
        """Real tokens/s of `ours` over `baseline`'s (the target), and the ratio of their median
        steps beside it (the same batches): a few stalled steps move the first, not the second."""
        a, b = (ours or {}), (row(shape, data, baseline) or {})
        if not a or not b:
            return add(name, None, goal, a.get("system"))
        median = b["step_ms_median"] / a["step_ms_median"] if a.get("step_ms") and b.get("step_ms") else None
        add(name, a["real_tokens_per_s"] / b["real_tokens_per_s"], goal, a["system"], median)

    for shape in shapes:
        e = eager(shape, big)
        speedup(f"{shape} eager / hf_concat @{budgets[0]}", shape, big, e, "hf_concat", 1.35)
        for budget in budgets:  # hf_padfree's dense mask may not fit at the larger budget
            data = f"alpaca@{budget}"
            speedup(f"{shape} eager / hf_padfree @{budget}", shape, data, eager(shape, data), "hf_padfree", 2.5)
        # The reference figures of HF padding-free (60k / 26.9k at 32k tokens) match transformers'
        # default use_cache=True, where documents are not isolated: the same target against that run.
        speedup(f"{shape} eager / hf_padfree_cache @{budgets[0]}", shape, big, e, "hf_padfree_cache", 2.5)
        # Stock HF's block-sparse padding-free path: no goal of its own, reported beside the targets.
        for budget in budgets:
            data = f"alpaca@{budget}"
            speedup(f"{shape} eager / hf_padfree_flex @{budget}", shape, data, eager(shape, data), "hf_padfree_flex",
                    None)  # fmt: skip
        speedup(f"{shape} eager / hf_padded @{budgets[-1]}", shape, small, eager(shape, small), "hf_padded", 4.0)
        compiled = _find(report, shape, big, "ours_compiled")
        speedup(f"{shape} compiled / hf_concat @{budgets[0]}", shape, big, compiled, "hf_concat",
                1.55 if "1b" in shape else 2.2)  # fmt: skip
        if "1b" in shape:
            mfu = compiled["mfu_6n"] if compiled else None
            add(f"{shape} compiled 6N-MFU @{budgets[0]}", mfu, 0.75, "ours_compiled")
        for budget in budgets:
            data = f"alpaca@{budget}"
            hf = row(shape, data, "hf_padfree")
            for system in filter(None, ("ours_compiled", (eager(shape, data) or {}).get("system"))):
                ours = _find(report, shape, data, system)
                value = ours["peak_mem_gib"] / hf["peak_mem_gib"] if ours and hf and hf["peak_mem_gib"] else None
                add(f"{shape} peak memory / hf_padfree @{budget}", value, 0.5, system)
        if compiled and "recompiles_after_warmup" in compiled:
            add(f"{shape} recompiles over {compiled['recompile_check_steps']} random mixes after warm-up",
                compiled["recompiles_after_warmup"], 0, "ours_compiled")  # fmt: skip
        for r in report["results"]:
            if r["shape"] == shape and r["data"] == big and "syncs_per_step" in r:
                add(f"{shape} device-to-host syncs per step", r["syncs_per_step"], 1, r["system"])
    return out


def print_tables(report: dict) -> None:
    print(f"\n{report['device']} | torch {report['torch']} | transformers {report['transformers']} | "
          f"{report['precision']} | matmul ceiling {report['matmul_tflops']:.3g} TFLOP/s")  # fmt: skip
    print(f"{report['date']} | {report['command']}")
    print(f"data: {report['data']}")
    header = "| shape | data | system | real tok/s | step ms | peak GiB | MFU | MFU (989.5) | vs hf_concat | notes |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in report["results"]:
        notes = r.get("attn_backend") or r.get("transformers", "")
        if "isolated" in r:
            notes += "" if r["isolated"] else " (documents NOT isolated)"
        for when, key in (("in warm-up", "compiles_during_warmup"), ("while timed", "compiles_during_timing")):
            if n := r.get(key):
                notes += f", {n} graph{'s' if n > 1 else ''} compiled {when}"
        if r.get("status") != "ok":
            print(f"| {r['shape']} | {r['data']} | {r['system']} | {str(r.get('status'))[:60]} | | | | | | {notes} |")
            continue
        base = _find(report, r["shape"], r["data"], "hf_concat")
        vs = f"{r['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}x" if base else ""
        print(f"| {r['shape']} | {r['data']} | {r['system']} | {r['real_tokens_per_s'] / 1e3:.1f}k | "
              f"{r['step_ms_median']:.0f} | {_gib(r)} | {r['mfu']:.2f} | {r['mfu_nominal']:.2f} | "
              f"{vs} | {notes} |")  # fmt: skip
    print("\n| target | measured | goal | met | by median steps |")
    print("|---|---|---|---|---|")
    for t in report.get("targets", []):
        v = "n/a" if t["value"] is None else (f"{t['value']:.2f}" if isinstance(t["value"], float) else t["value"])
        met = {True: "yes", False: "NO", None: "n/a" if t["goal"] is not None else "(reference)"}[t["met"]]
        system = f" ({t['system']})" if t["system"] else ""
        median = f"{t['median_ratio']:.2f}" if t.get("median_ratio") is not None else ""
        goal = "" if t["goal"] is None else t["goal"]
        print(f"| {t['target']}{system} | {v} | {goal} | {met} | {median} |")
    powered = [r for r in report["results"] if r.get("status") == "ok" and "power_w" in r]
    if powered:
        print("\n| shape | data | system | SM clock MHz | power W | J per step | real tok/J | at power limit |")
        print("|---|---|---|---|---|---|---|---|")
        for r in powered:
            print(
                f"| {r['shape']} | {r['data']} | {r['system']} | {r['sm_clock_mhz']:.0f} | {r['power_w']:.0f} | "
                f"{r['joules_per_step']:.0f} | {r['real_tokens_per_joule']:.0f} | {r['power_capped']:.0%} |"
            )
    print(f"\nwall time {report.get('wall_s', 0):.0f} s")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in report["results"] if r.get("status") == "ok"]
    alpaca = [r for r in results if r["data"].startswith("alpaca")]
    sweep = [r for r in results if r["data"].startswith("sweep")]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    groups = sorted({(r["shape"], r["data"]) for r in alpaca})
    systems = list(dict.fromkeys(r["system"] for r in alpaca))
    width = 0.8 / max(1, len(systems))
    for j, system in enumerate(systems):
        vals = [next((r["real_tokens_per_s"] / 1e3 for r in alpaca if (r["shape"], r["data"]) == g
                      and r["system"] == system), 0) for g in groups]  # fmt: skip
        axes[0].bar(np.arange(len(groups)) + j * width, vals, width, label=system)
    axes[0].set_xticks(np.arange(len(groups)) + 0.4 - width / 2, [f"{s}\n{d}" for s, d in groups], fontsize=8)
    axes[0].set_ylabel("real tokens/s (thousands)")
    axes[0].set_title("alpaca_eval mix (0 = OOM or not run)")
    axes[0].legend(fontsize=8)
    for system in dict.fromkeys(r["system"] for r in sweep):
        rows = sorted((r for r in sweep if r["system"] == system), key=lambda r: int(r["data"][5:].split("@")[0]))
        xs = [int(r["data"][5:].split("@")[0]) for r in rows]
        axes[1].plot(xs, [r["real_tokens_per_s"] / 1e3 for r in rows], "o-", label=system)
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("document length (tokens), fixed tokens per step")
    axes[1].set_ylabel("real tokens/s (thousands)")
    axes[1].set_title(f"length sweep, {report['device']}")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
