"""Varlen attention kernels alone, side by side: forward and forward + backward per layer.

Every backend of `foundry_padfree.attention` that runs on the device gets the same packed batch
(the alpaca_eval length mix of `scripts/bench.py`, and equal-length documents of a sweep), the same
random q/k/v in bf16 (fp32 on CPU), and is timed with CUDA events (wall clock on CPU):

    python scripts/bench_attention.py --out runs/attention.json     # GPU: every available backend
    python scripts/bench_attention.py --head-dim 128                # the same heads, 128 wide
    python scripts/bench_attention.py --quick                       # tiny CPU run (a test)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import DEFAULT_DATA, SHAPES, alpaca_docs, mix_steps, time_ms

from foundry_padfree.attention import BACKENDS, available_backends
from foundry_padfree.varlen import unpad

MEASURED_SHAPES = ["llama3.2-1b", "smollm2-135m"]


def heads_of(shape: str) -> tuple[int, int, int, int]:
    """(query heads, key/value heads, head dim, layers) of one of `bench.SHAPES`."""
    c = SHAPES[shape]
    N = c["num_attention_heads"]
    return N, c["num_key_value_heads"], c.get("head_dim") or c["hidden_size"] // N, c["num_hidden_layers"]


def measure(backend: str, lens: list[int], heads: tuple[int, int, int, int], device, dtype, reps: int) -> dict:
    N, K, H, _ = heads
    positions = torch.cat([torch.arange(n) for n in lens])[None].to(device)
    meta = BACKENDS[backend].prepare(unpad(torch.zeros_like(positions), position_ids=positions).meta, N // K, H)
    T = sum(lens)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(T, n, H, device=device, dtype=dtype, generator=g).requires_grad_() for n in (N, K, K))
    grad = torch.randn(T, N, H, device=device, dtype=dtype, generator=g)
    attend = BACKENDS[backend].attend

    def forward():
        with torch.no_grad():
            attend(q, k, v, meta, H**-0.5)

    def forward_backward():
        torch.autograd.grad(attend(q, k, v, meta, H**-0.5), (q, k, v), grad)

    fwd, both = time_ms(forward, device, reps), time_ms(forward_backward, device, reps)
    causal_flops = 4.0 * N * H * sum(n * (n + 1) / 2 for n in lens)  # forward: two products, half each
    return dict(fwd_ms=fwd, fwd_bwd_ms=both, tflops=3.5 * causal_flops / both / 1e9)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--budget", type=int, default=32768, help="tokens per batch")
    p.add_argument("--sweep-lengths", nargs="*", type=int, default=[256, 2048, 8192, 32768])
    p.add_argument("--shapes", nargs="+", default=MEASURED_SHAPES, choices=sorted(SHAPES))
    p.add_argument("--head-dim", type=int, default=None, help="the shapes' heads at another head dim")
    p.add_argument("--backends", nargs="+", default=None, help="default: every one available (not sdpa on GPU)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="tiny CPU run of the reference backend")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    if args.quick:
        args.budget, args.sweep_lengths, args.reps, args.shapes = 256, [64], 1, ["smollm2-135m"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = available_backends(device, args.head_dim)
    backends = args.backends or [b for b in names if device.type == "cpu" or b != "sdpa"]
    if args.quick:
        backends = ["sdpa"]
    mixes = {"alpaca": [n for n, _ in mix_steps(alpaca_docs(DEFAULT_DATA, 2048), [args.budget], 0)[0]]}
    mixes |= {f"sweep{n}": [n] * max(1, args.budget // n) for n in args.sweep_lengths if n <= args.budget}
    rows = []
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{gpu} | torch {torch.__version__} | {dtype}")
    print(
        "| shape | data | backend | fwd ms/layer | fwd+bwd ms/layer | fwd+bwd ms/step (all layers) | causal TFLOP/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        heads = heads_of(shape)
        if args.head_dim:
            heads = (*heads[:2], args.head_dim, heads[3])
        for data, lens in mixes.items():
            for backend in backends:
                try:
                    r = measure(backend, lens, heads, device, dtype, args.reps)
                except torch.OutOfMemoryError:
                    r = dict(fwd_ms=None, fwd_bwd_ms=None, tflops=None)
                rows.append(dict(shape=shape, heads="{}/{} x {}".format(*heads[:3]), data=f"{data}@{args.budget}",
                                 backend=backend, docs=len(lens), **r))  # fmt: skip
                if r["fwd_ms"] is None:
                    print(f"| {shape} | {data} | {backend} | OOM | | | |")
                    continue
                print(f"| {shape} | {data} | {backend} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                      f"{r['fwd_bwd_ms'] * heads[3]:.1f} | {r['tflops']:.0f} |", flush=True)  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        run = dict(command=" ".join(sys.argv), device=gpu, torch=torch.__version__, rows=rows)
        args.out.write_text(json.dumps(run, indent=1))
    return rows


if __name__ == "__main__":
    main()
