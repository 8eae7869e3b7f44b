"""`scripts/multigpu_check.py`'s options and report, without GPUs (its runs need two)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("multigpu_check", REPO / "scripts" / "multigpu_check.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runs", "pretrain_135m_ddp"], "--runs selects runs of --shipped"),
        (["--shipped", "--runs", "sft_1b_fsdp_ac_resumed"], "add sft_1b_fsdp_ac"),
        (["--shipped", "--runs", "sft_1b"], "invalid choice: 'sft_1b'"),
    ],
)
def test_runs_option_is_checked_before_any_work(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        check.main(["--out", str(tmp_path / "out"), *args])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before preparing data


def test_shipped_report_gives_the_parity_distances():
    run = {"yaml": "pretrain_smollm2_135m.yaml", "ok": True, "steps": [1, 2], "losses": [11.3, 11.2],
           "tokens_per_sec_per_gpu": {0: 1000.0, 1: 1000.0}, "ranks_distinct_rows": True, "checkpoints": [],
           "checks": {"audit": [1.0], "isolation": [1.0], "parity": [1.0]},
           "parity": {"logits_max_rel_diff": [0.0497], "stock_logits_max_rel_diff": [0.0523]}}  # fmt: skip
    text = check.shipped_markdown({"pretrain_135m_fsdp_ac": run})
    assert "parity 1/1" in text
    assert "parity: logits 0.0497 of their maximum from stock HF in fp32, stock HF in this precision 0.0523" in text


def test_shipped_runs_launches_only_the_runs_asked_for(tmp_path, monkeypatch):
    launched = []

    def launch(nprocs, yaml, overrides, log, timeout=None):
        launched.append(next(o.split("=", 1)[1] for o in overrides if o.startswith("run_name=")))
        raise RuntimeError("not launched here")

    monkeypatch.setattr(check, "launch", launch)
    results = check.shipped_runs(tmp_path, tmp_path / "data", tmp_path / "step_record.py",
                                 runs=("pretrain_135m_ddp", "sft_1b_fsdp_no_ac"))  # fmt: skip
    assert launched == ["pretrain_135m_ddp", "sft_1b_fsdp_no_ac"]
    assert set(results) == {"pretrain_135m_ddp", "sft_1b_fsdp_no_ac"}
    assert not any(r["ok"] for r in results.values())  # each failed launch is reported, not raised
