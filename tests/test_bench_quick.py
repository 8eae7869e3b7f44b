"""`scripts/bench.py --quick`: the GPU benchmark's whole path on a tiny CPU config, so it never rots."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    _load_bench().main(["--quick", "--out", str(out)])
    return json.loads(out.read_text())


def test_warm_up_meets_the_largest_timed_shape_first():
    import torch

    bench = _load_bench()
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, input_ids):
            seen.append(tuple(input_ids.shape))
            return type("Out", (), {"loss": self.w.sum()})()

    shapes = [(2, 3), (3, 4), (2, 5), (5, 6), (1, 2)]  # warm-up: the first 2; the largest is timed
    batches = [{"input_ids": torch.zeros(s, dtype=torch.long)} for s in shapes]
    result = bench.train(Recorder(), batches, [1] * len(shapes), 2, torch.device("cpu"))
    assert seen == [(2, 3), (3, 4), (5, 6), (2, 5), (5, 6), (1, 2)]
    assert result["timed_steps"] == len(result["step_ms"]) == 3


def test_power_summary_reads_the_samples_inside_the_timed_window():
    import time
    from datetime import datetime

    bench = _load_bench()
    t0 = time.time()

    def line(dt: float, clock: str, power: str, reasons: str) -> str:
        stamp = datetime.fromtimestamp(t0 + dt).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
        return f"{stamp}, {clock}, {power}, {reasons}"

    lines = [
        line(-0.5, "1980", "120.0", "0x0000000000000000"),  # before the window: idle
        line(0.1, "1500", "700.0", "0x0000000000000004"),  # power-capped
        line(0.2, "1600", "690.0", "0x0000000000000004"),
        line(0.3, "1700", "650.0", "0x0000000000000000"),
        line(0.4, "[N/A]", "[N/A]", "[N/A]"),  # skipped
        line(2.0, "1980", "90.0", "0x0000000000000000"),  # after it
        "2026/11/24 08:33:",  # cut short when the sampler stopped
    ]
    s = bench.power_summary(lines, t0, t0 + 1.0)
    assert s == dict(sm_clock_mhz=1600.0, power_w=pytest.approx(680.0), power_capped=pytest.approx(2 / 3),
                     power_samples=3)  # fmt: skip
    assert bench.power_summary(lines, t0 + 5, t0 + 6) == {}
    with bench.PowerSampler(bench.torch.device("cpu")) as power:  # no GPU: nothing sampled
        pass
    assert power.summary() == {}


def test_every_system_ran(report):
    systems = {r["system"] for r in report["results"] if r["data"] == "alpaca@128"}
    expected = {"hf_padded", "hf_concat", "hf_padfree", "ours_eager_sdpa", "ours_eager_flex", "ours_compiled"}
    assert systems == expected
    for r in report["results"]:
        assert r["status"] == "ok", r
        assert r["real_tokens_per_s"] > 0 and math.isfinite(r["real_tokens_per_s"]), r
        assert r["step_ms_median"] > 0, r
        assert r["flops_per_token"] > r["flops_6n_per_token"] > 0, r
        assert 0 < r["mfu"] < 10, r  # against a CPU matmul ceiling, but finite and positive
    assert {r["data"] for r in report["results"]} == {"alpaca@128", "sweep32@128"}


def test_isolated_systems_train_alike(report):
    # Same weights, same batches, documents isolated: the loss after the same steps must agree.
    rows = {r["system"]: r for r in report["results"] if r["data"] == "alpaca@128"}
    ref = rows["ours_eager_sdpa"]["loss"]
    assert abs(ref - math.log(512)) < 1.0  # random init: about log(vocab)
    for system in ("hf_padded", "hf_padfree", "ours_eager_flex", "ours_compiled"):
        assert rows[system]["loss"] == pytest.approx(ref, rel=1e-4), system


def test_compiled_path_does_not_recompile(report):
    compiled = next(r for r in report["results"] if r["system"] == "ours_compiled" and r["data"] == "alpaca@128")
    assert compiled["recompile_check_steps"] == 3
    assert compiled["recompiles_after_warmup"] == 0
    assert compiled["compiles_during_timing"] == 0


def test_targets_are_reported(report):
    names = [t["target"] for t in report["targets"]]
    assert any("compiled / hf_concat" in n for n in names)
    assert any("recompiles" in n for n in names)
    assert report["matmul_tflops"] > 0
    compiled = next(r for r in report["results"] if r["system"] == "ours_compiled" and r["data"] == "alpaca@128")
    assert compiled["compiles_during_warmup"] >= 1  # its first graphs, compiled in warm-up and reported


def _row(system: str, tps: float, median_ms: float, data: str = "alpaca@100", **extra) -> dict:
    return dict(shape="s", data=data, budget=100, system=system, status="ok", real_tokens_per_s=tps,
                step_ms_median=median_ms, step_ms=[median_ms], peak_mem_gib=1.0, **extra)  # fmt: skip


def test_targets_use_the_default_backend_and_only_an_isolated_padding_free_reference():
    bench = _load_bench()
    results = [
        _row("hf_concat", 100.0, 10.0),
        _row("hf_padfree", 10.0, 100.0, isolated=False),  # documents saw each other: no reference
        _row("ours_eager_triton", 200.0, 5.0),
        _row("ours_eager_torch_varlen", 300.0, 4.0),  # faster, but not what `auto` gives
    ]
    targets = {t["target"]: t for t in bench.check_targets(dict(results=results, auto_backend={"s": "triton"}))}
    concat = targets["s eager / hf_concat @100"]
    assert (concat["value"], concat["system"], concat["median_ratio"]) == (2.0, "ours_eager_triton", 2.0)
    assert targets["s eager / hf_padfree @100"]["value"] is None
    assert targets["s eager / hf_padfree @100"]["met"] is None
    # Without the default backend's run, the fastest eager backend that ran.
    results = [r for r in results if r["system"] != "ours_eager_triton"]
    targets = {t["target"]: t for t in bench.check_targets(dict(results=results, auto_backend={"s": "triton"}))}
    assert targets["s eager / hf_concat @100"]["system"] == "ours_eager_torch_varlen"


def test_speed_targets_give_the_ratio_of_median_steps_beside_the_rate():
    bench = _load_bench()
    hf = _row("hf_padded", 10.0, 40.0)  # most steps 40 ms; two stalls pulled its rate down
    results = [hf, _row("ours_eager_sdpa", 60.0, 20.0)]
    (target,) = [t for t in bench.check_targets(dict(results=results)) if "hf_padded" in t["target"]]
    assert (target["value"], target["median_ratio"], target["met"]) == (6.0, 2.0, True)


def test_the_padding_free_child_refuses_a_transformers_that_would_not_isolate(monkeypatch):
    bench = _load_bench()
    monkeypatch.setattr(bench, "_packed_sdpa_native", lambda: False)
    result = bench._run_hf_padfree_task({}, None, bench.torch.device("cpu"))
    assert result["status"].startswith("not run:") and "4.54" in result["status"]


@pytest.mark.parametrize(
    ("option", "match"),
    [
        (["--steps", "0"], "--steps 0: must be at least 1"),
        (["--warmup", "-1"], "--warmup -1: must be at least 0"),
        (["--budgets", "8192", "0"], r"--budgets \[0\]: token counts"),
        (["--sweep-lengths", "-5"], r"--sweep-lengths \[-5\]"),
        (["--budgets", "1"], r"--budgets \[1\]: token counts must be at least 2"),
    ],
)
def test_counts_out_of_range_are_refused_naming_the_option(capsys, option, match):
    with pytest.raises(SystemExit):
        _load_bench().parse_args(["--quick", *option])
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("finished", [0, 1, 2])
def test_a_crashed_padding_free_child_keeps_the_rows_it_finished(monkeypatch, finished):
    """The worker writes its results after each task; a crash (e.g. killed for memory) loses only
    the tasks it had not finished, and they are reported as failed with the exit code."""
    import argparse
    import subprocess

    bench = _load_bench()
    tasks = [dict(system="hf_padfree", shape="tiny", label=f"row{i}", steps=[]) for i in range(2)]

    def crash(cmd, **kwargs):
        Path(cmd[-1]).write_text(json.dumps([dict(status="ok", row=i) for i in range(finished)]))
        return subprocess.CompletedProcess(cmd, -9, stdout="", stderr="Killed")

    monkeypatch.setattr(bench.subprocess, "run", crash)
    results = bench.run_child(tasks, argparse.Namespace(), env={})
    assert [r.get("row") for r in results[:finished]] == list(range(finished))
    assert len(results) == 2
    for r in results[finished:]:
        assert r["status"].startswith("child failed (rc -9)") and "Killed" in r["status"]
    if finished == 2:  # every row written, yet the child failed: the rows stand
        assert all(r["status"] == "ok" for r in results)


def test_attention_bench_quick_runs_and_reports(tmp_path):
    import subprocess

    out = tmp_path / "attention.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_attention.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["data"], r["backend"]) for r in rows} == {("alpaca@256", "sdpa"), ("sweep64@256", "sdpa")}
    # Times only have to be measured (positive, finite); their values mean nothing on CPU.
    assert all(0 < r["fwd_ms"] < math.inf and 0 < r["fwd_bwd_ms"] < math.inf for r in rows), rows
    assert rows[1]["docs"] == 4  # 256 tokens in documents of 64


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_attention_tile_sweep_quick_runs_every_variant_to_the_presets_result(tmp_path):
    import os
    import subprocess

    out = tmp_path / "tiles.json"
    script = ROOT / "scripts" / "sweep_attention_tiles.py"
    run = subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)],
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["preset"]["pack"] == 4  # 4 query heads per key/value head: the packed preset
    for kernel, rows in report["results"].items():
        # The preset first, then 1, 2 and 4 packed heads on the quick grid; all measured, all equal.
        assert [r["sizes"]["pack"] for r in rows] == [4, 1, 2, 4], kernel
        assert all(0 < r["ms"] < math.inf and r["max_diff"] < 1e-5 for r in rows), rows


def test_products_bench_quick_counts_every_product_of_a_step(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_products", ROOT / "scripts" / "bench_products.py")
    products = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_products", products)  # its dataclass looks itself up there
    spec.loader.exec_module(products)
    out = tmp_path / "products.json"
    report = products.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["shapes"][0]["shape"] == "tiny"
    (r,) = report["shapes"]
    c = products.SHAPES["tiny"]
    D, F, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    H = D // c["num_attention_heads"]
    layer_params = D * H * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"]) + 3 * D * F
    # Three products per weight and token: every layer on every token, the head on supervised ones.
    assert r["product_flops"] == 6 * L * layer_params * r["tokens"] + 6 * V * D * r["supervised_tokens"]
    assert r["tokens"] == 256 and 0 < r["supervised_tokens"] < r["tokens"]
    chunks = math.ceil(r["supervised_tokens"] / r["loss_chunk"])
    assert sum(p["count"] for p in r["products"]) == 21 * L + 3 * chunks
    fields = ["part", "kind", "m", "k", "n", "count", "chunk", "first"]
    order = products.step_order([products.Product(**{k: p[k] for k in fields}) for p in r["products"]], L)
    assert len(order) == 21 * L + 3 * chunks
    assert [p.name for p in order[:7]] == [f"{w}.fwd" for w in ("q", "k", "v", "o", "gate", "up", "down")]
    wgrads = [p for p in r["products"] if p["part"] == "head" and p["kind"] == "wgrad"]
    assert [p["first"] for p in wgrads].count(True) == 1 and sum(p["count"] for p in wgrads) == chunks
    assert wgrads[0]["name"] == f"head.wgrad[{wgrads[0]['chunk']},first]"
    assert all(0 < p["ms"] < math.inf for p in r["products"]) and r["sequence_ms"] > 0
    assert len(report["sustained"]["tflops_by_tenth"]) == 10 and report["copy_gbps"] > 0


def test_the_sync_count_includes_explicit_synchronize_calls():
    """`set_sync_debug_mode` does not report `torch.cuda.synchronize()` or event and stream waits;
    the count adds them, at their callers' lines."""
    bench = _load_bench()
    torch = bench.torch
    calls = (torch.cuda.synchronize, lambda: torch.cuda.Event.synchronize(None),
             lambda: torch.cuda.Stream.synchronize(None))  # fmt: skip
    with bench._explicit_syncs() as sites:
        torch.cuda.synchronize  # looked up, not called: not counted
        for call in calls[1:]:
            with contextlib.suppress(Exception):  # no CUDA here: the call is what is counted
                call()
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
    assert len(sites) == 3 and all(site.startswith("test_bench_quick.py:") for site in sites), sites
    assert torch.cuda.synchronize is calls[0]  # put back


def test_flex_padding_free_needs_a_transformers_that_reads_packed_positions(monkeypatch):
    bench = _load_bench()
    monkeypatch.setattr(bench, "_packed_sdpa_native", lambda: False)
    args = bench.parse_args(["--quick"])
    result = bench.run_system("hf_padfree_flex", args.shapes[0], [[(4, 1)]] * 2, args, bench.torch.device("cpu"))
    assert result["status"].startswith("not run:") and "4.54" in result["status"]
