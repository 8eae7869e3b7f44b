"""foundry_padfree: padding-free Llama training for Composer and LLM-Foundry."""

from transformers import AutoConfig, AutoModelForCausalLM

from foundry_padfree.config import PadFreeLlamaConfig
from foundry_padfree.modeling import PadFreeLlamaForCausalLM, PadFreeLlamaModel, training_flops
from foundry_padfree.varlen import IGNORE_INDEX, Unpadded, VarlenMeta, unpad

AutoConfig.register(PadFreeLlamaConfig.model_type, PadFreeLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(PadFreeLlamaConfig, PadFreeLlamaForCausalLM, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX",
    "PadFreeLlamaConfig",
    "PadFreeLlamaForCausalLM",
    "PadFreeLlamaModel",
    "Unpadded",
    "VarlenMeta",
    "training_flops",
    "unpad",
]
