"""The matrix products of one training step alone: the floor they put under the step time.

For a shape of `scripts/bench.py` and one alpaca_eval step drawn as it draws them (its data and
budget; `mix_steps` at `--seed`, 0 by default, where bench.py seeds each budget's steps with the
budget added), this lists every matrix product a training step of `PadFreeLlamaForCausalLM` runs: per layer the
forward, input-gradient and weight-gradient product of each projection (q, k, v, o, gate, up,
down), and per chunk of supervised tokens the loss head's logits, input-gradient and fp32
weight-gradient products (`foundry_padfree.loss`). It times them with the calls the model makes
(`F.linear`, `@`, the loss's in-place fp32 accumulation), bf16 on the GPU:

- each distinct product alone, repeated: its rate, and its time per step (times its count);
- all products of one step back-to-back in step order: the step time if nothing else ran;
- the n x n x n ceiling of `bench.py` (20 products), and the same product kept up for
  `--sustain-s` seconds, since under sustained load the GPU lowers its clocks to stay within its
  power limit (nvidia-smi's SM clock and power draw are read during that loop when it is there);
- a device-to-device copy: the memory bandwidth a pass over activations can reach.

    python scripts/bench_products.py --out runs/products.json
    python scripts/bench_products.py --quick      # tiny CPU run (a test)
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import (
    DEFAULT_DATA,
    SHAPES,
    alpaca_docs,
    make_batch,
    matmul_ceiling,
    mix_steps,
    num_matmul_params,
    sync,
    time_ms,
)

from foundry_padfree.loss import _accumulate_mm
from foundry_padfree.varlen import unpad

MEASURED_SHAPES = ["llama3.2-1b", "smollm2-135m"]


@dataclass(frozen=True)
class Product:
    """One kind of matrix product of the step: `[m,k] @ [k,n]`, run `count` times per step."""

    part: str  # the weight: "q", "k", "v", "o", "gate", "up", "down" or "head"
    kind: str  # "fwd" (x @ W.T), "dgrad" (dy @ W) or "wgrad" (dy.T @ x)
    m: int
    k: int
    n: int
    count: int
    chunk: int | None = None  # the head's: supervised tokens per loss chunk
    first: bool = False  # the head's weight gradient of the first chunk: written, not accumulated

    @property
    def name(self) -> str:  # e.g. "gate.wgrad", "head.fwd[4096]", "head.wgrad[4096,first]"
        if self.chunk is None:
            return f"{self.part}.{self.kind}"
        return f"{self.part}.{self.kind}[{self.chunk}{',first' if self.first else ''}]"

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n


def supervised_tokens(step: list[tuple[int, int]], vocab: int) -> int:
    """Tokens of `step` with a target, as the model's `unpad` counts them (the head runs on these)."""
    batch = make_batch(step, "packed", vocab, seed=0)
    return len(unpad(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).supervised_T)


def step_products(shape: str, tokens: int, supervised: int, chunk: int) -> list[Product]:
    """Every matrix product of one training step over `tokens` real tokens, `supervised` of which
    have a target, with the loss head run `chunk` supervised tokens at a time."""
    c = SHAPES[shape]
    D, F_, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    N, K = c["num_attention_heads"], c["num_key_value_heads"]
    H = c.get("head_dim") or D // N
    T = tokens
    products = []
    for name, d_in, d_out in (("q", D, N * H), ("k", D, K * H), ("v", D, K * H), ("o", N * H, D),
                              ("gate", D, F_), ("up", D, F_), ("down", F_, D)):  # fmt: skip
        products += [
            Product(name, "fwd", T, d_in, d_out, L),  # x_TI @ W_OI.T
            Product(name, "dgrad", T, d_out, d_in, L),  # dy_TO @ W_OI
            Product(name, "wgrad", d_out, T, d_in, L),  # dy_TO.T @ x_TI
        ]
    full, last = divmod(supervised, chunk)
    first = True  # acc_VD (fp32) = g_CV.T @ h_CD for the step's first chunk, += for the others
    for C, count in ((chunk, full), (last, 1 if last else 0)):
        if count:
            products += [
                Product("head", "fwd", C, D, V, count, C),  # h_CD @ W_VD.T: logits
                Product("head", "dgrad", C, V, D, count, C),  # g_CV @ W_VD
            ]
            if first:
                products.append(Product("head", "wgrad", V, C, D, 1, C, first=True))
            if count - first:
                products.append(Product("head", "wgrad", V, C, D, count - first, C))
            first = False
    return products


def product_fn(p: Product, device: torch.device, dtype: torch.dtype) -> Callable[[], object]:
    """A closure that runs `p` the way the model does, on random operands allocated once."""
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    if p.part == "head" and p.kind == "wgrad":
        a_VC, b_CD = rand(p.k, p.m).t(), rand(p.k, p.n)  # g_CV.T: a transposed view, as in the loss
        acc_VD = torch.zeros(p.m, p.n, device=device, dtype=torch.float32)
        return lambda: _accumulate_mm(acc_VD, a_VC, b_CD, overwrite=p.first)
    if p.kind == "fwd":
        x, w = rand(p.m, p.k), rand(p.n, p.k)
        return lambda: F.linear(x, w)
    if p.kind == "dgrad":
        dy, w = rand(p.m, p.k), rand(p.k, p.n)
        return lambda: dy @ w
    dy, x = rand(p.k, p.m), rand(p.k, p.n)  # wgrad: dy_TO.T @ x_TI
    return lambda: dy.t() @ x


def step_order(products: list[Product], layers: int) -> list[Product]:
    """The products of one step in the order the step runs them: the layers' forward products, then
    the head's per chunk (its backward products run inside the loss's forward), then the layers'
    backward products, last layer first."""
    layer_fwd = [p for p in products if p.part != "head" and p.kind == "fwd"]
    layer_bwd = [p for p in reversed(products) if p.part != "head" and p.kind != "fwd"]
    head_calls = []
    for fwd in (p for p in products if p.part == "head" and p.kind == "fwd"):  # one per chunk size
        dgrad, *wgrads = (p for p in products if p.part == "head" and p.chunk == fwd.chunk and p.kind != "fwd")
        wgrad_calls = [w for w in sorted(wgrads, key=lambda w: not w.first) for _ in range(w.count)]
        head_calls += [q for w in wgrad_calls for q in (fwd, dgrad, w)]
    return layer_fwd * layers + head_calls + layer_bwd * layers


def gpu_clocks() -> str | None:
    """nvidia-smi's SM clock, power draw and active clock-limit reasons, or None without it."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = "clocks.sm,clocks.max.sm,power.draw,power.limit,clocks_event_reasons.active"
    run = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    return run.stdout.strip() if run.returncode == 0 else None


def sustained_ceiling(device: torch.device, n: int, seconds: float, dtype: torch.dtype) -> dict:
    """TFLOP/s of an n^3 product run back-to-back for `seconds`, per tenth of the loop, and the
    GPU clocks read from another thread during its last third."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    one_ms = time_ms(lambda: a @ b, device, reps=5, warmup=3)
    per_part = max(1, int(seconds * 1e3 / one_ms / 10))
    clocks: list[str | None] = []
    reader = threading.Timer(seconds * 0.7, lambda: clocks.append(gpu_clocks()))
    rates = []
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(11)]
        reader.start()
        events[0].record()
        for i in range(10):
            for _ in range(per_part):
                a @ b
            events[i + 1].record()
        sync(device)
        reader.join()
        rates = [2 * n**3 * per_part / (s.elapsed_time(e) * 1e-3) / 1e12 for s, e in itertools.pairwise(events)]
    else:
        for _ in range(10):
            t = time.perf_counter()
            for _ in range(per_part):
                a @ b
            rates.append(2 * n**3 * per_part / (time.perf_counter() - t) / 1e12)
    return dict(n=n, seconds=seconds, tflops_by_tenth=rates, tflops_last_half=sum(rates[5:]) / 5,
                clocks_during=clocks[0] if clocks else None)  # fmt: skip


def copy_bandwidth(device: torch.device, n_bytes: int, reps: int) -> float:
    """GB/s of a device-to-device copy of `n_bytes` (bytes read + bytes written per second): what a
    pass over activations that reads and writes each element once can reach."""
    a = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), device, reps, warmup=3)
    return 2 * n_bytes / ms / 1e6


def measure_shape(shape: str, step: list[tuple[int, int]], args, device: torch.device, dtype: torch.dtype) -> dict:
    tokens = sum(n for n, _ in step)
    supervised = supervised_tokens(step, SHAPES[shape]["vocab_size"])
    products = step_products(shape, tokens, supervised, args.loss_chunk)
    rows = []
    fns = {}
    for p in products:
        fns[p.name] = product_fn(p, device, dtype)
        ms = time_ms(fns[p.name], device, args.reps, warmup=3)
        rows.append(dict(asdict(p), name=p.name, ms=ms, tflops=p.flops / ms / 1e9, ms_per_step=ms * p.count))
    order = [fns[p.name] for p in step_order(products, SHAPES[shape]["num_hidden_layers"])]

    def whole_step():
        for fn in order:
            fn()

    sequence_ms = time_ms(whole_step, device, args.step_reps, warmup=1)
    flops = sum(p.flops * p.count for p in products)
    return dict(
        shape=shape,
        data=f"alpaca@{args.budget}",
        tokens=tokens,
        supervised_tokens=supervised,
        docs=len(step),
        loss_chunk=args.loss_chunk,
        products=rows,
        product_flops=flops,
        flops_6n=6.0 * num_matmul_params(shape) * tokens,
        isolated_sum_ms=sum(r["ms_per_step"] for r in rows),
        sequence_ms=sequence_ms,
        sequence_tflops=flops / sequence_ms / 1e9,
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--shapes", nargs="+", default=MEASURED_SHAPES, choices=sorted(SHAPES))
    p.add_argument("--budget", type=int, default=32768, help="real tokens per step")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="alpaca_eval .jsonl or its lengths .json")
    p.add_argument("--max-doc-len", type=int, default=2048, help="examples are cut at this many tokens")
    p.add_argument("--seed", type=int, default=0, help="the step drawn: the first of bench.py's mix_steps at this seed")
    p.add_argument("--loss-chunk", type=int, default=4096, help="PadFreeLlamaConfig.loss_chunk_size")
    p.add_argument("--reps", type=int, default=20, help="repetitions of each product alone")
    p.add_argument("--step-reps", type=int, default=5, help="repetitions of the whole step's products")
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--sustain-s", type=float, default=5.0, help="seconds of the sustained ceiling loop")
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the copy that measures bandwidth")
    p.add_argument("--quick", action="store_true", help="tiny CPU run (a test)")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.budget, args.max_doc_len, args.loss_chunk = ["tiny"], 256, 48, 64
        args.reps, args.step_reps, args.matmul_size, args.sustain_s, args.copy_mib = 2, 1, 128, 0.05, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    step = mix_steps(alpaca_docs(args.data, args.max_doc_len), [args.budget], args.seed)[0]  # every shape's

    report = dict(
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        dtype=str(dtype),
        clocks_idle=gpu_clocks() if device.type == "cuda" else None,
        ceiling_tflops=matmul_ceiling(device, args.matmul_size),
        sustained=sustained_ceiling(device, args.matmul_size, args.sustain_s, dtype),
        copy_gbps=copy_bandwidth(device, args.copy_mib << 20, args.reps),
        shapes=[measure_shape(s, step, args, device, dtype) for s in args.shapes],
    )
    print_report(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return report


def print_report(report: dict) -> None:
    s = report["sustained"]
    print(f"{report['device']} | torch {report['torch']} | {report['dtype']}")
    print(f"ceiling {s['n']}^3: {report['ceiling_tflops']:.0f} TFLOP/s (20 products); kept up for "
          f"{s['seconds']:g} s: {s['tflops_last_half']:.0f} TFLOP/s over its second half "
          f"(by tenths: {', '.join(f'{r:.0f}' for r in s['tflops_by_tenth'])})")  # fmt: skip
    print(f"device-to-device copy: {report['copy_gbps']:.0f} GB/s (read + written)")
    if report["clocks_idle"]:
        print(f"GPU before (SM MHz, max SM MHz, W, W limit, limit reasons): {report['clocks_idle']}")
    if s["clocks_during"]:
        print(f"GPU during the sustained loop: {s['clocks_during']}")
    for r in report["shapes"]:
        print(f"\n{r['shape']} {r['data']}: {r['tokens']} tokens, {r['supervised_tokens']} with a target, "
              f"{r['docs']} documents, loss chunk {r['loss_chunk']}")  # fmt: skip
        print("| product | m x k x n | per step | ms each | TFLOP/s | ms per step |")
        print("|---|---|---|---|---|---|")
        for p in r["products"]:
            print(f"| {p['name']} | {p['m']} x {p['k']} x {p['n']} | {p['count']} | {p['ms']:.3f} | "
                  f"{p['tflops']:.0f} | {p['ms_per_step']:.1f} |")  # fmt: skip
        print(f"products per step: {r['product_flops'] / 1e12:.1f} TFLOP (6N T: {r['flops_6n'] / 1e12:.1f}); "
              f"each alone, summed: {r['isolated_sum_ms']:.1f} ms; all back-to-back in step order: "
              f"{r['sequence_ms']:.1f} ms ({r['sequence_tflops']:.0f} TFLOP/s)")  # fmt: skip


if __name__ == "__main__":
    main()
