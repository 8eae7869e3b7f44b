"""Tile sizes of the Triton attention kernels, swept one kernel at a time on one packed batch.

For a shape's heads (`bench.SHAPES`) and one batch of documents (the first step of the alpaca_eval
mix drawn by `scripts/bench.py`'s `mix_steps` at seed 0, or documents of one length), each of the
three kernels (forward, dK/dV, dQ) runs alone with every `TileSizes` variant of a grid: query heads
packed per program, tokens per tile, tokens per inner step, pipeline stages. Printed: the fastest
variants of each kernel beside the preset `schedule` picks for that batch, and each variant's
largest difference from the preset's result (the same sums in another order):

    python scripts/sweep_attention_tiles.py --out runs/tiles.json                  # 1B heads, alpaca mix
    python scripts/sweep_attention_tiles.py --docs 2048 --out runs/tiles-2048.json
    python scripts/sweep_attention_tiles.py --head-dim 128 --out runs/tiles-h128.json  # Llama-3-8B's heads
    TRITON_INTERPRET=1 python scripts/sweep_attention_tiles.py --quick            # tiny CPU run (a test)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import DEFAULT_DATA, SHAPES, alpaca_docs, mix_steps, time_ms
from bench_attention import heads_of

from foundry_padfree import triton_attention as ta

# Grids per kernel: (field, values). Variants whose packed rows fall outside ROWS are skipped.
GRIDS = {
    "fwd": {"fwd_m": (16, 32, 64, 128), "fwd_n": (32, 64, 128)},
    "dkdv": {"dkdv_m": (16, 32, 64), "dkdv_n": (32, 64, 128), "dkdv_stages": (2, 3)},  # keys per program
    "dq": {"dq_m": (16, 32, 64), "dq_n": (32, 64), "dq_stages": (2, 3)},
}
QUICK_GRIDS = {
    "fwd": {"fwd_m": (16,), "fwd_n": (16,)},
    "dkdv": {"dkdv_m": (16,), "dkdv_n": (16,), "dkdv_stages": (2,)},
    "dq": {"dq_m": (16,), "dq_n": (16,), "dq_stages": (2,)},
}
ROWS = (16, 256)  # packed rows (pack * query tokens) of a program's or a step's products
TILE_FIELD = {"fwd": "fwd_m", "dkdv": "dkdv_m", "dq": "dq_m"}  # the field whose rows are packed


def variants(kernel: str, base: ta.TileSizes, packs: list[int], grids: dict) -> list[ta.TileSizes]:
    """`base` with every combination of `kernel`'s grid and of `packs`, within ROWS."""
    names = list(grids[kernel])
    out = []
    for pack, values in itertools.product(packs, itertools.product(*grids[kernel].values())):
        sizes = base._replace(pack=pack, **dict(zip(names, values)))
        if ROWS[0] <= pack * getattr(sizes, TILE_FIELD[kernel]) <= ROWS[1]:
            out.append(sizes)
    return out


def run_kernel(kernel: str, sizes: ta.TileSizes, inputs: dict, scale: float):
    """One call of `kernel` with `sizes` (its tile list built first, untimed); returns a callable
    that reruns it and the call's outputs."""
    lens, q, k, v, o, do, lse, delta = (inputs[n] for n in ("lens", "q", "k", "v", "o", "do", "lse", "delta"))
    tiles = ta.schedule(lens, q.device, sizes)
    if kernel == "fwd":
        call = lambda: ta._forward(q, k, v, tiles.fwd_P4, sizes, scale)  # noqa: E731
    elif kernel == "dkdv":
        call = lambda: ta._dkdv(do, q, k, v, lse, delta, tiles.dkdv_P4, sizes, scale)  # noqa: E731
    else:
        call = lambda: ta._dq(do, q, k, v, o, lse, tiles.dq_P4, sizes, scale)  # noqa: E731
    return call, call()


def sweep(lens: tuple[int, ...], heads: tuple[int, int, int], device, dtype, reps: int, grids: dict) -> dict:
    N, K, H = heads
    T = sum(lens)
    g = torch.Generator(device=device).manual_seed(0)
    q, do = (torch.randn(T, N, H, device=device, dtype=dtype, generator=g) for _ in range(2))
    k, v = (torch.randn(T, K, H, device=device, dtype=dtype, generator=g) for _ in range(2))
    scale = H**-0.5
    tiles = ta.schedule(lens, device, group=N // K, head_dim=H)
    preset = tiles.sizes
    o, lse = ta._forward(q, k, v, tiles.fwd_P4, preset, scale)
    delta = ta._dq(do, q, k, v, o, lse, tiles.dq_P4, preset, scale)[1]
    inputs = dict(lens=lens, q=q, k=k, v=v, o=o, do=do, lse=lse, delta=delta)
    packs = [p for p in (1, 2, 4, 8) if (N // K) % p == 0]
    results = {}
    for kernel in ("fwd", "dkdv", "dq"):
        call, reference = run_kernel(kernel, preset, inputs, scale)  # the preset first, the reference
        rows = [dict(sizes=preset._asdict(), ms=time_ms(call, device, reps), max_diff=0.0)]
        for sizes in [s for s in variants(kernel, preset, packs, grids) if s != preset]:
            try:
                call, outs = run_kernel(kernel, sizes, inputs, scale)
                ms = time_ms(call, device, reps)
            except Exception as e:  # a variant the GPU cannot hold (shared memory, registers)
                rows.append(dict(sizes=sizes._asdict(), ms=None, error=f"{type(e).__name__}: {str(e)[:120]}"))
                continue
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(outs[:2], reference[:2]))
            rows.append(dict(sizes=sizes._asdict(), ms=ms, max_diff=diff))
        results[kernel] = rows
    return dict(preset=preset._asdict(), results=results)


def print_table(report: dict, top: int) -> None:
    keys = {"fwd": ("fwd_m", "fwd_n", None), "dkdv": ("dkdv_m", "dkdv_n", "dkdv_stages"),
            "dq": ("dq_m", "dq_n", "dq_stages")}  # fmt: skip
    print(f"\n{report['device']} | torch {report['torch']} | {report['dtype']} | {report['shape']} "
          f"{report['heads']} | {report['docs']} ({report['tokens']} tokens)")  # fmt: skip
    print("| kernel | heads packed | query tokens | key tokens | stages | ms | vs preset | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for kernel, rows in report["results"].items():
        ok = sorted((r for r in rows if r["ms"] is not None), key=lambda r: r["ms"])
        base = rows[0]["ms"]
        for i, r in enumerate([rows[0], *[r for r in ok if r is not rows[0]][:top]]):
            s = r["sizes"]
            queries, keys_, stages = (s[k] if k else ta.FWD_STAGES for k in keys[kernel])
            name = f"{kernel} (preset)" if i == 0 else kernel
            print(f"| {name} | {s['pack']} | {queries} | {keys_} | {stages} | {r['ms']:.3f} | "
                  f"{base / r['ms']:.2f}x | {r['max_diff']:.1e} |")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    p.add_argument("--shape", default="llama3.2-1b", choices=sorted(SHAPES))
    p.add_argument("--head-dim", type=int, default=None, help="the shape's heads at another head dim")
    p.add_argument("--docs", default="alpaca", help="'alpaca' or a document length in tokens")
    p.add_argument("--budget", type=int, default=32768, help="tokens in the batch")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--top", type=int, default=5, help="fastest variants printed per kernel")
    p.add_argument("--quick", action="store_true", help="tiny batch and grid (CPU: Triton's interpreter)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        lens, heads, dtype, reps, grids = (5, 33, 1, 20), (4, 1, 16), torch.float32, 1, QUICK_GRIDS
        args.shape, docs = "tiny", "documents of 5, 33, 1, 20"
    else:
        N, K, H, _ = heads_of(args.shape)
        H = args.head_dim or H
        heads, dtype, reps, grids = (N, K, H), torch.bfloat16, args.reps, GRIDS
        if args.docs == "alpaca":
            mix = mix_steps(alpaca_docs(DEFAULT_DATA, 2048), [args.budget], seed=0)[0]
            lens, docs = tuple(n for n, _ in mix), "alpaca mix"
        else:
            n = int(args.docs)
            lens, docs = (n,) * max(1, args.budget // n), f"documents of {n}"
    report = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        torch=torch.__version__, dtype=str(dtype).removeprefix("torch."), shape=args.shape,
        heads="{}/{}, dim {}".format(*heads), docs=docs, tokens=sum(lens), doc_lens=list(lens),
        **sweep(lens, heads, device, dtype, reps, grids),
    )  # fmt: skip
    print_table(report, args.top)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
