"""Train with foundry_padfree on Modal: N GPUs of one type, the composer launcher, a Volume for data
and checkpoints.

    modal run scripts/modal_train.py --yaml yamls/sft_llama3_1b.yaml --gpus 8
    modal run scripts/modal_train.py --yaml yamls/pretrain_smollm2_135m.yaml --gpus 2 --gpu-type H100 \\
        --overrides "max_duration=100ba variables.data_local=/vol/data/my-mds"

The image installs this project with its pinned dependencies (constraints.txt) and flash-attn
(the `gpu` extra; the image build has internet, so flash-attn's prebuilt wheel is fetched). The
Volume `foundry-padfree` is mounted at /vol: put datasets under /vol/data (`modal volume put`), and
checkpoints land in /vol/runs/<run_name>. Set `--secret NAME` to pass a Modal Secret (e.g. with
WANDB_API_KEY or MLFLOW_TRACKING_URI) to the loggers.

The function body runs the same way locally (`train.local(...)`), which is how it is tested.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import modal

APP_NAME = "foundry-padfree"
VOLUME_NAME = "foundry-padfree"
VOLUME_DIR = "/vol"
REMOTE_PROJECT = "/root/foundry_padfree"
LOCAL_PROJECT = Path(__file__).resolve().parents[1]
DEFAULT_GPU_TYPE = "H100"
DEFAULT_GPUS = 8
FLASH_ATTN = "flash-attn==2.7.4.post1"  # built for torch 2.7 (llm-foundry 0.22's pin)
TIMEOUT_S = 24 * 3600

image = (
    modal.Image.from_registry("nvidia/cuda:12.6.3-devel-ubuntu22.04", add_python="3.11")
    .apt_install("git")
    .pip_install("uv")
    .add_local_file(LOCAL_PROJECT / "constraints.txt", "/tmp/constraints.txt", copy=True)
    .run_commands(
        "uv pip install --system -c /tmp/constraints.txt llm-foundry==0.22.0",
        f"uv pip install --system --no-build-isolation {FLASH_ATTN}",
    )
    .add_local_dir(
        LOCAL_PROJECT,
        REMOTE_PROJECT,
        copy=True,
        ignore=[".venv", ".git", ".whl", ".data", "runs", "**/__pycache__"],
    )
    .run_commands(f"uv pip install --system --no-deps -e {REMOTE_PROJECT}")
)
volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)
app = modal.App(APP_NAME, image=image)


def project_root() -> Path:
    """The project inside the container, or this checkout when run locally."""
    return Path(REMOTE_PROJECT) if Path(REMOTE_PROJECT).exists() else LOCAL_PROJECT


def build_command(yaml: str, gpus: int, overrides: list[str], run_dir: str) -> list[str]:
    """The composer launcher command: one process per GPU, LLM-Foundry's train through our wrapper."""
    if gpus < 1:
        raise ValueError(f"gpus={gpus} must be at least 1.")
    root = project_root()
    yaml_path = Path(yaml) if Path(yaml).is_absolute() else root / yaml
    if not yaml_path.is_file():
        raise FileNotFoundError(f"YAML {yaml!r} not found (looked at {yaml_path}); paths are relative to the project.")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not KEY=VALUE (e.g. max_duration=10ba).")
    run_overrides = [f"save_folder={run_dir}/checkpoints"]
    return [
        sys.executable, "-m", "composer.cli.launcher", "-n", str(gpus),
        str(root / "scripts" / "train.py"), str(yaml_path), *run_overrides, *overrides,
    ]  # fmt: skip


@app.function(gpu=f"{DEFAULT_GPU_TYPE}:{DEFAULT_GPUS}", volumes={VOLUME_DIR: volume}, timeout=TIMEOUT_S)
def train(yaml: str, gpus: int, overrides: list[str], run_name: str, volume_dir: str = VOLUME_DIR) -> int:
    """Launch `composer -n gpus` on the YAML; return its exit code. Checkpoints go to the Volume."""
    run_dir = f"{volume_dir}/runs/{run_name}"
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    command = build_command(yaml, gpus, [f"run_name={run_name}", *overrides], run_dir)
    print("+", shlex.join(command), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    code = subprocess.run(command, cwd=project_root(), env=env, check=False).returncode
    if not modal.is_local():
        volume.commit()  # make the checkpoints visible to other containers and `modal volume get`
    return code


@app.local_entrypoint()
def main(
    yaml: str,
    gpus: int = DEFAULT_GPUS,
    gpu_type: str = DEFAULT_GPU_TYPE,
    overrides: str = "",
    run_name: str = "padfree-modal",
    secret: str = "",
) -> None:
    options: dict = {"gpu": f"{gpu_type}:{gpus}"}
    if secret:
        options["secrets"] = [modal.Secret.from_name(secret)]
    code = train.with_options(**options).remote(yaml, gpus, shlex.split(overrides), run_name)
    if code != 0:
        raise SystemExit(f"training exited with code {code}")
