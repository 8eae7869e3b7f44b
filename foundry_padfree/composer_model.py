"""`padfree_causal_lm`: the padding-free Llama as an LLM-Foundry / Composer model.

Shape legend: B batch rows, S row length, V vocabulary.

Registered in LLM-Foundry's `models` registry through the `llmfoundry_models` entry point, so a
YAML selects it with `model: {name: padfree_causal_lm, ...}`. It is LLM-Foundry's
`ComposerHFCausalLM` (same loading, FSDP preparation, metrics and HF checkpointing) with our model
class, our config and a forward that hands `sequence_id`/`position_ids` to the model.

YAML keys under `model:` (every other key fails fast, naming the closest valid one; `hf_causal_lm`
options this model does not implement, such as `peft_config` or `load_in_8bit`, fail with what to do
instead unless they ask for nothing: `peft_config: null`, `load_in_8bit: false`):

- `pretrained_model_name_or_path`: a local directory with a Llama `config.json` (stock
  `model_type: llama` or our `padfree_llama`) and, for `pretrained: true`, its weights.
- `pretrained` (default true): load the weights; false builds fresh ones from the config.
- `init_device` (default cpu): `cpu`, `meta` (FSDP materializes and initializes each layer) or
  `mixed` (rank 0 loads on CPU, other ranks on meta).
- `config_overrides`: fields of the Llama config to override (`num_hidden_layers: 2`,
  `loss_chunk_size: 8192`, ...); an unknown field is an error.
- `attn_backend` (default auto): the varlen attention kernel, one of `auto`, `triton`,
  `flash_attn`, `torch_varlen`, `flex`, `sdpa`. Checked at build time against what this machine can run.
- `compile_layers` (default false): `true` (inductor) or a `torch.compile` backend name runs
  `PadFreeLlamaForCausalLM.compile_layers`: the decoder layers compiled, dynamic in the token
  count (with the `triton` kernels all layers and their attention in one graph), and the loss's
  softmax gradient. Layers in FSDP's or activation checkpointing's wrappers compile one by one.
  Not together with the trainer's `compile_config`, which compiles the whole model, host-side
  unpadding included: the first forward then raises, naming both.
- `loss_on_real_tokens_only` (default true): training forwards run the output head only on the
  real tokens that have a target (the chunked head + cross-entropy) and never build `[B,S,V]`
  logits unless a train metric needs them. False also re-pads `[B,S,V]` logits on every training
  forward, for callbacks that read `state.outputs['logits']` (costs `B*S*V` activations).
- `use_train_metrics` (default false): LLM-Foundry's train metrics (cross-entropy, perplexity,
  token accuracy) on every microbatch. They need `[B,S,V]` logits, so they cost the padded head
  this model otherwise avoids; the training loss is logged either way.
- `additional_train_metrics`, `additional_eval_metrics`: extra metric names from LLM-Foundry's
  `metrics` registry (train metrics need `use_train_metrics: true`, or the build fails).
- `allow_embedding_resizing` (default false): grow the embeddings to the tokenizer's size.
- `trust_remote_code` (default false), `use_auth_token` (default false): passed to HF loading.

Evaluation goes through LLM-Foundry's evaluators unchanged: eval forwards return `[B,S,V]` logits,
and labels are shifted within documents, as the training loss is.
"""

from __future__ import annotations

import difflib
import inspect
import json
from collections.abc import Mapping
from typing import Any

import torch
from composer.utils import get_device
from llmfoundry.models.consts import _MASTER_WEIGHTS_PRECISION
from llmfoundry.models.hf.hf_causal_lm import ComposerHFCausalLM
from llmfoundry.utils.config_utils import set_config_overrides
from torch import Tensor, nn
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from foundry_padfree.attention import resolve_backend
from foundry_padfree.config import ATTN_BACKENDS, PadFreeLlamaConfig, check_flag
from foundry_padfree.loss import linear_dtype
from foundry_padfree.modeling import PadFreeCausalLMOutput, PadFreeLlamaForCausalLM, training_flops
from foundry_padfree.varlen import IGNORE_INDEX, unpad

# Batch keys the model reads; everything else (total_tokens, loss_generating_tokens, ...) stays out.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "sequence_id", "labels")
INIT_DEVICES = ("cpu", "meta", "mixed")

# Options of `hf_causal_lm` this model does not take, with what to use instead.
_NOT_SUPPORTED = {
    "attn_implementation": "the padding-free model picks its kernel with `attn_backend`",
    "use_flash_attention_2": "use `attn_backend: flash_attn`",
    "peft_config": "LoRA/PEFT is not supported by padfree_causal_lm",
    "pretrained_lora_id_or_path": "LoRA/PEFT is not supported by padfree_causal_lm",
    "should_save_peft_only": "LoRA/PEFT is not supported by padfree_causal_lm",
    "load_in_8bit": "8-bit loading is not supported by padfree_causal_lm",
}


def _refuse_whole_model_compile(module: nn.Module, args: Any) -> None:
    """Before a forward, outside any compiled code: the trainer's `compile_config` replaces the
    model's `forward` with a `torch.compile`d one, which would trace through the compiled layers."""
    if hasattr(vars(module).get("forward"), "_torchdynamo_orig_callable"):
        raise ValueError(
            "model.compile_layers and the trainer's compile_config both compile this model: compile_config "
            "compiles the whole forward, host-side unpadding included, around the layers compile_layers "
            "compiles. Use one of them: remove compile_config (compile_layers is the padding-free model's way)."
        )


def _compile_backend(compile_layers: bool | str) -> str | None:
    """The `torch.compile` backend `compile_layers` names (true: inductor), or None."""
    if compile_layers is False or compile_layers is None:
        return None
    if compile_layers is True:
        return "inductor"
    known = torch._dynamo.list_backends(exclude_tags=())
    if not isinstance(compile_layers, str) or compile_layers not in known:
        raise ValueError(
            f"compile_layers={compile_layers!r}: use true (inductor), false, or the name of a torch.compile "
            "backend, such as inductor or aot_eager."
        )
    return compile_layers


class ComposerPadFreeCausalLM(ComposerHFCausalLM):
    """`ComposerHFCausalLM` around `PadFreeLlamaForCausalLM`; the YAML keys are in the module docstring.

    Raises:
        ValueError: for an unknown or unsupported option, an unknown `init_device`, an attention
            backend that does not exist or cannot run here, or a non-Llama config.
    """

    model_cls = PadFreeLlamaForCausalLM

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        pretrained_model_name_or_path: str,
        pretrained: bool = True,
        init_device: str = "cpu",
        config_overrides: dict[str, Any] | None = None,
        attn_backend: str = "auto",
        compile_layers: bool | str = False,
        loss_on_real_tokens_only: bool = True,
        use_train_metrics: bool = False,
        additional_train_metrics: list[str] | None = None,
        additional_eval_metrics: list[str] | None = None,
        allow_embedding_resizing: bool = False,
        trust_remote_code: bool = False,
        use_auth_token: bool = False,
        **unknown: Any,
    ):
        _reject_unknown_options(unknown)
        flags = dict(
            loss_on_real_tokens_only=loss_on_real_tokens_only,
            use_train_metrics=use_train_metrics,
            allow_embedding_resizing=allow_embedding_resizing,
            trust_remote_code=trust_remote_code,
        )
        for option, value in flags.items():
            check_flag(value, "padfree_causal_lm", option)
        if init_device not in INIT_DEVICES:
            raise ValueError(f"init_device={init_device!r} is not supported; use one of {', '.join(INIT_DEVICES)}.")
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(
                f"attn_backend={attn_backend!r} is not a known backend; use one of {', '.join(ATTN_BACKENDS)}."
            )
        if additional_train_metrics and not use_train_metrics:
            raise ValueError(
                f"additional_train_metrics={list(additional_train_metrics)} are computed only with "
                "use_train_metrics: true, which is false by default here (unlike hf_causal_lm: train metrics "
                "need the [B,S,V] logits the model otherwise never builds); set use_train_metrics: true."
            )
        compile_backend = _compile_backend(compile_layers)
        config_overrides = dict(config_overrides or {})
        if "attn_backend" in config_overrides and config_overrides["attn_backend"] != attn_backend:
            raise ValueError(
                f"attn_backend is set twice: model.attn_backend={attn_backend!r} and "
                f"config_overrides.attn_backend={config_overrides['attn_backend']!r}; set model.attn_backend only."
            )
        config_overrides["attn_backend"] = attn_backend
        # Fail at build time, not at the first forward, when the kernel cannot run where we train.
        resolve_backend(attn_backend, _training_device())

        self.loss_on_real_tokens_only = loss_on_real_tokens_only
        super().__init__(
            tokenizer=tokenizer,
            pretrained_model_name_or_path=pretrained_model_name_or_path,
            pretrained=pretrained,
            trust_remote_code=trust_remote_code,
            use_auth_token=use_auth_token,
            init_device=init_device,
            config_overrides=config_overrides,
            use_train_metrics=use_train_metrics,
            allow_embedding_resizing=allow_embedding_resizing,
            additional_train_metrics=additional_train_metrics,
            additional_eval_metrics=additional_eval_metrics,
        )
        # Counted once here: after FSDP wrapping each rank sees only its shard.
        self.num_flop_params = _flop_params(self.model)
        if compile_backend is not None:
            self.model.compile_layers(compile_backend)
            self.register_forward_pre_hook(_refuse_whole_model_compile)

    @classmethod
    def build_config(
        cls,
        pretrained_model_name_or_path: str,
        trust_remote_code: bool,
        use_auth_token: bool,
        attn_implementation: str,
        config_overrides: dict[str, Any],
    ) -> PretrainedConfig:
        """A `PadFreeLlamaConfig` from a stock Llama (or our) config directory, then the overrides."""
        config = AutoConfig.from_pretrained(
            pretrained_model_name_or_path,
            trust_remote_code=trust_remote_code,
            token=use_auth_token or None,
            attn_implementation=attn_implementation,
            torch_dtype=_MASTER_WEIGHTS_PRECISION,
            use_cache=False,  # no KV cache: the model recomputes the prefix
        )
        if not isinstance(config, LlamaConfig):
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {config.model_type!r} config; padfree_causal_lm "
                "trains Llama-architecture models (model_type 'llama' or 'padfree_llama')."
            )
        if not isinstance(config, PadFreeLlamaConfig):
            config = PadFreeLlamaConfig.from_llama_config(config)
        set_config_overrides(config, config_overrides)  # checked when the model is built on this config
        return config

    def forward(self, batch: Mapping[str, Any]) -> Any:
        """Run the model on a `[B,S]` batch; `sequence_id` and `position_ids` reach it as they are."""
        if not isinstance(batch, Mapping):
            raise TypeError(f"padfree_causal_lm takes a dict batch, got {type(batch).__name__}.")
        inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
        return_logits = None  # the model's default: logits unless training with labels
        if self.training:
            return_logits = bool(self.train_metrics) or not self.loss_on_real_tokens_only
        if padding_only(batch):
            want_logits = return_logits if return_logits is not None else not (self.training and "labels" in batch)
            return self._forward_padding_only(batch, want_logits)
        return self.model(**inputs, return_logits=return_logits)

    def _forward_padding_only(self, batch: Mapping[str, Any], want_logits: bool) -> PadFreeCausalLMOutput:
        """A (micro)batch whose rows are all padding: rows of empty text samples, which LLM-Foundry's
        text loader makes too. There is nothing to learn from it, but every rank must run every
        layer (FSDP gathers each layer's weights on all ranks), so the model runs on one token
        without a target: a loss of 0 that reaches every parameter with a zero gradient, and
        logits of 0, as the model gives at padding."""
        ids = batch["input_ids"][:1, :1]
        out = self.model(input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX), return_logits=False)
        logits = None
        if want_logits:
            # The vocabulary size from the config: after FSDP's forward the head's weight can be this
            # rank's flat shard (`use_orig_params`), whose shape says nothing about it.
            B, S = batch["input_ids"].shape
            device = batch["input_ids"].device
            dtype = linear_dtype(device.type, self.model.get_output_embeddings().weight.dtype)
            logits = torch.zeros(B, S, self.model.config.vocab_size, dtype=dtype, device=device)
        return PadFreeCausalLMOutput(loss=out.loss, logits=logits, num_loss_tokens=out.num_loss_tokens)

    def loss(self, outputs: Any, batch: Mapping[str, Any]) -> Tensor:
        """The model's loss: the mean over the targets it trained on, over the batch's own count of
        them where the batch carries one that differs (LLM-Foundry's `loss_generating_tokens`).

        Composer's `accumulate_train_batch_on_tokens` weighs each microbatch's loss by that count, so
        the loss must be a mean over it for microbatches to add up to the whole batch. LLM-Foundry's
        `text` collator counts the targets across document boundaries, which the model never trains
        on: the summed loss is then divided by that larger count (`padfree_text` and
        `padfree_finetuning` count exactly the model's targets, where nothing changes).
        """
        if outputs.loss is None:
            raise ValueError(
                "the batch has no 'labels', so the model computed no loss; training batches need labels "
                f"(batch keys: {sorted(batch)})."
            )
        counted = batch.get("loss_generating_tokens")
        if counted is None or outputs.num_loss_tokens is None:
            return outputs.loss
        counted = max(int(sum(counted)), 1)  # host-side ints: no sync
        trained = outputs.num_loss_tokens.clamp(min=1)
        return torch.where(trained == counted, outputs.loss, outputs.loss * trained / counted)

    def eval_forward(self, batch: dict[str, Any], outputs: Any | None = None) -> Any:
        """Composer's eval forward, with labels masked at document starts first.

        Composer shifts labels along the whole row for the metrics; in a packed row that would
        score the last token of a document on the first token of the next one, which the model
        never trains on. Like Composer, this moves `labels` out of `batch` (into `self.labels`);
        the caller's labels tensor itself is not written to.
        """
        if "labels" in batch and batch.get("mode") not in ("generate", "icl_task"):
            starts_BS = document_starts(batch)
            if starts_BS is not None:
                batch["labels"] = batch["labels"].masked_fill(starts_BS, IGNORE_INDEX)
        return super().eval_forward(batch, outputs)

    def get_metadata(self) -> dict[str, Any]:
        """Composer's HF metadata for checkpoints, naming the stock Llama config and class.

        Composer checkpoints carry this so they can be turned into HF checkpoints
        (`composer.models.write_huggingface_pretrained_from_composer_checkpoint`, which
        LLM-Foundry's `convert_composer_to_hf.py` uses; `HuggingFaceModel.hf_from_composer_checkpoint`).
        With our own config there, those would need `import foundry_padfree` to read it and would
        write a `padfree_llama` checkpoint; with the stock one they write what `save_pretrained`
        and the `hf_checkpointer` write: a checkpoint stock `LlamaForCausalLM` loads (the weight
        names are the same), which `PadFreeLlamaForCausalLM.from_pretrained` loads too.
        Resuming from a checkpoint does not read this.
        """
        metadata = super().get_metadata()
        metadata["model"]["config"]["content"] = json.loads(self.config.to_llama_config().to_json_string())
        metadata["model"]["config"]["class"] = f"{LlamaForCausalLM.__module__}.{LlamaForCausalLM.__name__}"
        return metadata

    def flops_per_batch(self, batch: Mapping[str, Any]) -> int:
        """Training FLOPs of `batch`, real tokens only: `6 N T_real + 12 L d sum(len_i^2)`.

        Composer's `SpeedMonitor` calls this with the full device batch to log MFU; padding adds
        nothing because the model never computes it. The head is counted on every real token, as
        `6 N T` does, also where the model skips it (tokens without a target): `training_flops`.
        """
        return training_flops(self.config, self.num_flop_params, () if padding_only(batch) else document_lengths(batch))


def padding_only(batch: Mapping[str, Any]) -> bool:
    """Whether a batch of our collators holds no real token, from its host-side `total_tokens`
    list (no device sync); False for a batch without that list."""
    totals = batch.get("total_tokens")
    return isinstance(totals, list | tuple) and len(totals) > 0 and sum(totals) == 0


def document_lengths(batch: Mapping[str, Any]) -> tuple[int, ...]:
    """Lengths of the documents in a `[B,S]` batch, read exactly as the model's forward reads them."""
    inputs = {k: batch.get(k) for k in ("attention_mask", "sequence_id", "position_ids")}
    with torch.no_grad():
        return unpad(batch["input_ids"], **inputs).meta.doc_lens


def document_starts(batch: Mapping[str, Any]) -> Tensor | None:
    """(B, S) bool: True on the first token of every document after the first of its row.

    From `sequence_id` changes or `position_ids == 0`; None when the rows are not packed.
    """
    sequence_id, position_ids = batch.get("sequence_id"), batch.get("position_ids")
    if sequence_id is None and position_ids is None:
        return None
    ref = sequence_id if sequence_id is not None else position_ids
    starts_BS = torch.zeros_like(ref, dtype=torch.bool)
    if sequence_id is not None:
        starts_BS[:, 1:] |= (sequence_id[:, 1:] != sequence_id[:, :-1]) & (sequence_id[:, 1:] >= 0)
    if position_ids is not None:
        starts_BS[:, 1:] |= position_ids[:, 1:] == 0
    return starts_BS


def _flop_params(model: PadFreeLlamaForCausalLM) -> int:
    """Parameters that do matmul work per token: all of them except an untied embedding table
    (a lookup). Norm weights are included, as in LLM-Foundry's MPT count; they are negligible."""
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    embed = model.get_input_embeddings().weight
    if embed is model.get_output_embeddings().weight:
        return total
    return total - embed.numel()


def _training_device() -> torch.device:
    return torch.device("cuda" if get_device(None).name == "gpu" else "cpu")


def _is_unset(name: str, value: Any) -> bool:
    """Whether an unsupported `hf_causal_lm` option holds a value that asks for nothing: unset, off,
    empty, or `should_save_peft_only`'s default (which only matters with a `peft_config`)."""
    return value is None or value is False or value == {} or (name == "should_save_peft_only" and value is True)


def _reject_unknown_options(unknown: dict[str, Any]) -> None:
    if not unknown:
        return
    known = [
        p
        for p in inspect.signature(ComposerPadFreeCausalLM.__init__).parameters
        if p not in ("self", "tokenizer", "unknown")
    ]
    problems = []
    for name in sorted(unknown):
        if name in _NOT_SUPPORTED and _is_unset(name, unknown[name]):
            continue  # e.g. `load_in_8bit: false`, copied from an hf_causal_lm YAML: asks for nothing
        if name in _NOT_SUPPORTED:
            problems.append(f"{name}: {_NOT_SUPPORTED[name]}")
            continue
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "not an option of padfree_causal_lm"
        problems.append(f"{name}: {hint}")
    if not problems:
        return
    raise ValueError(
        "unknown model option(s) for padfree_causal_lm: "
        + "; ".join(problems)
        + f". Valid options: {', '.join(known)}."
    )


__all__ = ["ComposerPadFreeCausalLM", "document_lengths", "document_starts"]
