"""A verification callback on two ranks where only rank 1's batch fails a check, for
`test_multiprocess.py` to launch:

    python -m composer.cli.launcher -n 2 tests/audit_ranks.py WORKDIR

WORKDIR holds `model/` (a stock Llama config directory). Each rank writes `WORKDIR/rank<r>.json`:
what the non-strict audit logged on that rank, and the error each strict callback raised there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from composer.utils import dist

import foundry_padfree.callbacks as cb
from foundry_padfree.attention import BACKENDS, Backend
from foundry_padfree.callbacks import PadFreeAudit, PadFreeCheckError, PadFreeIsolation, PadFreeParity
from tests.composer_helpers import SEQ_LEN, composer_model, fit, leaky_attend, logged


def main(workdir: Path) -> None:
    dist.initialize_dist("cpu")
    rank = dist.get_global_rank()
    if rank == 1:  # this rank's batch claims padding as tokens; rank 0's is right
        original = cb.read_batch
        cb.read_batch = lambda b: original(dict(b, total_tokens=[SEQ_LEN] * len(b["total_tokens"])))
    out: dict = {}
    trainer = fit(composer_model(workdir / "model"), [PadFreeAudit(interval=1)], batches=1, microbatch=4)
    out["audit"] = {k: logged(trainer, f"padfree/audit/{k}") for k in ("passed", "checks_failed", "ranks_failed")}
    try:
        fit(composer_model(workdir / "model"), [PadFreeAudit(interval=1, strict=True)], batches=1, microbatch=4)
    except PadFreeCheckError as e:
        out["audit_strict_error"] = str(e)
    if rank == 1:
        cb.read_batch = original
        # Documents of rank 1's batch see each other (plain causal attention over the packed rows).
        sdpa = BACKENDS["sdpa"]
        BACKENDS["sdpa"] = Backend("sdpa", leaky_attend)
    try:
        fit(composer_model(workdir / "model"), [PadFreeIsolation(interval=1, strict=True)], batches=1)
    except PadFreeCheckError as e:
        out["isolation_strict_error"] = str(e)
    if rank == 1:
        BACKENDS["sdpa"] = sdpa
    # Rank 1's batch is padding only (the odd rows: empty text samples): it trains with a loss of
    # 0, is not audited, and the probes skip the batch on both ranks instead of waiting for rank 1.
    rows = [[5, 3], [], [4], [], [6, 2], [], [7], []]
    callbacks = [PadFreeAudit(interval=1, strict=True), PadFreeIsolation(interval=1, strict=True),
                 PadFreeParity(interval=1, strict=True)]  # fmt: skip
    trainer = fit(composer_model(workdir / "model"), callbacks, batches=1, rows=rows)
    out["padding_rank"] = {k: logged(trainer, k) for k in ("padfree/audit/passed", "padfree/audit/forwards_audited",
                                                           "padfree/isolation/passed", "loss/train/total")}  # fmt: skip
    (workdir / f"rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
