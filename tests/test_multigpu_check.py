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
