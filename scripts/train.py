"""Train from an LLM-Foundry YAML: `python scripts/train.py <yaml> [key=value ...]`.

A thin wrapper around `llmfoundry.command_utils.train_from_yaml`, the function LLM-Foundry's own
`scripts/train/train.py` calls, so it runs the same YAMLs, also under the composer launcher:

    composer -n 2 scripts/train.py yamls/padfree-llama-cpu.yaml max_duration=20ba

Our components (`padfree_causal_lm`, `padfree_text`, `padfree_finetuning`, `padfree_*` callbacks)
are found through the package's entry points; nothing is registered here.
"""

from __future__ import annotations

import sys

from llmfoundry.command_utils import train_from_yaml


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    yaml_path, overrides = argv[0], argv[1:]
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise SystemExit(f"overrides must be key=value (e.g. max_duration=10ba); got {bad}.")
    train_from_yaml(yaml_path, overrides)


if __name__ == "__main__":
    main(sys.argv[1:])
