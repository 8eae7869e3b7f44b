"""foundry_padfree: padding-free Llama training for Composer and LLM-Foundry."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="foundry_padfree",
    version="0.1.0",
    description="Padding-free (varlen) Llama training for MosaicML Composer and LLM-Foundry",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["foundry_padfree", "foundry_padfree.*"]),
    install_requires=[
        # llm-foundry 0.22 pins torch 2.7.0, transformers 4.51 and composer 0.32.
        "llm-foundry>=0.22.0,<0.23",
        "mosaicml>=0.32.1,<0.33",
        "torch>=2.7.0",
        "transformers>=4.51,<4.52",
        "omegaconf>=2.3",
        "numpy",
        # Trains the offline demo's tokenizer; already required by transformers.
        "tokenizers>=0.21",
    ],
    extras_require={
        # flash-attn builds against the installed torch: `pip install --no-build-isolation .[gpu]`.
        # 2.8 is the first release with prebuilt wheels for torch 2.7 (older ones compile for hours).
        "gpu": ["flash-attn>=2.8"],
        "dev": ["pytest>=8", "ruff>=0.6", "hypothesis>=6", "modal>=1.0"],
        "modal": ["modal>=1.0"],
    },
    entry_points={
        # LLM-Foundry looks these up by name from YAML (`name: padfree_causal_lm`, ...). New names
        # only: an entry point named like a built-in would replace it for the whole environment.
        "llmfoundry_models": [
            "padfree_causal_lm = foundry_padfree.composer_model:ComposerPadFreeCausalLM",
        ],
        "llmfoundry_dataloaders": [
            "padfree_text = foundry_padfree.data.text:build_padfree_text_dataloader",
            "padfree_finetuning = foundry_padfree.data.finetuning:build_padfree_finetuning_dataloader",
        ],
        "llmfoundry_callbacks": [
            "padfree_audit = foundry_padfree.callbacks:PadFreeAudit",
            "padfree_isolation = foundry_padfree.callbacks:PadFreeIsolation",
            "padfree_parity = foundry_padfree.callbacks:PadFreeParity",
            "padfree_stats = foundry_padfree.callbacks:PadFreeStats",
        ],
    },
)
