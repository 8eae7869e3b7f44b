"""Train with foundry_padfree on Modal: N GPUs of one type, the composer launcher, a Volume for data
and checkpoints.

    modal run scripts/modal_train.py --yaml yamls/sft_llama3_1b.yaml --gpus 8 --overrides \\
        "variables.model_dir=/vol/models/llama3.2-1b variables.tokenizer_dir=/vol/models/llama3.2-1b \\
         variables.data_files=/vol/data/sft/train.jsonl"
    modal run scripts/modal_train.py --yaml yamls/pretrain_smollm2_135m.yaml --gpus 2 --gpu-type H100 \\
        --overrides "max_duration=100ba variables.data_local=/vol/data/my-mds"

The image installs this project with its pinned dependencies (constraints.txt: torch 2.7.0 with
CUDA 12.6) and flash-attn (the `gpu` extra; the image build has internet, so flash-attn's setup
fetches its prebuilt wheel for this torch, CUDA 12 and Python). The Volume `foundry-padfree` is
mounted at /vol: put datasets under /vol/data (`modal volume put`), and checkpoints land in
/vol/runs/<run_name>/checkpoints (the project YAMLs' HF export in /vol/runs/<run_name>/hf). Set
`--secret NAME` to pass a Modal Secret (e.g. with WANDB_API_KEY or MLFLOW_TRACKING_URI) to the
loggers. Each GPU comes with 4 cores and 32 GiB of host memory for its rank. Name the run with
`--run-name` (a `run_name=` override is refused: the run and its folder would differ); without one,
each launch gets a new name, `<yaml stem>-<UTC time>-<random>`, as Composer names unnamed runs afresh, so a
second launch does not meet the first one's checkpoints (the YAMLs set `save_overwrite: false`).

Every launched process gets `NCCL_NVLS_ENABLE=0` and `TORCH_SYMM_MEM_DISABLE_MULTICAST=1`:
NVLink multicast (NVLS) stays off. Modal's GPUs are shared hosts, where multicast objects may be
unavailable or leak between jobs; it only speeds up all-reduce on NVSwitch, and NCCL falls back to
its ring/tree algorithms, so nothing else changes.

The function body runs the same way locally (`train.local(...)`), which is how it is tested.
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

import modal

APP_NAME = "foundry-padfree"
VOLUME_NAME = "foundry-padfree"
VOLUME_DIR = "/vol"
REMOTE_PROJECT = "/root/foundry_padfree"
LOCAL_PROJECT = Path(__file__).resolve().parents[1]
DEFAULT_GPU_TYPE = "H100"
DEFAULT_GPUS = 8
MAX_GPUS = 8  # GPUs in one Modal container
# A flash-attn release with prebuilt wheels for torch 2.7 (llm-foundry 0.22's pin). 2.7.4.post1
# predates torch 2.7: its setup finds no wheel and compiles from source (hours) on the image build.
FLASH_ATTN = "flash-attn==2.8.3"
TIMEOUT_S = 24 * 3600  # Modal's longest function timeout
# Reserved per GPU: each rank's trainer and its data-loader workers (the YAMLs' num_workers) need
# cores and host memory; Modal's default reservation is a fraction of one core and 128 MiB.
CPU_PER_GPU = 4.0
MEMORY_MIB_PER_GPU = 32 * 1024
# Set in every launched process's environment (see the module docstring).
DIST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
INSTALL_COMMANDS = (
    "uv pip install --system -c /tmp/constraints.txt llm-foundry==0.22.0",
    # flash-attn's setup.py imports torch and these at build time (no build isolation).
    "uv pip install --system -c /tmp/constraints.txt setuptools wheel packaging psutil ninja einops",
    f"uv pip install --system --no-build-isolation {FLASH_ATTN}",
)
# Local files that must not go into the image (virtualenv, wheels, caches, run outputs).
IMAGE_IGNORE = [".venv", ".git", ".whl", ".data", "runs", "logs", "build", "dist", "**/__pycache__", ".hypothesis",
                ".pytest_cache", ".ruff_cache", "*.egg-info"]  # fmt: skip

image = (
    modal.Image.from_registry("nvidia/cuda:12.6.3-devel-ubuntu22.04", add_python="3.11")
    .apt_install("git")
    .pip_install("uv")
    .add_local_file(LOCAL_PROJECT / "constraints.txt", "/tmp/constraints.txt", copy=True)
    .run_commands(*INSTALL_COMMANDS)
    .add_local_dir(LOCAL_PROJECT, REMOTE_PROJECT, copy=True, ignore=IMAGE_IGNORE)
    .run_commands(f"uv pip install --system --no-deps -e {REMOTE_PROJECT}")
)
volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
app = modal.App(APP_NAME, image=image)


def project_root() -> Path:
    """The project inside the container, or this checkout when run locally."""
    return Path(REMOTE_PROJECT) if Path(REMOTE_PROJECT).exists() else LOCAL_PROJECT


def build_command(yaml: str, gpus: int, overrides: list[str], run_dir: str) -> list[str]:
    """The composer launcher command: one process per GPU, LLM-Foundry's train through our wrapper.

    Args:
        yaml: the training YAML, absolute or relative to the project root.
        gpus: processes to launch (one per GPU), 1 to `MAX_GPUS`.
        overrides: OmegaConf dotlist items `KEY=VALUE`, applied after ours (so they win).
        run_dir: the run's folder; checkpoints go to `<run_dir>/checkpoints`.

    Raises:
        TypeError: `gpus` not an int, or `overrides` a single string instead of a list.
        ValueError: `gpus` out of range, an override that is not `KEY=VALUE`, an empty `run_dir`.
        FileNotFoundError: the YAML does not exist.
    """
    if not isinstance(gpus, int) or isinstance(gpus, bool):
        raise TypeError(f"gpus={gpus!r} must be an int (the number of GPUs, one process each).")
    if not 1 <= gpus <= MAX_GPUS:
        raise ValueError(f"gpus={gpus} must be between 1 and {MAX_GPUS} (GPUs of one Modal container).")
    if isinstance(overrides, str) or not all(isinstance(item, str) for item in overrides):
        raise TypeError(
            f"overrides={overrides!r} must be a list of KEY=VALUE strings; split a command-line string "
            "with shlex.split first."
        )
    for item in overrides:
        key, eq, _ = item.partition("=")
        if not eq or not key or key != key.strip() or " " in key:
            raise ValueError(f"override {item!r} is not KEY=VALUE (e.g. max_duration=10ba).")
    if not run_dir:
        raise ValueError("run_dir is empty; it is the folder the checkpoints go to.")
    root = project_root()
    yaml_path = Path(yaml) if Path(yaml).is_absolute() else root / yaml
    if not yaml_path.is_file():
        raise FileNotFoundError(f"YAML {yaml!r} not found (looked at {yaml_path}); paths are relative to the project.")
    # Checkpoints to the Volume; `variables.save_folder` also moves the HF export of the project's
    # YAMLs there (`hf_checkpointer.save_folder: ${variables.save_folder}/hf`).
    run_overrides = [f"save_folder={run_dir}/checkpoints", f"variables.save_folder={run_dir}"]
    return [
        sys.executable, "-m", "composer.cli.launcher", "-n", str(gpus),
        str(root / "scripts" / "train.py"), str(yaml_path), *run_overrides, *overrides,
    ]  # fmt: skip


def launch_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The launched processes' environment: `base` (default: ours) with `DIST_ENV` and unbuffered output."""
    return {**(os.environ if base is None else base), "PYTHONUNBUFFERED": "1", **DIST_ENV}


def resources(gpu_type: str, gpus: int) -> dict:
    """`App.function` options for `gpus` GPUs of `gpu_type`: the GPUs, and cores and memory for their ranks."""
    return dict(gpu=f"{gpu_type}:{gpus}", cpu=CPU_PER_GPU * gpus, memory=MEMORY_MIB_PER_GPU * gpus)


def default_run_name(yaml: str, now: float | None = None) -> str:
    """A new run name for each launch: the YAML's stem, the UTC time to the second and a random
    suffix (launches of one sweep may start in the same second)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{Path(yaml).stem}-{stamp}-{secrets.token_hex(3)}"


def check_run_name(run_name: str, overrides: list[str] = ()) -> None:
    """Raises ValueError unless `run_name` is a plain folder name (it names the run's folder) and the
    overrides do not name the run again (the run would take that name, its folder this one)."""
    if not run_name or "/" in run_name or run_name.startswith("."):
        raise ValueError(f"run_name={run_name!r} must be a plain folder name (no '/', not starting with '.').")
    named = [item for item in overrides if item.partition("=")[0].strip() == "run_name"]
    if named:
        raise ValueError(f"overrides name the run ({named}); "
                         "pass --run-name instead: it names the run and its folder on the Volume.")  # fmt: skip


@app.function(**resources(DEFAULT_GPU_TYPE, DEFAULT_GPUS), volumes={VOLUME_DIR: volume}, timeout=TIMEOUT_S)
def train(yaml: str, gpus: int, overrides: list[str], run_name: str, volume_dir: str = VOLUME_DIR) -> int:
    """Launch `composer -n gpus` on the YAML; return its exit code. Checkpoints go to the Volume,
    under `<volume_dir>/runs/<run_name>/checkpoints`."""
    check_run_name(run_name, overrides)
    run_dir = f"{volume_dir}/runs/{run_name}"
    command = build_command(yaml, gpus, [f"run_name={run_name}", *overrides], run_dir)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    print("+", shlex.join(command), flush=True)
    code = subprocess.run(command, cwd=project_root(), env=launch_env(), check=False).returncode
    if not modal.is_local():
        volume.commit()  # make the checkpoints visible to other containers and `modal volume get`
    return code


@app.local_entrypoint()
def main(
    yaml: str,
    gpus: int = DEFAULT_GPUS,
    gpu_type: str = DEFAULT_GPU_TYPE,
    overrides: str = "",
    run_name: str = "",
    secret: str = "",
) -> None:
    """`modal run scripts/modal_train.py --yaml ... [--gpus N --gpu-type T --overrides "k=v ..." --run-name R]`."""
    override_list = shlex.split(overrides)
    if not run_name:
        run_name = default_run_name(yaml)
        print(f"run_name={run_name} (its folder: {VOLUME_DIR}/runs/{run_name}); pass --run-name to choose it.")
    check_run_name(run_name, override_list)
    build_command(yaml, gpus, override_list, f"{VOLUME_DIR}/runs/{run_name}")  # fail here, before the GPUs start
    options = resources(gpu_type, gpus)
    if secret:
        options["secrets"] = [modal.Secret.from_name(secret)]
    code = train.with_options(**options).remote(yaml, gpus, override_list, run_name)
    if code != 0:
        raise SystemExit(f"training exited with code {code}")
