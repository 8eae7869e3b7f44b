"""`scripts/modal_train.py` without Modal's servers: the app's definition, the launcher command,
and the function body run locally on the CPU YAML with one process."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

modal = pytest.importorskip("modal")

REPO = Path(__file__).resolve().parents[1]
# `train.local` warns that the Volume is not mounted locally: the test passes its own folder.
pytestmark = pytest.mark.filterwarnings("ignore:The train function is executing locally")


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


modal_train = _load("modal_train", REPO / "scripts" / "modal_train.py")


def test_app_and_function_definition(monkeypatch):
    # Record what the script passes to `App.function` (modal keeps the timeout only inside the
    # definition it sends to its servers), then import the script again.
    calls = []
    original = modal.App.function

    def recording(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modal.App, "function", recording)
    module = _load("modal_train_recorded", REPO / "scripts" / "modal_train.py")
    assert isinstance(module.app, modal.App) and module.app.name == "foundry-padfree"
    assert isinstance(module.train, modal.Function)
    assert len(calls) == 1, calls
    assert calls[0]["gpu"] == "H100:8"
    assert calls[0]["cpu"] == 32.0 and calls[0]["memory"] == 8 * 32 * 1024  # cores and memory for 8 ranks
    assert calls[0]["timeout"] == 24 * 3600
    assert calls[0]["volumes"] == {"/vol": module.volume}
    spec = module.train._spec_  # the definition as modal holds it (no public accessor in 1.x)
    assert spec.gpus == "H100:8" and list(spec.volumes) == ["/vol"]
    assert "'foundry-padfree'" in repr(spec.volumes["/vol"])  # Volume.from_name("foundry-padfree")
    assert repr(spec.image) == repr(module.image)  # the app's image (same last build step)


def test_a_run_name_in_the_overrides_is_refused():
    with pytest.raises(ValueError, match=r"pass --run-name instead"):
        modal_train.main.info.raw_f(yaml="yamls/padfree-llama-cpu.yaml", overrides="run_name=other max_duration=4ba")


class _Launches(list):
    """Stands in for `train.with_options(...)`: records each `remote` call's arguments."""

    def remote(self, *args):
        self.append(args)
        return 0


def test_main_asks_for_the_gpus_with_cores_and_memory_for_their_ranks(monkeypatch):
    launched, options = _Launches(), []
    monkeypatch.setattr(modal_train.train, "with_options", lambda **kw: options.append(kw) or launched)
    modal_train.main.info.raw_f(yaml="yamls/padfree-llama-cpu.yaml", gpus=2, gpu_type="H200",
                                overrides="max_duration=4ba", run_name="r1")  # fmt: skip
    assert options == [dict(gpu="H200:2", cpu=8.0, memory=2 * 32 * 1024)]
    assert launched == [("yamls/padfree-llama-cpu.yaml", 2, ["max_duration=4ba"], "r1")]


def test_each_launch_without_a_run_name_gets_a_new_one(monkeypatch):
    """A second launch must not meet the first one's checkpoints (the YAMLs refuse to overwrite)."""
    launched = _Launches()
    monkeypatch.setattr(modal_train.train, "with_options", lambda **kw: launched)
    clock = iter([1_764_000_000.0, 1_764_000_001.0])
    monkeypatch.setattr(modal_train.time, "time", lambda: next(clock))
    for _ in range(2):
        modal_train.main.info.raw_f(yaml="yamls/padfree-llama-cpu.yaml", overrides="max_duration=4ba")
    names = [args[3] for args in launched]
    assert [n.rsplit("-", 1)[0] for n in names] == [
        "padfree-llama-cpu-20251124-160000",
        "padfree-llama-cpu-20251124-160001",
    ]
    for name in names:
        modal_train.check_run_name(name)
    # Launches in the same second (a sweep) still get folders of their own.
    same = {modal_train.default_run_name("yamls/padfree-llama-cpu.yaml", now=1_764_000_000.0) for _ in range(5)}
    assert len(same) == 5


def test_image_installs_flash_attn_and_the_project():
    flash = [c for c in modal_train.INSTALL_COMMANDS if "flash-attn" in c]
    assert len(flash) == 1 and "--no-build-isolation" in flash[0], modal_train.INSTALL_COMMANDS
    assert modal_train.FLASH_ATTN.startswith("flash-attn==2.8")  # prebuilt wheels for torch 2.7
    assert any("llm-foundry==0.22.0" in c and "constraints" in c for c in modal_train.INSTALL_COMMANDS)
    assert {".venv", ".git", ".whl"} <= set(modal_train.IMAGE_IGNORE)


def test_launch_env_keeps_nvlink_multicast_off():
    env = modal_train.launch_env({"PATH": "/bin", "NCCL_NVLS_ENABLE": "1"})
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["PATH"] == "/bin" and env["PYTHONUNBUFFERED"] == "1"


def test_build_command():
    command = modal_train.build_command("yamls/padfree-llama-cpu.yaml", 8, ["max_duration=10ba"], "/vol/runs/x")
    assert command[:5] == [sys.executable, "-m", "composer.cli.launcher", "-n", "8"]
    assert command[5] == str(REPO / "scripts" / "train.py")
    assert command[6] == str(REPO / "yamls" / "padfree-llama-cpu.yaml")
    # Our save_folder first, so that a user override of it wins (OmegaConf applies them in order).
    ours = ["save_folder=/vol/runs/x/checkpoints", "variables.save_folder=/vol/runs/x"]
    assert command[7:] == [*ours, "max_duration=10ba"]


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (("yamls/padfree-llama-cpu.yaml", 0, [], "/r"), ValueError, "between 1 and 8"),
        (("yamls/padfree-llama-cpu.yaml", 9, [], "/r"), ValueError, "between 1 and 8"),
        (("yamls/padfree-llama-cpu.yaml", "2", [], "/r"), TypeError, "must be an int"),
        (("yamls/padfree-llama-cpu.yaml", True, [], "/r"), TypeError, "must be an int"),
        (("yamls/padfree-llama-cpu.yaml", 1, "max_duration=1ba", "/r"), TypeError, "list of KEY=VALUE"),
        (("yamls/padfree-llama-cpu.yaml", 1, ["max_duration"], "/r"), ValueError, "not KEY=VALUE"),
        (("yamls/padfree-llama-cpu.yaml", 1, ["=1ba"], "/r"), ValueError, "not KEY=VALUE"),
        (("yamls/padfree-llama-cpu.yaml", 1, [], ""), ValueError, "run_dir is empty"),
        (("yamls/missing.yaml", 1, [], "/r"), FileNotFoundError, "missing.yaml"),
    ],
)
def test_build_command_rejects_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        modal_train.build_command(*args)


def test_train_rejects_bad_run_name(tmp_path):
    with pytest.raises(ValueError, match="plain folder name"):
        modal_train.train.local("yamls/padfree-llama-cpu.yaml", 1, [], "a/b", volume_dir=str(tmp_path))


@pytest.mark.slow
def test_train_runs_locally_and_checkpoints_to_the_volume(tmp_path):
    """The function body, run here (`train.local`): one process on CPU, 2 batches, a checkpoint per
    batch under the temporary "volume"."""
    from foundry_padfree.demo import prepare

    check = _load("multigpu_check", REPO / "scripts" / "multigpu_check.py")
    prepare(tmp_path / "prep", max_documents=150)
    record = check.write_step_record(tmp_path / "step_record.py")
    yaml = check.train_yaml(tmp_path / "train.yaml", tmp_path / "prep", batches=2, global_batch=4, microbatch=2,
                            record_module=record, stats=False)  # fmt: skip
    volume = tmp_path / "volume"
    old = {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")}
    code = modal_train.train.local(str(yaml), 1, ["save_interval=1ba", "save_num_checkpoints_to_keep=-1"], "cpu-run",
                                   volume_dir=str(volume))  # fmt: skip
    assert code == 0
    checkpoints = volume / "runs" / "cpu-run" / "checkpoints"
    saved = sorted(p.name for p in checkpoints.glob("*.pt") if not p.is_symlink())  # not latest-rank0.pt
    assert saved == ["ep0-ba1-rank0.pt", "ep0-ba2-rank0.pt"]
    records = check.read_records(tmp_path / "prep" / "records")
    assert [s["step"] for s in records[0]] == [1, 2]
    # The launched environment had the variables; ours is untouched.
    assert {k: os.environ.get(k) for k in old} == old
