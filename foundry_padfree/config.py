"""Configuration of the padding-free Llama model.

`PadFreeLlamaConfig` is a `LlamaConfig` with the few fields the padding-free path adds. Every
architecture field keeps its HF name and meaning, so a stock Llama `config.json` loads into it
unchanged, and `to_llama_config()` gives back the stock config that `save_pretrained` writes.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig

ATTN_BACKENDS = ("auto", "triton", "flash_attn", "torch_varlen", "flex", "sdpa")


def is_positive_int(value: Any) -> bool:
    """Whether `value` is an int >= 1 and not a bool (YAML's `true` would otherwise count as 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_flag(value: Any, name: str, option: str) -> bool:
    """`value` if it is a bool, else a ValueError naming `name: option` (a quoted "false" is a str,
    which would read as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: {option}={value!r} must be true or false (unquoted in YAML).")
    return value


# Fields that exist only on our config; they are dropped when exporting a stock Llama config.
PADFREE_FIELDS = ("attn_backend", "loss_chunk_size", "fused_kernels", "recompute_mlp")


class PadFreeLlamaConfig(LlamaConfig):
    """A `LlamaConfig` plus the options of the padding-free path.

    Args:
        attn_backend: which varlen attention kernel every layer calls. `auto` picks, once, the best
            one available: `triton` (our kernels, `foundry_padfree.triton_attention`; CUDA with
            Triton, which torch's CUDA wheels ship), `flash_attn` (flash-attn installed, CUDA),
            `torch_varlen` (torch >= 2.10, CUDA), `flex` (CUDA), else `sdpa`, the per-document
            pure-PyTorch reference that also runs on CPU.
        loss_chunk_size: tokens per chunk of the fused head + cross-entropy. The loss never holds
            more than `loss_chunk_size x vocab_size` logits at once, so peak memory does not grow
            with the vocabulary times the token count (128k vocab x 32k tokens is 16 GiB in fp32).
        fused_kernels: run RMSNorm, RoPE, the SiLU-gated product and the loss's softmax gradient as
            fused Triton kernels (`foundry_padfree.kernels`) when the model runs eagerly on CUDA.
            Off, or on CPU, or inside `torch.compile` (which fuses them itself), the same formulas
            run as PyTorch ops. Results agree to within one unit of the output dtype. Run eagerly
            (CPU included) without autocast, or under autocast in the weights' dtype, it also
            folds each block's residual adds into the products and norms next to them and sums
            the gradient of the q/k/v (and gate/up) input inside their backward products, instead
            of in passes of their own. With tied 16-bit embeddings on CUDA, the embedding's backward
            writes the shared weight's whole gradient (the head's plus its own) in one pass.
        recompute_mlp: keep each MLP's gate and up projections but not `silu(gate) * up` for the
            backward, which recomputes it: one `[T, intermediate_size]` tensor less per layer
            (2 GiB for 8k tokens of Llama-3.2-1B); with the fused kernels the recomputation comes
            out of the backward's own pass over gate and up, for one extra write.
        **kwargs: every `LlamaConfig` field, with its HF meaning.
    """

    model_type = "padfree_llama"
    # Output keys HF `Trainer`'s evaluation leaves out of the predictions (the logits).
    keys_to_ignore_at_inference = ["past_key_values", "num_loss_tokens"]

    def __init__(
        self,
        attn_backend: str = "auto",
        loss_chunk_size: int = 4096,
        fused_kernels: bool = True,
        recompute_mlp: bool = True,
        **kwargs: Any,
    ):
        self.attn_backend = attn_backend
        self.loss_chunk_size = loss_chunk_size
        self.fused_kernels = fused_kernels
        self.recompute_mlp = recompute_mlp
        super().__init__(**kwargs)
        self.validate_padfree()

    def validate_padfree(self) -> None:
        """Raise `ValueError` naming the field, its value and the fix for an invalid setting."""
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(
                f"attn_backend={self.attn_backend!r} is not a known backend; use one of {', '.join(ATTN_BACKENDS)}."
            )
        for name in ("loss_chunk_size", "num_attention_heads", "num_key_value_heads"):
            value = getattr(self, name)
            if not is_positive_int(value):
                raise ValueError(f"{name}={value!r} must be a positive int.")
        for name in ("fused_kernels", "recompute_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false.")
        if self.attention_dropout != 0:
            # None of the varlen kernels applies dropout to attention weights; training would
            # silently run without it.
            raise ValueError(
                f"attention_dropout={self.attention_dropout!r} is not supported by the padding-free model; "
                "set attention_dropout=0.0 (e.g. in config_overrides)."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})."
            )

    @classmethod
    def get_config_dict(cls, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        # A stock Llama checkpoint is ours to load: read its `model_type: llama` as our own.
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") == "llama":
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    @classmethod
    def from_llama_config(cls, config: LlamaConfig, **padfree: Any) -> PadFreeLlamaConfig:
        """Our config with every field of a stock `LlamaConfig` and the given padding-free options."""
        fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
        fields.update(padfree)
        return cls(**fields)

    def to_llama_config(self) -> LlamaConfig:
        """The stock `LlamaConfig` this model is a drop-in for (what `save_pretrained` writes)."""
        fields = {k: v for k, v in self.to_dict().items() if k not in (*PADFREE_FIELDS, "model_type")}
        fields["architectures"] = ["LlamaForCausalLM"]
        return LlamaConfig(**fields)
