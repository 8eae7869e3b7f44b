"""foundry_padfree: padding-free Llama training for Composer and LLM-Foundry."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from foundry_padfree.config import PadFreeLlamaConfig
from foundry_padfree.modeling import PadFreeLlamaForCausalLM, PadFreeLlamaModel, training_flops
from foundry_padfree.varlen import IGNORE_INDEX, Unpadded, VarlenMeta, unpad

AutoConfig.register(PadFreeLlamaConfig.model_type, PadFreeLlamaConfig, exist_ok=True)
AutoModel.register(PadFreeLlamaConfig, PadFreeLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(PadFreeLlamaConfig, PadFreeLlamaForCausalLM, exist_ok=True)
# HF `Trainer` tells causal LMs by this table's class names (`compute_loss` shifts the labels of
# its label smoother only for them); `register` above does not add to it.
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(PadFreeLlamaConfig.model_type, PadFreeLlamaForCausalLM.__name__)

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
