"""scripts/packing_stats.py: the numbers it reports, on test data and on the shared alpaca_eval pairs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from data_helpers import prompt_response_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
ALPACA_EVAL = ROOT.parent / "shared" / "data" / "alpaca_eval_outputs.jsonl"


def _script():
    spec = importlib.util.spec_from_file_location("packing_stats", ROOT / "scripts" / "packing_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stats_on_small_data(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", prompt_response_rows(90, seed=5))
    args = ["--data", str(data), "--prompt-key", "q", "--response-key", "a", "--max-seq-len", "256"]
    args += [
        "--vocab-size",
        "400",
        "--rows-per-step",
        "2",
        "--examples-per-step",
        "8",
        "--json",
        str(tmp_path / "s.json"),
    ]
    budget, flatten = _script().main(args)
    for result in (budget, flatten):
        assert result["examples"] == 90 and result["dropped"] == 0 and result["filtered"] == 0
        assert 0 < result["efficiency"] <= 1 and result["tensor_efficiency"] >= result["efficiency"]
        assert result["real_tokens"] == budget["real_tokens"]  # same examples, same tokens
    assert flatten["steps"] == 12 and flatten["examples_per_step_max"] == 8  # ceil(90 / 8), as unpacked
    assert budget["rows"] <= flatten["rows"] and budget["efficiency"] >= flatten["efficiency"]
    assert json.loads((tmp_path / "s.json").read_text())[0]["mode"] == "budget"
    assert "efficiency" in capsys.readouterr().out


@pytest.mark.skipif(not ALPACA_EVAL.exists(), reason=f"{ALPACA_EVAL} is not present")
def test_alpaca_eval_budget_packing_is_at_least_99_percent_efficient():
    # A tokenizer trained on 1000 of the pairs keeps the test short (the tool's default trains on all).
    args = ["--data", str(ALPACA_EVAL), "--prompt-key", "instruction", "--response-key", "output"]
    args += ["--max-seq-len", "2048", "--modes", "budget", "--tokenizer-sample", "1000", "--vocab-size", "4096"]
    (result,) = _script().main(args)
    assert result["examples"] == 9660 and result["filtered"] == 0 and result["dropped"] == 0
    assert result["efficiency"] >= 0.99, result
