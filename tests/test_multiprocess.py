"""Two processes (composer launcher, gloo DDP on CPU) against one, at the same global batch.

Each run is `python -m composer.cli.launcher -n N scripts/train.py <yaml>`, with the `step_record`
logger of `scripts/multigpu_check.py` loaded through `code_paths`: every rank writes, per step,
the logged train loss (Composer all-reduces it and divides by the world size), the hashes of its
batch's rows and its token counts. Four 2-process launches (about a minute each on 2 cores) and
three 1-process runs in the test's own process:

- `padfree_text`, 1 vs 2 processes: the same rows per step, split between ranks; equal losses.
- `padfree_finetuning` in `budget` mode, 1 vs 2 processes with `accumulate_train_batch_on_tokens`:
  the ranks get different numbers of loss tokens, and the losses still match, which holds only if
  microbatches are weighted by tokens summed over all ranks.
- the 2-process finetuning run saves at batch 2; a third run loads it (with the packing plan's
  dataloader state) and its batches 3-4 equal the uninterrupted run's.
- Composer's eval of `padfree_finetuning` loaders on 2 processes (`tests/eval_ranks.py`) scores
  the same target tokens, with the same loss, as on one.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.data_helpers import prompt_response_rows

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8  # rows per step, all ranks together
MICROBATCH = 2  # 1 process: 4 microbatches per step; 2 processes: 2 each
# fp32 on CPU: the two layouts differ only in summation order (microbatch grouping, all-reduce).
LOSS_RTOL = 1e-5

pytestmark = pytest.mark.slow


def _load_check_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("multigpu_check", REPO / "scripts" / "multigpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load_check_script()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Tokenizer, MDS rows and a tiny Llama config (the demo's), an SFT JSONL and the record module."""
    from foundry_padfree.demo import prepare

    root = tmp_path_factory.mktemp("multiprocess")
    prepare(root / "prep", max_documents=300)
    (root / "sft").mkdir()
    rows = prompt_response_rows(200, seed=5, max_lines=3)
    (root / "sft" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    check.write_step_record(root / "step_record.py")
    return root


def _run(workdir: Path, name: str, nprocs: int, batches: int, loader: str, overrides: list[str] = ()) -> Path:
    run = workdir / name
    train_loader = None
    if loader == "finetuning":
        train_loader = {
            "name": "padfree_finetuning",
            "dataset": {
                "hf_name": "json",
                "hf_kwargs": {"data_files": str(workdir / "sft" / "train.jsonl")},
                "split": "train",
                "preprocessing_fn": {"prompt": "q", "response": "a"},
                "max_seq_len": "${variables.max_seq_len}",
                "decoder_only_format": True,
                "shuffle": True,
                "shuffle_seed": 17,
            },
            "num_workers": 0,
            "packing_mode": "budget",
        }
    yaml = check.train_yaml(
        run / "train.yaml",
        workdir / "prep",
        batches=batches,
        global_batch=GLOBAL_BATCH,
        microbatch=MICROBATCH,
        record_module=workdir / "step_record.py",
        train_loader=train_loader,
        stats=False,
    )
    overrides = [f"loggers.step_record.out_dir={run}/records", *overrides]
    if nprocs == 1:
        # The 1-process reference runs in this process (no launcher): the same `train_from_yaml`
        # without a process group, and one interpreter start-up (~25 s on 2 cores) fewer.
        from llmfoundry.command_utils import train_from_yaml

        train_from_yaml(str(yaml), overrides).close()
    else:
        check.launch(nprocs, yaml, overrides, run / "launch.log")
    return run


def _losses(records: dict[int, list[dict[str, Any]]]) -> list[float]:
    """Per-step logged loss; Composer logs the all-ranks mean, so every rank must agree."""
    per_rank = [[step["loss/train/total"] for step in steps] for steps in records.values()]
    assert all(losses == per_rank[0] for losses in per_rank), f"ranks logged different losses: {per_rank}"
    return per_rank[0]


def _assert_split_of(one: dict[int, list[dict]], two: dict[int, list[dict]], batches: int) -> None:
    """Step by step, the 2 ranks' rows are disjoint and together are the 1-process step's rows."""
    assert set(one) == {0} and set(two) == {0, 1}, f"ranks: {sorted(one)} and {sorted(two)}"
    assert len(one[0]) == len(two[0]) == len(two[1]) == batches
    for k in range(batches):
        rows0, rows1 = two[0][k]["row_sha1"], two[1][k]["row_sha1"]
        assert rows0 and rows1, f"step {k + 1}: a rank got no rows ({len(rows0)}, {len(rows1)})"
        assert not set(rows0) & set(rows1), f"step {k + 1}: ranks 0 and 1 got the same rows"
        assert sorted(rows0 + rows1) == sorted(one[0][k]["row_sha1"]), (
            f"step {k + 1}: the ranks' rows together are not the 1-process batch"
        )


@pytest.fixture(scope="module")
def text_runs(workdir: Path) -> tuple[dict, dict]:
    one = _run(workdir, "text1", 1, 3, "text")
    two = _run(workdir, "text2", 2, 3, "text")
    return check.read_records(one / "records"), check.read_records(two / "records")


@pytest.fixture(scope="module")
def finetuning_runs(workdir: Path) -> tuple[dict, dict, dict, Path]:
    one = _run(workdir, "sft1", 1, 4, "finetuning")
    save = [f"save_folder={workdir}/sft2/checkpoints", "save_interval=2ba", "save_num_checkpoints_to_keep=-1",
            "save_overwrite=true"]  # fmt: skip
    two = _run(workdir, "sft2", 2, 4, "finetuning", save)
    checkpoint = workdir / "sft2" / "checkpoints" / "ep0-ba2-rank0.pt"
    resumed = _run(workdir, "sft2_resumed", 2, 4, "finetuning", [f"load_path={checkpoint}"])
    records = [check.read_records(run / "records") for run in (one, two, resumed)]
    return *records, workdir / "sft2" / "checkpoints"


def test_text_two_processes_match_one(text_runs):
    one, two = text_runs
    _assert_split_of(one, two, 3)
    assert _losses(two) == pytest.approx(_losses(one), rel=LOSS_RTOL)


def test_finetuning_token_weighted_loss_across_ranks(finetuning_runs):
    one, two, _, _ = finetuning_runs
    _assert_split_of(one, two, 4)
    # Budget packing gives the ranks different real and loss token counts: the case where
    # averaging per-rank mean losses would be wrong and token weighting matters.
    unequal = [k for k in range(4) if two[0][k]["loss_tokens"] != two[1][k]["loss_tokens"]]
    assert unequal, "every step had equal loss tokens on both ranks; the check would not test token weighting"
    for k in range(4):
        assert two[0][k]["loss_tokens"] + two[1][k]["loss_tokens"] == one[0][k]["loss_tokens"]
    assert _losses(two) == pytest.approx(_losses(one), rel=LOSS_RTOL)


def test_checkpoint_resume_two_processes(finetuning_runs):
    _, two, resumed, checkpoints = finetuning_runs
    assert (checkpoints / "ep0-ba2-rank0.pt").is_file(), sorted(p.name for p in checkpoints.iterdir())
    # The resumed run trains batches 3 and 4 only, on the same rows and with the same losses.
    assert [s["step"] for s in resumed[0]] == [3, 4]
    for rank in (0, 1):
        assert [s["row_sha1"] for s in resumed[rank]] == [s["row_sha1"] for s in two[rank][2:]]
    assert _losses(resumed) == pytest.approx(_losses(two)[2:], rel=1e-6)


def test_eval_on_two_ranks_scores_every_example_once(tmp_path):
    """On two ranks eval must score exactly the 1-process targets. Composer's eval loop leaves
    `total_size - len(dataset)` samples out of the metrics on the last ranks, as
    `DistributedSampler` repeats samples to even out the ranks; the plan repeats none. Seven
    examples in steps of 2 per rank (a plain DistributedSampler would repeat one); five leave one
    example for two ranks, so the second rank gets a row of padding at the last step."""
    import json

    from tests import eval_ranks
    from tests.composer_helpers import write_model_dir

    for name, n in (("seven", 7), ("five", 5)):
        rows = prompt_response_rows(n, seed=3, max_lines=2)
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"prompt": r["q"], "response": r["a"]}) + "\n" for r in rows))  # fmt: skip
    write_model_dir(tmp_path / "model", vocab_size=512)
    check.launch(2, tmp_path, [], tmp_path / "eval2.log", script=REPO / "tests" / "eval_ranks.py")
    eval_ranks.main(tmp_path)  # one process, in this one
    one, two = (json.loads((tmp_path / f"eval_{n}.json").read_text()) for n in (1, 2))
    for name in ("seven", "five"):
        assert two[name]["scored_targets"] == one[name]["scored_targets"] > 0, (name, one, two)
        assert two[name]["loss"] == pytest.approx(one[name]["loss"], rel=1e-5), name


def test_callbacks_fail_on_every_rank_when_one_rank_fails(tmp_path):
    """Each rank checks its own batch; Composer's loggers write rank 0's metrics. A failure on
    rank 1 must show in what rank 0 logs, and with `strict` stop both ranks (none left waiting);
    a batch of padding only on rank 1 must not leave rank 0 waiting either."""
    import json

    from tests.composer_helpers import write_model_dir

    write_model_dir(tmp_path / "model")
    check.launch(2, tmp_path, [], tmp_path / "ranks.log", script=REPO / "tests" / "audit_ranks.py")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["audit"] == {"passed": [0.0], "checks_failed": [1.0], "ranks_failed": [1.0]}, r
    assert "rank(s) [1]" in ranks[0]["audit_strict_error"]
    assert "total_tokens[0] = 16 but row 0 has" in ranks[1]["audit_strict_error"]
    assert "rank(s) [1]" in ranks[0]["isolation_strict_error"]
    assert "moved other documents' logits" in ranks[1]["isolation_strict_error"]
    for rank, r in enumerate(ranks):  # rank 1's batch is padding only
        assert r["padding_rank"]["padfree/audit/passed"] == [1.0]
        assert r["padding_rank"]["padfree/audit/forwards_audited"] == ([2.0] if rank == 0 else [])
        assert r["padding_rank"]["padfree/isolation/passed"] == []
        assert len(r["padding_rank"]["loss/train/total"]) == 1


def test_tensor_parallel_loading_matches_the_unsharded_model(tmp_path):
    """`from_pretrained(tp_plan="auto")` shards the projections by heads (Llama's plan, which the
    config carries); the attention must take its head counts from the sharded projections."""
    # About 30 s on 2 cores; a hang after the results (seen once at exit) fails within minutes.
    check.launch(2, tmp_path, [], tmp_path / "tp.log", timeout=240, script=REPO / "tests" / "tp_ranks.py")
    for rank in (0, 1):
        result = json.loads((tmp_path / f"tp_rank{rank}.json").read_text())
        assert result["ours"]["q_proj_is_sharded"] and result["stock"]["q_proj_is_sharded"], result
        assert result["ours"]["max_abs_diff"] < 1e-5 and result["stock"]["max_abs_diff"] < 1e-5, result
