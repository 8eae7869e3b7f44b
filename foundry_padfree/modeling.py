"""A Llama causal LM that unpads once, at the embedding, and never pads again until the output.

Shape legend: B batch rows, S row length, T real tokens, D hidden size, N query heads,
K key/value heads, H head dim, F MLP width, V vocabulary.

The whole data path is `PadFreeLlamaForCausalLM.forward`: `unpad` builds one `VarlenMeta`, the
decoder runs on the `[T,D]` real tokens with that same object in every layer, and the loss is taken
on packed tokens. Weight names are HF Llama's, so stock checkpoints load and what we save is a
stock checkpoint.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast

from foundry_padfree import kernels
from foundry_padfree.attention import Backend, resolve_backend
from foundry_padfree.config import ATTN_BACKENDS, PadFreeLlamaConfig
from foundry_padfree.loss import DeferredHeadGrad, linear_cross_entropy, linear_dtype, module_cross_entropy
from foundry_padfree.varlen import VarlenMeta, unpad

log = logging.getLogger(__name__)

# RoPE variants whose frequencies do not depend on the batch.
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Dynamic NTK scaling is the default RoPE up to `max_position_embeddings` and rescales its
# frequencies past it by the longest sequence seen, which a packed batch of many documents does not
# define: supported up to that length, and a longer document raises (`uses_dynamic_rope`).
_DYNAMIC_ROPE_TYPES = ("dynamic",)


class PadFreeRMSNorm(nn.Module):
    """LlamaRMSNorm: normalize in fp32, cast back, then scale (one Triton kernel when `fused`)."""

    def __init__(self, hidden_size: int, eps: float, fused: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.fused = fused

    def forward(self, x_TD: Tensor, pass_input: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The norm of `x_TD`; with `pass_input`, `(norm, copy of x_TD)`: the input passed through for a
        second use (the residual stream), which the caller may update in place, and whose gradient
        the backward adds to the norm's own (see `kernels.rms_norm`)."""
        if self.fused and kernels.usable(x_TD):
            return kernels.rms_norm(x_TD, self.weight, self.variance_epsilon, pass_input)
        return _RMSNorm.apply(x_TD, self.weight, self.variance_epsilon, pass_input)


class _RMSNorm(torch.autograd.Function):
    """LlamaRMSNorm's forward, with a hand-written backward that keeps only the input and the
    `[T,1]` fp32 inverse norms: autograd on the three-line formula would keep two fp32 copies of
    `[T,D]` and a low-precision one per norm (about 5 GiB for 8k tokens of a 16-layer 2048-wide
    model), which the backward recomputes here in one cheap pass."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, weight_D: Tensor, eps: float, pass_input: bool = False):
        x32_TD = x_TD.float()
        rstd_T1 = torch.rsqrt(x32_TD.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x_TD, weight_D, rstd_T1)
        ctx.set_materialize_grads(False)
        y_TD = weight_D * (x32_TD * rstd_T1).to(x_TD.dtype)
        return (y_TD, x_TD.clone()) if pass_input else y_TD

    @staticmethod
    def backward(ctx, grad_TD: Tensor | None, grad_input_TD: Tensor | None = None):
        kernels.first_order_only("RMSNorm")
        x_TD, weight_D, rstd_T1 = ctx.saved_tensors
        if grad_TD is None:  # only the passed-through input was used
            return grad_input_TD, None, None, None
        n_TD = x_TD.float() * rstd_T1  # the normalized input, fp32
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_TD * n_TD.to(x_TD.dtype)).flatten(0, -2).sum(0).to(weight_D.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # y = n * w with n = x * rstd: dL/dx = rstd * (g - n * mean(g * n)), g = dL/dn.
            g_TD = (grad_TD * weight_D).to(x_TD.dtype).float()
            grad_x32 = rstd_T1 * (g_TD - n_TD * (g_TD * n_TD).mean(-1, keepdim=True))
            if grad_input_TD is not None:
                grad_x32 += grad_input_TD
            grad_x = grad_x32.to(x_TD.dtype)
        return grad_x, grad_weight, None, None


class PadFreeRotary(nn.Module):
    """RoPE tables for per-document positions: `(cos_TH, sin_TH)` once per forward.

    The forward reads fp32 inverse frequencies computed from the config (on the CPU, as stock
    HF's, then copied once per device), never the values of the `inv_freq` buffer, which keeps
    stock Llama's name. That buffer is cast with the model (`model.to(torch.bfloat16)`, FSDP's
    `buffer_dtype` under Composer's mixed precision `PURE` or `DEFAULT`), and once rounded to bf16
    it stays rounded when cast back to fp32 (FSDP in eval with `FSDP_USE_FULL_PREC_IN_EVAL`).
    Rounded frequencies turn a token at position 2,000 by up to a few radians the wrong way.
    """

    def __init__(self, config: PadFreeLlamaConfig):
        super().__init__()
        rope_type = _rope_type(config)
        if rope_type not in _STATIC_ROPE_TYPES + _DYNAMIC_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {rope_type!r} is not supported by the padding-free model; "
                f"supported: {', '.join(_STATIC_ROPE_TYPES + _DYNAMIC_ROPE_TYPES)}."
            )
        self.config, self.rope_type = config, rope_type
        inv_freq, self.attention_scaling = self.fp32_inv_freq()
        # On the device the parameters are made on: a factory's, which a `with torch.device(...)`
        # block sets (meta for empty init); `torch.get_default_device()` misses it in torch 2.7.
        self.register_buffer("inv_freq", inv_freq.to(torch.empty(0).device), persistent=False)
        self._inv_freq_fp32: Tensor | None = None  # fp32_inv_freq() on the positions' device

    def fp32_inv_freq(self) -> tuple[Tensor, float]:
        """The inverse frequencies in fp32, computed on the CPU, and the RoPE type's attention scaling."""
        cpu = torch.device("cpu")  # explicit: also under a meta-device context
        if self.rope_type == "default":
            head_dim = _head_dim(self.config)
            exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=cpu).float() / head_dim
            return 1.0 / (self.config.rope_theta**exponents), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        with cpu:  # HF makes some tensors on the default device, which a meta-device block would set
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self.config, cpu)
        return inv_freq.float(), scaling

    @torch.no_grad()
    def forward(self, position_ids_T: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        inv_freq, device = self._inv_freq_fp32, position_ids_T.device
        if inv_freq is None or inv_freq.device != device:
            inv_freq = self.fp32_inv_freq()[0]
            if device.type == "cuda":  # copied from pinned memory: no sync with the device
                inv_freq = inv_freq.pin_memory()
            inv_freq = self._inv_freq_fp32 = inv_freq.to(device, non_blocking=True)
        with torch.autocast(device_type=position_ids_T.device.type, enabled=False):
            freqs_TH2 = position_ids_T.float()[:, None] * inv_freq[None, :]
            emb_TH = torch.cat((freqs_TH2, freqs_TH2), dim=-1)
            cos_TH = emb_TH.cos() * self.attention_scaling
            sin_TH = emb_TH.sin() * self.attention_scaling
        return cos_TH.to(dtype), sin_TH.to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x_TNH: Tensor, cos_TH: Tensor, sin_TH: Tensor, fused: bool = False) -> Tensor:
    if fused and kernels.usable(x_TNH):
        return kernels.rope(x_TNH, cos_TH, sin_TH)
    return x_TNH * cos_TH[:, None] + _rotate_half(x_TNH) * sin_TH[:, None]


def _head_dim(config: PadFreeLlamaConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class PadFreeAttention(nn.Module):
    """The four attention projections around the varlen kernel. The layer runs the pieces itself
    (`project`, the kernel, `o_proj`), so that everything dense on either side of the kernel can
    fuse or compile with its neighbours; it calls this module (`forward`) only when a hook or a
    replaced `forward` sits on it, so that those run as they would in stock Llama."""

    def __init__(self, config: PadFreeLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = _head_dim(config)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.fused = config.fused_kernels
        bias = config.attention_bias
        D, H = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(D, self.num_heads * H, bias=bias)
        self.k_proj = nn.Linear(D, self.num_kv_heads * H, bias=bias)
        self.v_proj = nn.Linear(D, self.num_kv_heads * H, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * H, D, bias=bias)

    def forward(
        self, x_TD: Tensor, cos_TH: Tensor, sin_TH: Tensor, meta: VarlenMeta, backend: Backend
    ) -> tuple[Tensor, None]:
        """Attention of the normed packed tokens: (T,D) -> (the output projection's (T,D), None), a
        pair as stock `LlamaAttention` returns (output, attention weights, which never exist here)."""
        q_TNH, k_TKH, v_TKH = _autocast_dtype(*self.project(x_TD, cos_TH, sin_TH))
        return self.o_proj(backend.attend(q_TNH, k_TKH, v_TKH, meta, self.scaling).flatten(1)), None

    def project(self, x_TD: Tensor, cos_TH: Tensor, sin_TH: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries and keys with RoPE applied, and values: (T,N,H), (T,K,H), (T,K,H)."""
        return self.heads(self.q_proj(x_TD), self.k_proj(x_TD), self.v_proj(x_TD), cos_TH, sin_TH)

    def heads(self, q_TX: Tensor, k_TX: Tensor, v_TX: Tensor, cos_TH: Tensor, sin_TH: Tensor):
        """The projections' outputs as heads, RoPE applied to queries and keys."""
        q_TNH, k_TKH, v_TKH = self.split_heads(q_TX, k_TX, v_TX)
        return _apply_rope(q_TNH, cos_TH, sin_TH, self.fused), _apply_rope(k_TKH, cos_TH, sin_TH, self.fused), v_TKH

    def split_heads(self, q_TX: Tensor, k_TX: Tensor, v_TX: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The projections' outputs as (T,N,H), (T,K,H), (T,K,H) views. The head counts come from the
        projections, which tensor parallelism (`tp_plan`) shards by heads."""
        T, H = q_TX.shape[0], self.head_dim
        return q_TX.view(T, -1, H), k_TX.view(T, -1, H), v_TX.view(T, -1, H)


class PadFreeMLP(nn.Module):
    def __init__(self, config: PadFreeLlamaConfig):
        super().__init__()
        D, F_ = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, F_, bias=config.mlp_bias)
        self.up_proj = nn.Linear(D, F_, bias=config.mlp_bias)
        self.down_proj = nn.Linear(F_, D, bias=config.mlp_bias)
        self.hidden_act = config.hidden_act
        self.act_fn = ACT2FN[config.hidden_act]
        self.fused = config.fused_kernels
        self.recompute = config.recompute_mlp

    def forward(self, x_TD: Tensor) -> Tensor:
        gate_TF, up_TF = self.gate_proj(x_TD), self.up_proj(x_TD)
        if self.hidden_act != "silu":
            return self.down_proj(self.act_fn(gate_TF) * up_TF)
        if self.recompute and torch.compiler.is_compiling():
            # Inside torch.compile the partitioner re-decides from the joint graph what backward keeps
            # (it would keep the product); a checkpointed region is what it is told to recompute.
            return checkpoint(_down_of_silu_mul, self.down_proj, gate_TF, up_TF, use_reentrant=False)
        fused = self.fused and kernels.usable(gate_TF)
        # A wrapped or hooked down_proj (LoRA, quantized) keeps its own forward; only nn.Linear is folded in.
        if self.recompute and _plain(self.down_proj, nn.Linear):
            return _SiluMulDown.apply(gate_TF, up_TF, self.down_proj.weight, self.down_proj.bias, fused, None)
        return self.down_proj(_SiluMul.apply(gate_TF, up_TF, fused))


def _down_of_silu_mul(down_proj: nn.Module, gate_TF: Tensor, up_TF: Tensor) -> Tensor:
    return down_proj(torch.nn.functional.silu(gate_TF) * up_TF)


def _silu_mul(gate_TF: Tensor, up_TF: Tensor, fused: bool) -> Tensor:
    if fused:
        return kernels.silu_mul(gate_TF, up_TF)
    return torch.nn.functional.silu(gate_TF) * up_TF


def _silu_mul_backward(grad_TF: Tensor, gate_TF: Tensor, up_TF: Tensor, fused: bool) -> tuple[Tensor, Tensor]:
    if fused:
        return kernels.silu_mul_backward(grad_TF, gate_TF, up_TF)
    # The ATen formulas autograd applies to `silu(gate) * up`, so gradients are bit-identical.
    grad_gate = torch.ops.aten.silu_backward(grad_TF * up_TF, gate_TF)
    return grad_gate, grad_TF * torch.nn.functional.silu(gate_TF)


class _SiluMul(torch.autograd.Function):
    """`silu(gate) * up` keeping only `gate` and `up` for backward (autograd would also keep
    `silu(gate)`, a third `[T,F]` tensor per layer); the backward recomputes it."""

    @staticmethod
    def forward(ctx, gate_TF: Tensor, up_TF: Tensor, fused: bool) -> Tensor:
        ctx.save_for_backward(gate_TF, up_TF)
        ctx.fused = fused
        return _silu_mul(gate_TF, up_TF, fused)

    @staticmethod
    def backward(ctx, grad_TF: Tensor) -> tuple[Tensor, Tensor, None]:
        kernels.first_order_only("SiLU·up")
        gate_TF, up_TF = ctx.saved_tensors
        return *_silu_mul_backward(grad_TF, gate_TF, up_TF, ctx.fused), None


class _SiluMulDown(torch.autograd.Function):
    """`down_proj(silu(gate) * up)` keeping `gate`, `up` and the weight, not their `[T,F]` product,
    which the backward recomputes: `PadFreeLlamaConfig.recompute_mlp`.

    Under autocast the product and the weight are cast to autocast's dtype as `nn.Linear` would be,
    and that cast weight is what is kept (autocast's linear keeps the same copy).

    `residual_TD` (no bias, already in the product's dtype): the product is added to it in place,
    in the product's epilogue (`addmm_`), and it is returned; its gradient is the output's, passed
    back unchanged."""

    @staticmethod
    def forward(
        ctx,
        gate_TF: Tensor,
        up_TF: Tensor,
        weight_DF: Tensor,
        bias_D: Tensor | None,
        fused: bool,
        residual_TD: Tensor | None,
    ) -> Tensor:
        device_type = gate_TF.device.type
        dtype = linear_dtype(device_type, torch.promote_types(gate_TF.dtype, up_TF.dtype))
        with torch.autocast(device_type, enabled=False):
            gate_TF, up_TF, w_DF = gate_TF.to(dtype), up_TF.to(dtype), weight_DF.to(dtype)
            h_TF = _silu_mul(gate_TF, up_TF, fused)
            if residual_TD is None:
                out_TD = torch.nn.functional.linear(h_TF, w_DF, None if bias_D is None else bias_D.to(dtype))
            else:
                assert bias_D is None and residual_TD.dtype == dtype, "residual: no bias, one dtype (see _folds)"
                out_TD = residual_TD.addmm_(h_TF, w_DF.t())
                ctx.mark_dirty(residual_TD)
        ctx.save_for_backward(gate_TF, up_TF, w_DF)
        ctx.fused, ctx.has_bias = fused, bias_D is not None
        ctx.dtypes = (weight_DF.dtype, None if bias_D is None else bias_D.dtype)
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD: Tensor):
        kernels.first_order_only("MLP")
        gate_TF, up_TF, w_DF = ctx.saved_tensors
        grad_TD = grad_TD.to(w_DF.dtype)
        if ctx.fused:
            # One kernel reads gate and up once for their gradients and the recomputed product.
            grad_gate, grad_up, h_TF = kernels.silu_mul_backward(grad_TD @ w_DF, gate_TF, up_TF, with_product=True)
        else:
            h_TF = _silu_mul(gate_TF, up_TF, False)
        grad_w = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_w = (grad_TD.flatten(0, -2).t() @ h_TF.flatten(0, -2)).to(ctx.dtypes[0])
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = grad_TD.flatten(0, -2).sum(0).to(ctx.dtypes[1])
        del h_TF
        if not ctx.fused:
            grad_gate, grad_up = _silu_mul_backward(grad_TD @ w_DF, gate_TF, up_TF, False)
        grad_residual = grad_TD if ctx.needs_input_grad[5] else None
        return grad_gate, grad_up, grad_w, grad_b, None, grad_residual


def _plain(module: nn.Module, cls: type[nn.Module]) -> bool:
    """Whether calling `module` is exactly `cls.forward` on its parameters: its type is `cls` (not a
    LoRA or quantized wrapper) and no forward hook or replaced `forward` (its own or a global one:
    steering and NEFTune hooks, pruning's recomputed weight, offloading wrappers) would run. Only
    then may a fused path use the module's weight without calling it."""
    hooks = nn.modules.module
    return (
        type(module) is cls
        and not (module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module))
        and not (hooks._global_forward_hooks or hooks._global_forward_pre_hooks)
    )


def _execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its weight's device, or for a weight offloaded by accelerate
    (`device_map` with `"disk"` or `"cpu"` offload: the weight waits on `meta` and the module's hook
    brings it in at each call) the device the hook runs it on."""
    device = module.weight.device
    if device.type == "meta":
        execution = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if execution is not None:
            return torch.device(execution)
    return device


def _hooked(layer: PadFreeDecoderLayer) -> bool:
    """Whether the block's attention, MLP or norms is not its plain self (`_plain`: a hook, a
    replaced `forward`, another module in its place). The block then calls each of them as a
    module, eagerly (`_module_layer`): fused kernels and compiled graphs would run past them."""
    return not (
        _plain(layer.self_attn, PadFreeAttention)
        and _plain(layer.mlp, PadFreeMLP)
        and _plain(layer.input_layernorm, PadFreeRMSNorm)
        and _plain(layer.post_attention_layernorm, PadFreeRMSNorm)
    )


def _folds(layer: PadFreeDecoderLayer, x_TD: Tensor) -> bool:
    """Whether `_folded_layer` may run the block: fused kernels on (`config.fused_kernels`), in eager
    code (`torch.compile` fuses on its own), the residual stream and the products in one dtype
    (autocast off, or in x's dtype: bf16 weights under `amp_bf16`, as with FSDP's `PURE` mixed
    precision), a SiLU MLP, and bare `nn.Linear`s of x's dtype without bias, Llama's (a wrapped
    or hooked layer keeps its own forward: `_plain`)."""
    attn, mlp = layer.self_attn, layer.mlp
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    device_type = x_TD.device.type
    return (
        mlp.fused
        and mlp.hidden_act == "silu"
        and not torch.compiler.is_compiling()
        and (not torch.is_autocast_enabled(device_type) or torch.get_autocast_dtype(device_type) == x_TD.dtype)
        and all(_plain(m, nn.Linear) and m.bias is None and m.weight.dtype == x_TD.dtype for m in linears)
    )


class _SharedInputLinears(torch.autograd.Function):
    """`x @ w.T` for several weights `w_i` (O_i, D) of one input `x_TD`, whose backward sums the
    input's gradient in the epilogues of a chain of products (`addmm_` into the first one's result)
    instead of autograd adding the products' results in passes of their own over `[T,D]`."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, *weights: Tensor) -> tuple[Tensor, ...]:
        ctx.save_for_backward(x_TD, *weights)
        ctx.set_materialize_grads(False)
        return tuple(x_TD @ w.t() for w in weights)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        kernels.first_order_only("fused projections")
        x_TD, *weights = ctx.saved_tensors
        grad_x, grad_ws = None, []
        for i, (g, w) in enumerate(zip(grads, weights)):
            grad_ws.append(g.t() @ x_TD if g is not None and ctx.needs_input_grad[1 + i] else None)
            if g is not None and ctx.needs_input_grad[0]:
                grad_x = g @ w if grad_x is None else grad_x.addmm_(g, w)
        return grad_x, *grad_ws


class PadFreeDecoderLayer(nn.Module):
    """Pre-norm Llama block on packed tokens.

    The block runs as three calls: `attention_inputs` (norm, projections, RoPE), the varlen kernel
    (`backend.attend`, which alone reads the host-side metadata), and `attention_output_and_mlp`
    (output projection, residual, norm, MLP, residual). Only tensors cross the two dense calls, so
    `compile_regions` can hand them to `torch.compile` with the token dimension dynamic: one graph
    per region serves every layer and every batch, with no guard on the documents' layout. A
    backend whose attention is `traceable` from tensors alone compiles as one call instead
    (`PadFreeLlamaModel.compile_layers`). Run eagerly where `_folds` allows (Llama's bare
    projections, fused kernels on), the block is `_folded_layer`: the same result in fewer passes.
    With a hook (or another module) on its attention, MLP or a norm, the block calls each of them
    as a module, eagerly, as stock Llama does (`_module_layer`); they see packed `[T,D]` tensors.
    """

    def __init__(self, config: PadFreeLlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = PadFreeAttention(config, layer_idx)
        self.mlp = PadFreeMLP(config)
        self.input_layernorm = PadFreeRMSNorm(config.hidden_size, config.rms_norm_eps, config.fused_kernels)
        self.post_attention_layernorm = PadFreeRMSNorm(config.hidden_size, config.rms_norm_eps, config.fused_kernels)
        self.compile_backend: str | None = None  # set by compile_regions; None runs eagerly

    def forward(self, x_TD: Tensor, meta: VarlenMeta, rope: tuple[Tensor, Tensor], backend: Backend) -> Tensor:
        if _hooked(self):
            return _module_layer(self, x_TD, meta, rope, backend)
        attention_inputs, attention_output_and_mlp = _attention_inputs, _attention_output_and_mlp
        if self.compile_backend is not None and backend.traceable is not None:  # one graph, attention inside
            _mark_dynamic(x_TD, *rope, meta.attn_extra)
            return _compiled_layer(self.compile_backend)(self, x_TD, *rope, meta.attn_extra, backend.traceable)
        if self.compile_backend is not None:
            attention_inputs, attention_output_and_mlp = _compiled_regions(self.compile_backend)
            _mark_dynamic(x_TD, *rope)
        elif _folds(self, x_TD):
            return _folded_layer(self, x_TD, meta, rope, backend)
        q_TNH, k_TKH, v_TKH = _autocast_dtype(*attention_inputs(self, x_TD, *rope))
        o_TNH = backend.attend(q_TNH, k_TKH, v_TKH, meta, self.self_attn.scaling)
        if self.compile_backend is not None:
            _mark_dynamic(o_TNH)
        return attention_output_and_mlp(self, x_TD, o_TNH)

    def compile_regions(self, backend: str = "inductor") -> None:
        """Run the two dense parts of the block through `torch.compile(backend=backend)`; the
        attention kernel stays as it is."""
        self.compile_backend = backend


def _autocast_dtype(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The attention inputs in autocast's dtype when autocast is on (Composer's `amp_bf16`), as
    autocast casts SDPA's. Under autocast the residual stream stays fp32, so RoPE's fp32 tables
    make q and k fp32 while v comes out of its projection in bf16; varlen kernels take neither."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def _module_layer(
    layer: PadFreeDecoderLayer, x_TD: Tensor, meta: VarlenMeta, rope: tuple[Tensor, Tensor], backend: Backend
) -> Tensor:
    """The block with its attention, MLP and norms each called as a module, hooks included."""
    x_TD = x_TD + layer.self_attn(layer.input_layernorm(x_TD), *rope, meta, backend)[0]
    return x_TD + layer.mlp(layer.post_attention_layernorm(x_TD))


def _attention_inputs(layer: PadFreeDecoderLayer, x_TD: Tensor, cos_TH: Tensor, sin_TH: Tensor):
    return layer.self_attn.project(layer.input_layernorm(x_TD), cos_TH, sin_TH)


def _attention_output_and_mlp(layer: PadFreeDecoderLayer, x_TD: Tensor, o_TNH: Tensor) -> Tensor:
    x_TD = x_TD + layer.self_attn.o_proj(o_TNH.flatten(1))
    return x_TD + layer.mlp(layer.post_attention_layernorm(x_TD))


def _folded_layer(
    layer: PadFreeDecoderLayer, x_TD: Tensor, meta: VarlenMeta, rope: tuple[Tensor, Tensor], backend: Backend
) -> Tensor:
    """The block as `_attention_inputs` and `_attention_output_and_mlp` compute it, for eager runs
    (`_folds`; torch.compile does its own fusing), with fewer passes over `[T,D]`: each residual add
    rides in the epilogue of the output product after the norm that read the residual (`addmm_`,
    the o and down products, in place on the copy of the residual that the norm's kernel writes
    from its read, `pass_input`); the gradient that comes back along the residual stream is added
    inside that norm's backward kernel; q/k/v, like gate/up, sum their input's gradient inside
    their backward products (`_SharedInputLinears`); and with a backend that takes RoPE inside its
    op (`Backend.attend_rope`: the Triton kernels), RoPE's backward is part of the attention's."""
    attn, mlp = layer.self_attn, layer.mlp
    n_TD, x_TD = layer.input_layernorm(x_TD, pass_input=True)
    qkv = _SharedInputLinears.apply(n_TD, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
    if backend.attend_rope is not None:  # RoPE inside the attention op (`_folds`: fused kernels on)
        o_TNH = backend.attend_rope(*attn.split_heads(*qkv), *rope, meta, attn.scaling)
    else:
        o_TNH = backend.attend(*attn.heads(*qkv, *rope), meta, attn.scaling)
    x_TD = x_TD.addmm_(o_TNH.flatten(1), attn.o_proj.weight.t())  # in place: x_TD is the norm's copy
    n_TD, x_TD = layer.post_attention_layernorm(x_TD, pass_input=True)
    gate_TF, up_TF = _SharedInputLinears.apply(n_TD, mlp.gate_proj.weight, mlp.up_proj.weight)
    fused = kernels.usable(gate_TF)
    if mlp.recompute:
        return _SiluMulDown.apply(gate_TF, up_TF, mlp.down_proj.weight, None, fused, x_TD)
    return x_TD.addmm_(_SiluMul.apply(gate_TF, up_TF, fused), mlp.down_proj.weight.t())


def _mark_dynamic(*values: Any) -> None:
    """Trace dim 0 of these tensors (and of the tensors of these tuples: a backend's prepared
    metadata) as symbolic: T and the tile counts change every batch, one graph serves them all."""
    for v in values:
        for t in v if isinstance(v, tuple) else (v,):
            if isinstance(t, Tensor):
                torch._dynamo.maybe_mark_dynamic(t, 0)


def _layer(layer: PadFreeDecoderLayer, x_TD: Tensor, cos_TH: Tensor, sin_TH: Tensor, attn_extra, attend) -> Tensor:
    """The whole block for a backend whose `traceable` attention takes only `meta.attn_extra`."""
    q_TNH, k_TKH, v_TKH = _autocast_dtype(*_attention_inputs(layer, x_TD, cos_TH, sin_TH))
    o_TNH = attend(q_TNH, k_TKH, v_TKH, attn_extra, layer.self_attn.scaling)
    return _attention_output_and_mlp(layer, x_TD, o_TNH)


def _stack(layers: nn.ModuleList, x_TD: Tensor, cos_TH: Tensor, sin_TH: Tensor, attn_extra, attend) -> Tensor:
    for layer in layers:
        x_TD = _layer(layer, x_TD, cos_TH, sin_TH, attn_extra, attend)
    return x_TD


def _inductor_options(backend: str) -> dict[str, Any]:
    """Inductor options for the layers' graphs: its fusion of a norm backward's two reductions
    ("mix-order reduction", torch >= 2.10) decided without guards on the token count T. By
    default inductor fuses them only above size thresholds in T (hidden size x T >= 5,242,880,
    T >= 2 x hidden size, T >= 4,096) and guards on each, so a batch on the other side of one from
    the batch the graph was compiled on compiles another graph (hidden size 576: 9,102 tokens). Its
    non-strict mode drops those checks, and one graph serves every T."""
    if backend != "inductor":
        return {}
    from torch._inductor import config

    if not hasattr(config.triton, "mix_order_reduction_non_strict_mode"):  # a torch without the fusion
        return {}
    return {"triton.mix_order_reduction_non_strict_mode": True}


def _compile(fn: Callable, backend: str) -> Callable:
    options = _inductor_options(backend)
    return torch.compile(fn, backend=backend, options=options) if options else torch.compile(fn, backend=backend)


@functools.cache
def _compiled_layer(backend: str) -> Callable:
    return _compile(_layer, backend)


@functools.cache
def _compiled_stack(backend: str) -> Callable:
    return _compile(_stack, backend)


@functools.cache
def _compiled_regions(backend: str) -> tuple[Callable, Callable]:
    # Module-level functions taking the layer as an argument: dynamo lifts each layer's weights as
    # graph inputs, so the layers share one compiled graph per region instead of one per layer.
    return _compile(_attention_inputs, backend), _compile(_attention_output_and_mlp, backend)


class _TiedEmbedding(torch.autograd.Function):
    """`nn.Embedding`'s lookup of a weight that the output head shares, whose backward writes the
    weight's whole gradient: the head's, which the loss left in `head_grad` (`DeferredHeadGrad`),
    plus the embedding's own rows, in one pass (`kernels.tied_embedding_grad`)."""

    @staticmethod
    def forward(ctx, ids_T: Tensor, weight_VD: Tensor, padding_idx: int | None, head_grad: DeferredHeadGrad):
        ctx.save_for_backward(ids_T)
        ctx.padding_idx, ctx.head_grad = padding_idx, head_grad
        ctx.num_weights, ctx.w_dtype = weight_VD.shape[0], weight_VD.dtype
        return torch.nn.functional.embedding(ids_T, weight_VD, padding_idx)

    @staticmethod
    def backward(ctx, grad_TD: Tensor):
        kernels.first_order_only("tied embedding")
        (ids_T,) = ctx.saved_tensors
        head = ctx.head_grad.take()
        if head is None:  # the loss was not part of this backward: the embedding's gradient alone
            pad = -1 if ctx.padding_idx is None else ctx.padding_idx
            grad_w = torch.ops.aten.embedding_dense_backward(grad_TD, ids_T, ctx.num_weights, pad, False)
        else:
            grad_w = kernels.tied_embedding_grad(*head, ids_T, grad_TD, ctx.padding_idx, ctx.w_dtype)
        return None, grad_w, None, None


# HF's `attn_implementation` values in this model's terms: its varlen kernel is `config.attn_backend`
# (None: HF's default kernels, for which `auto` stands here).
_HF_ATTN_IMPLEMENTATIONS = {
    "eager": None,
    "sdpa": None,
    "flash_attention_2": "flash_attn",
    "flash_attention_3": "flash_attn",
    "flex_attention": "flex",
}


def _adopt_attn_implementation(config: PadFreeLlamaConfig, requested: Any) -> None:
    """Set `config.attn_backend` from HF's `attn_implementation` (None: not given), or refuse it."""
    if requested is None:
        return
    if requested not in _HF_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={requested!r}: PadFreeLlamaForCausalLM runs its own varlen kernels, chosen by "
            f"attn_backend (one of {', '.join(ATTN_BACKENDS)}); pass attn_backend=... instead, or one of "
            f"{', '.join(_HF_ATTN_IMPLEMENTATIONS)}."
        )
    backend = _HF_ATTN_IMPLEMENTATIONS[requested]
    if backend is not None and config.attn_backend not in ("auto", backend):
        raise ValueError(
            f"attn_implementation={requested!r} and attn_backend={config.attn_backend!r} name different kernels; "
            "pass only one of them."
        )
    if backend is not None:
        config.attn_backend = backend


class PadFreePreTrainedModel(PreTrainedModel):
    config_class = PadFreeLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PadFreeDecoderLayer"]

    def __init__(self, config: PadFreeLlamaConfig, *args: Any, **kwargs: Any):
        if not isinstance(config, PadFreeLlamaConfig):  # a stock LlamaConfig, as for LlamaForCausalLM(config)
            config = PadFreeLlamaConfig.from_llama_config(config)
        # Checked again here: `from_pretrained(path, field=value)` sets its overrides on the config
        # after the config's own check.
        config.validate_padfree()
        super().__init__(config, *args, **kwargs)

    @classmethod
    def _autoset_attn_implementation(cls, config: Any, use_flash_attention_2: bool = False, *args: Any, **kwargs: Any):
        """HF's choice of attention kernel: `attn_implementation="flash_attention_2"`
        (or `use_flash_attention_2`) and `"flex_attention"` select `attn_backend`; `"sdpa"` and
        `"eager"` leave it as it is; anything else is refused, naming `attn_backend`."""
        requested = getattr(config, "_attn_implementation_internal", None)
        _adopt_attn_implementation(config, "flash_attention_2" if use_flash_attention_2 else requested)
        config._attn_implementation = "eager"  # what HF code outside the model may read: no HF kernel runs
        return config

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, PadFreeRMSNorm):
            # Needed under meta init: FSDP's param_init_fn knows only HF's own norm classes.
            module.weight.data.fill_(1.0)
        elif isinstance(module, PadFreeRotary):
            module.inv_freq = module.fp32_inv_freq()[0].to(module.inv_freq.device)


class PadFreeLlamaModel(PadFreePreTrainedModel):
    """The decoder: embedding, layers, final norm; runs on real tokens `[T,D]` only."""

    def __init__(self, config: PadFreeLlamaConfig):
        super().__init__(config)
        config = self.config  # converted from a stock LlamaConfig, if that is what was given
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(PadFreeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = PadFreeRMSNorm(config.hidden_size, config.rms_norm_eps, config.fused_kernels)
        self.rotary_emb = PadFreeRotary(config)
        self.gradient_checkpointing = False
        self.compile_backend: str | None = None  # set by compile_layers; None runs eagerly
        self._backends: dict[tuple[str, str, torch.dtype], Backend] = {}  # (attn_backend, device type, dtype)
        self.post_init()

    def attention_backend(self, device: torch.device, dtype: torch.dtype | None = None) -> Backend:
        """The kernel named by `config.attn_backend` for `device` and the dtype attention runs in
        (`dtype`; None: the one it would run in now, autocast's or the weights'), chosen once and cached."""
        if dtype is None:
            dtype = linear_dtype(device.type, self.embed_tokens.weight.dtype)
        key = (self.config.attn_backend, device.type, dtype)
        if key not in self._backends:
            self._backends[key] = resolve_backend(self.config.attn_backend, device, _head_dim(self.config), dtype)
        return self._backends[key]

    def compile_layers(self, backend: str = "inductor") -> None:
        """`torch.compile` the layers, dynamic in the token count T.

        With an attention backend that torch.compile can trace (`Backend.traceable`: `triton`, what
        `auto` picks on CUDA), all layers form one graph, attention included, compiled on the first
        step (one forward and one backward graph; under gradient checkpointing, or with the layers
        in wrappers such as FSDP's or activation checkpointing's, one per layer, shared by all).
        Other backends' kernels stay eager between two graphs per layer, shared by all layers.
        Either way the graphs serve every later batch: no recompilation when T, the
        number of documents or their lengths change (with inductor, its fusion of a norm
        backward's two reductions is decided without guards on T: `_inductor_options`). The
        embedding and the host-side metadata stay eager. `backend` is `torch.compile`'s
        (`aot_eager` traces the same graphs without code generation).
        """
        self.compile_backend = backend
        for layer in self.layers:
            layer.compile_regions(backend)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward_tokens(
        self, input_ids_T: Tensor, meta: VarlenMeta, head_grad: DeferredHeadGrad | None = None
    ) -> Tensor:
        """Run the decoder on packed tokens: (T,) int64 ids -> (T, D) final hidden states.

        `head_grad`: the output head, which shares the embedding's weight, hands its gradient over
        there (`PadFreeLlamaForCausalLM._deferred_head_grad`)."""
        backend = self.attention_backend(input_ids_T.device)
        group = self.config.num_attention_heads // self.config.num_key_value_heads
        meta = backend.prepare(meta, group, _head_dim(self.config))  # once per forward, for every layer
        if not _plain(self.embed_tokens, nn.Embedding):
            # A hook or wrapper may read the shape (NEFTune scales its noise by sequence length ×
            # width): it gets stock Llama's `[B,S]` ids and `[B,S,D]` output, whose real rows go on.
            x_BSD = self.embed_tokens(meta.pad(input_ids_T))
            x_TD = x_BSD.reshape(-1, x_BSD.shape[-1]).index_select(0, meta.indices_T)
        elif head_grad is None:
            x_TD = self.embed_tokens(input_ids_T)
        else:
            embed = self.embed_tokens
            x_TD = _TiedEmbedding.apply(input_ids_T, embed.weight, embed.padding_idx, head_grad)
        rope = self.rotary_emb(meta.position_ids_T, x_TD.dtype)
        checkpointing = self.gradient_checkpointing and self.training
        # The stack's graph reads each layer's weights itself, so only bare layers go in: a wrapper
        # (FSDP's, which gathers the weights as the layer is called; activation checkpointing's) or
        # FSDP2's class must be called, and such layers run as compiled layers one by one.
        if (
            self.compile_backend is not None
            and backend.traceable is not None
            and not checkpointing
            and all(type(layer) is PadFreeDecoderLayer and not _hooked(layer) for layer in self.layers)
        ):
            # Every layer in one graph, attention included: the least host work per step.
            _mark_dynamic(x_TD, *rope, meta.attn_extra)
            x_TD = _compiled_stack(self.compile_backend)(self.layers, x_TD, *rope, meta.attn_extra, backend.traceable)
            return self.norm(x_TD)
        for layer in self.layers:
            if checkpointing:
                x_TD = self._gradient_checkpointing_func(layer.__call__, x_TD, meta, rope, backend)
            else:
                x_TD = layer(x_TD, meta, rope, backend)
        return self.norm(x_TD)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        sequence_id: Tensor | None = None,
        return_dict: bool | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        **hf_kwargs: Any,
    ) -> BaseModelOutput | tuple[Tensor]:
        """HF `LlamaModel` interface: `[B,S]` in, `[B,S,D]` last hidden state out (zeros at padding).
        HF arguments it does not implement raise, as `PadFreeLlamaForCausalLM.forward`'s do."""
        _check_hf_kwargs(hf_kwargs, past_key_values, position_ids is not None, self.config, type(self).__name__)
        _require_input_ids(input_ids)
        max_positions = self.config.max_position_embeddings if uses_dynamic_rope(self.config) else None
        with torch.no_grad():
            batch = unpad(
                input_ids, attention_mask, sequence_id, position_ids, None, max_positions,
                device=_execution_device(self.embed_tokens),
            )  # fmt: skip
        _warn_past_max_positions(batch.meta, self.config.max_position_embeddings)
        hidden_BSD = batch.meta.pad(self.forward_tokens(batch.input_ids_T, batch.meta))
        if not (return_dict if return_dict is not None else self.config.use_return_dict):
            return (hidden_BSD,)
        return BaseModelOutput(last_hidden_state=hidden_BSD)


def _rope_type(config: PadFreeLlamaConfig) -> str:
    """The config's RoPE type: `rope_scaling`'s `rope_type` (or its old name `type`), else default."""
    if not config.rope_scaling:
        return "default"
    return config.rope_scaling.get("rope_type", config.rope_scaling.get("type"))


def uses_dynamic_rope(config: PadFreeLlamaConfig) -> bool:
    """Whether the config's RoPE is dynamic NTK: then a position past `max_position_embeddings`
    raises, labels or not, since stock Llama would rescale the frequencies there."""
    return _rope_type(config) in _DYNAMIC_ROPE_TYPES


def _warn_past_max_positions(meta: VarlenMeta, max_positions: int) -> None:
    """Without labels (inference, generation) a document may run past `max_position_embeddings`,
    as in stock Llama, which warns (once); with labels `unpad` refuses it (a data set-up error)."""
    if meta.max_seqlen > max_positions:
        _warn_once_past(max_positions)


@functools.cache
def _warn_once_past(max_positions: int) -> None:
    log.warning(
        "a document runs past max_position_embeddings (%d): its later positions lie beyond the "
        "model's context, computed as stock Llama computes them.", max_positions,
    )  # fmt: skip


# HF arguments that `forward` accepts and that change nothing here: `cache_position` indexes a KV
# cache, which this model does not keep; the flash-attention keywords of HF's flattening collator
# describe the same documents as the `position_ids` that come with them.
_NO_OP_HF_KWARGS = ("cache_position",)
_FLASH_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


class NoKVCache:
    """`past_key_values` of `PadFreeLlamaForCausalLM.forward(..., use_cache=True)`: the model keeps
    no KV cache. Passed back to `forward`, it raises, so that a decoding loop written for a cache
    (`model(next_ids, past_key_values=out.past_key_values)`) does not score its new tokens without
    their prefix."""

    def __repr__(self) -> str:
        return "NoKVCache()"


def _check_hf_kwargs(
    hf_kwargs: dict[str, Any], past_key_values: Any, packed: bool, config: PadFreeLlamaConfig, model: str
) -> None:
    """Refuse every HF argument that would change the result and that the model does not implement,
    instead of ignoring it: unset (None or False) is the only accepted value. As in HF, the config's
    `output_attentions` and `output_hidden_states` are those arguments' defaults."""
    if isinstance(past_key_values, NoKVCache):
        raise ValueError(
            "past_key_values=NoKVCache(): this model keeps no KV cache, so a step cannot extend the previous "
            "one. Pass the whole sequence each step (the prompt and the tokens generated so far), or use generate()."
        )
    if past_key_values is not None:
        raise ValueError("past_key_values are not supported: the model recomputes the prefix (use_cache=False).")
    ignored = _NO_OP_HF_KWARGS + (_FLASH_KWARGS if packed else ())
    given = sorted(k for k, v in hf_kwargs.items() if k not in ignored and v is not None and v is not False)
    given += [f"config.{k}" for k in ("output_attentions", "output_hidden_states")
              if hf_kwargs.get(k) is None and getattr(config, k)]  # fmt: skip
    if not given:
        return
    hints = {
        "inputs_embeds": "pass input_ids",
        "output_attentions": "varlen kernels never build attention weights",
        "output_hidden_states": "model.model(...) returns the last hidden state",
        "config.output_attentions": "set it to False; varlen kernels never build attention weights",
        "config.output_hidden_states": "set it to False; model.model(...) returns the last hidden state",
        "num_logits_to_keep": "HF's old name of logits_to_keep, given together with it",
        **{k: "pass position_ids that restart at 0 per document (HF's DataCollatorWithFlattening does)"
           for k in _FLASH_KWARGS},
    }  # fmt: skip
    details = "; ".join(f"{k}: {hints[k]}" if k in hints else k for k in given)
    raise ValueError(f"{model}.forward does not support {', '.join(given)} ({details}).")


def _require_input_ids(input_ids: Tensor | None) -> None:
    if input_ids is None:
        raise ValueError("input_ids is required: the model embeds token ids itself (inputs_embeds are not supported).")


@dataclass
class PadFreeCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus the number of tokens the loss was taken over."""

    num_loss_tokens: Tensor | None = None


class PadFreeLlamaForCausalLM(PadFreePreTrainedModel, GenerationMixin):
    """Drop-in for `LlamaForCausalLM` that runs only real tokens through the network."""

    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: PadFreeLlamaConfig):
        super().__init__(config)
        config = self.config  # converted from a stock LlamaConfig, if that is what was given
        self.model = PadFreeLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.loss_compile_backend: str | None = None  # set by compile_layers; None runs eagerly
        self.post_init()

    def compile_layers(self, backend: str = "inductor") -> None:
        """`torch.compile` the layers (`PadFreeLlamaModel.compile_layers`) and the loss's per-chunk
        softmax gradient, which then makes one fused pass over the `[C,V]` logits instead of several."""
        self.model.compile_layers(backend)
        self.loss_compile_backend = backend

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> PadFreeLlamaForCausalLM:
        """Build with fresh weights from a `PadFreeLlamaConfig` or a stock `LlamaConfig`."""
        if not isinstance(config, PadFreeLlamaConfig):
            config = PadFreeLlamaConfig.from_llama_config(config)
        kwargs.pop("trust_remote_code", None)
        return cls._from_config(config, **kwargs)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        sequence_id: Tensor | None = None,
        labels: Tensor | None = None,
        return_logits: bool | None = None,
        loss_reduction: str = "mean",
        past_key_values: Any = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | Tensor | None = None,
        logits_to_keep: int | Tensor = 0,
        **hf_kwargs: Any,
    ) -> PadFreeCausalLMOutput | tuple[Tensor, ...]:
        """Causal LM forward over `[B,S]` rows: HF padding, or packed documents.

        Args:
            input_ids: (B, S), int64. The batch's tensors may stay on the CPU (pinned) for a model on
                a GPU: the model reads the layout there and copies only the real tokens, so the
                step does not wait for the GPU to drain (on the GPU, unpadding copies flags back).
            attention_mask: (B, S), 1 on real tokens (HF, left or right padding).
            position_ids: (B, S), int64; restart at 0 per document for packed rows (HF padding-free).
            sequence_id: (B, S), int64; document index per row, -1 on padding (LLM-Foundry).
            labels: (B, S), int64, unshifted as in HF; -100 where there is no target. The model
                shifts them within each document: no token is trained on the next document.
            return_logits: `[B,S,V]` logits in the output. Default: yes, except when training with
                labels, where the loss is computed chunk by chunk on real tokens and padded logits
                are never built.
            loss_reduction: `mean` over supervised tokens (HF's loss) or `sum`; the count is in
                `num_loss_tokens` either way, for token-weighted gradient accumulation.
            num_items_in_batch: HF `Trainer`'s count of supervised tokens over all the micro-batches
                of a gradient accumulation step: the loss is then the sum over this micro-batch
                divided by it, as HF's causal-LM loss computes it.
            logits_to_keep: HF's: logits of the last `logits_to_keep` positions only (0: all), or
                of the positions a 1-D tensor lists. Generation asks for the last one.
            return_dict: False returns `to_tuple()` of the output, as HF models do: `(loss, logits,
                num_loss_tokens)` (logits then by default also in training); None: the config's
                `use_return_dict`.
        """
        if "num_logits_to_keep" in hf_kwargs and not logits_to_keep:  # HF's old name, which 4.51 still renames
            logits_to_keep = hf_kwargs.pop("num_logits_to_keep")
        _check_hf_kwargs(hf_kwargs, past_key_values, position_ids is not None, self.config, type(self).__name__)
        _require_input_ids(input_ids)
        if num_items_in_batch is not None and loss_reduction != "mean":
            raise ValueError(
                f"num_items_in_batch={num_items_in_batch} with loss_reduction={loss_reduction!r}: the loss is "
                "already divided by num_items_in_batch; use the default loss_reduction='mean'."
            )

        if return_dict is None:
            return_dict = self.config.use_return_dict
        max_positions = self.config.max_position_embeddings
        with torch.no_grad():  # unpad once, before the embedding
            batch = unpad(
                input_ids, attention_mask, sequence_id, position_ids, labels,
                max_positions if labels is not None or uses_dynamic_rope(self.config) else None,
                self.config.vocab_size,
                _execution_device(self.model.embed_tokens),
            )  # fmt: skip
        if labels is None:
            _warn_past_max_positions(batch.meta, max_positions)
        head_grad = self._deferred_head_grad() if labels is not None else None
        x_TD = self.model.forward_tokens(batch.input_ids_T, batch.meta, head_grad)

        loss = num_loss_tokens = None
        if labels is not None:
            # index_select: its backward scatters the (distinct) rows back without index's sort.
            h_TD, targets_T = x_TD.index_select(0, batch.supervised_T), batch.targets_T[batch.supervised_T]
            reduction = "sum" if num_items_in_batch is not None else loss_reduction
            if _plain(self.lm_head, nn.Linear) and self.lm_head.bias is None:
                loss, num_loss_tokens = linear_cross_entropy(
                    h_TD,
                    self.lm_head.weight,
                    targets_T,
                    self.config.loss_chunk_size,
                    reduction,
                    compile_backend=self.loss_compile_backend,
                    fused=self.config.fused_kernels,
                    deferred_weight_grad=head_grad,
                    all_targets=batch.supervised_have_targets,
                    targets_checked=True,  # `unpad` checked the labels against the vocabulary
                )
            else:  # a wrapped or hooked head (LoRA, a hook) runs as itself, on the supervised tokens
                loss, num_loss_tokens = module_cross_entropy(self.lm_head, h_TD, targets_T, reduction)
            if num_items_in_batch is not None:
                loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        if return_logits is None:  # a tuple starts (loss, logits) as stock Llama's does
            return_logits = labels is None or not self.training or not return_dict
        logits = self._logits(x_TD, batch.meta, logits_to_keep) if return_logits else None
        cache = NoKVCache() if use_cache else None  # asked for by name: a cache that refuses to be extended
        out = PadFreeCausalLMOutput(loss=loss, logits=logits, past_key_values=cache, num_loss_tokens=num_loss_tokens)
        return out if return_dict else out.to_tuple()

    def _deferred_head_grad(self) -> DeferredHeadGrad | None:
        """A hand-over of the loss head's weight gradient to the embedding's backward
        (`_TiedEmbedding`) when the two share one trained weight (tied embeddings) held in 16 bits
        (bf16 parameters, as under FSDP's `PURE` mixed precision), the fused kernels are on and
        usable (CUDA, eager), and both are the plain modules; else None."""
        embed, head, w = self.model.embed_tokens, self.lm_head, self.lm_head.weight
        return (
            DeferredHeadGrad()
            if self.config.fused_kernels
            and torch.is_grad_enabled()
            and w.requires_grad
            and w.dtype in (torch.bfloat16, torch.float16)
            and kernels.usable(w)
            and _plain(embed, nn.Embedding)
            and _plain(head, nn.Linear)
            and embed.weight is w
            and embed.max_norm is None
            and not (embed.scale_grad_by_freq or embed.sparse)
            else None
        )

    def _logits(self, x_TD: Tensor, meta: VarlenMeta, logits_to_keep: int | Tensor) -> Tensor:
        """`[B,S,V]` logits (zeros at padding), or those of the positions `logits_to_keep` selects."""
        if isinstance(logits_to_keep, int) and logits_to_keep == 0:
            return meta.pad(self.lm_head(x_TD))  # re-pad once: [B,S,V]
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return self.lm_head(meta.pad(x_TD)[:, keep])

    def prepare_inputs_for_generation(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        # No KV cache: every step runs the whole (unpadded) prefix; positions follow attention_mask.
        packed = [k for k in ("sequence_id", "position_ids") if kwargs.get(k) is not None]
        if packed:  # they describe the prompt's columns only, and new tokens would not extend them
            raise ValueError(
                f"generate() got {', '.join(packed)}: it decodes one prompt per row. Pass each document as its "
                "own row (padded on the left, with attention_mask) instead of packed rows."
            )
        row = _first_right_padded_row(attention_mask)
        if row is not None:
            raise ValueError(
                f"generate() got row {row} with padding after its real tokens (attention_mask "
                f"{attention_mask[row].tolist()}); new tokens go after the last column, so pad prompts on the left "
                "(tokenizer.padding_side = 'left'), as for stock Llama."
            )
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "logits_to_keep" in kwargs:  # generation reads the last position only
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def _supports_default_dynamic_cache(self) -> bool:
        return False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_decoder(self) -> PadFreeLlamaModel:
        return self.model

    def set_decoder(self, decoder: PadFreeLlamaModel) -> None:
        self.model = decoder

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save a stock Llama checkpoint: HF weight names and a plain `LlamaConfig`, so
        `transformers.LlamaForCausalLM.from_pretrained` (or `AutoModelForCausalLM`) loads it.

        Takes `PreTrainedModel.save_pretrained`'s arguments. With `push_to_hub=True` the upload
        comes after the stock config is written (`push_to_hub` saves again through this method)."""
        bound = inspect.signature(PreTrainedModel.save_pretrained).bind(self, save_directory, *args, **kwargs)
        bound.apply_defaults()
        push = bound.arguments.get("push_to_hub", False)
        if push:
            bound.arguments["push_to_hub"] = False
        super().save_pretrained(*bound.args[1:], **bound.kwargs)
        # `save_config` is the deprecated name of `is_main_process`; HF's method reads either.
        if not bound.arguments.get("kwargs", {}).get("save_config", bound.arguments.get("is_main_process", True)):
            return
        self.config.to_llama_config().save_pretrained(save_directory)
        if push:
            hub_kwargs = dict(bound.arguments.get("kwargs", {}))
            repo_id = hub_kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(save_directory))
            self.push_to_hub(repo_id, token=bound.arguments.get("token"), **hub_kwargs)


def _first_right_padded_row(attention_mask: Tensor | None) -> int | None:
    """The first row with a real token followed by padding (a prompt padded on the right), or None."""
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    rows = (mask[:, :-1] & ~mask[:, 1:]).any(dim=1).nonzero()
    return int(rows[0]) if len(rows) else None


def training_flops(config: PadFreeLlamaConfig, num_params: int, doc_lens: tuple[int, ...] | list[int]) -> int:
    """FLOPs of one training step (forward + backward) over real tokens only.

    `6 N T` for the weights (N non-embedding-lookup parameters, T real tokens) plus the attention
    scores, `12 L d sum(len_i^2)` (PaLM's convention, as LLM-Foundry's MPT uses with `S^2`),
    summed over documents instead of `B S^2` over padded rows. A convention, as LLM-Foundry's
    MFU is: `6 N T` counts the output head on every real token, while the model runs the head
    and loss only on tokens with a target (for fine-tuning with masked prompts the FLOPs executed
    are fewer), and the attention term does not halve for the causal mask.
    """
    d = config.num_attention_heads * _head_dim(config)
    return 6 * num_params * sum(doc_lens) + 12 * config.num_hidden_layers * d * sum(n * n for n in doc_lens)
