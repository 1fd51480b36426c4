"""Quantized base layers (QLoRA-style): bitsandbytes Linear4bit and Linear8bitLt under CGC-LoRA.

    y = base(x) [no_grad, the layer's own kernels]  +  cgc_lora(x, ...)  [added in place]
    dx = dy @ dequantize(W)                           [computed here, not by bitsandbytes]

Why the base layer's input gradient is computed here: on CPU, a Linear4bit's first forward under
torch.no_grad() in eval mode (an evaluation) repacks its weight for inference, and every later
forward runs `gemv_4bit`, which has no autograd formula, so gradients silently stop at that layer
and the LoRA experts of every earlier layer stop learning. `frozen_base_forward` therefore calls
the base layer without autograd and supplies dx = dy W itself, dequantizing the weight in the
backward (whatever its packing), as QLoRA's own backward does. The weight is frozen, so dx is
the only gradient the base layer owes.

Merging into a quantized base would requantize the merged weight (and lose the update in 4-bit
rounding), so merging is refused; `dequantized_linear` builds the full-precision nn.Linear that
`CGCModel.merge_task(task, dequantize=True)` uses instead.

bitsandbytes is imported lazily: the rest of the package works without it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# Class names of the bitsandbytes layers handled here (subclasses included: LinearNF4, LinearFP4).
_BNB_4BIT = "Linear4bit"
_BNB_8BIT = "Linear8bitLt"


def _bnb_kind(module: nn.Module) -> str | None:
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes"):
            if cls.__name__ == _BNB_4BIT:
                return "4bit"
            if cls.__name__ == _BNB_8BIT:
                return "8bit"
    return None


def quantization_kind(module: nn.Module) -> str | None:
    """"4bit" for a bitsandbytes Linear4bit, "8bit" for a Linear8bitLt holding int8 weights,
    None for anything else (nn.Linear, Conv1D, an 8-bit layer that keeps fp16 weights)."""
    kind = _bnb_kind(module)
    weight = getattr(module, "weight", None)
    if kind is None or weight is None or weight.dtype.is_floating_point:
        return None  # not quantized (yet): its weight is a plain floating tensor
    return kind


def is_quantized(module: nn.Module) -> bool:
    """True for a base layer whose weight is stored quantized (bitsandbytes 4-bit or int8)."""
    return quantization_kind(module) is not None


def expert_dtype(base: nn.Module) -> torch.dtype:
    """The dtype of LoRA experts on `base`: its weight's dtype when floating; for a quantized
    base the bitsandbytes compute dtype of a 4-bit layer, else float32."""
    weight = getattr(base, "weight", None)
    if weight is not None and weight.dtype.is_floating_point:
        return weight.dtype
    if quantization_kind(base) == "4bit" and getattr(base, "compute_dtype", None) is not None:
        return base.compute_dtype
    return torch.float32


@torch.no_grad()
def dequantize_weight(base: nn.Module) -> torch.Tensor:
    """[d_out, d_in] float32 weight that `base` computes with (dequantized for a quantized base).

    A 4-bit weight repacked for CPU inference (quant_state.packing_format_for_cpu) is unpacked
    on copies, so the layer itself keeps its fast inference format."""
    kind = quantization_kind(base)
    weight = base.weight
    if kind is None:
        w = weight.T if type(base).__name__ == "Conv1D" else weight  # GPT-2: [d_in, d_out]
        return w.detach().float()
    import bitsandbytes.functional as bf

    if kind == "4bit":
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            data, state = _unpack_cpu_4bit(data, state)
        return bf.dequantize_4bit(data, state).float()
    # int8: row-wise absmax scaling, W = CB * SCB / 127. The int8 codes stay in `weight` on
    # recent releases; older ones moved them to `state.CB` after the first forward.
    state = getattr(base, "state", None)
    cb = weight.data if weight.dtype == torch.int8 else getattr(state, "CB", None)
    scb = getattr(weight, "SCB", None)
    if scb is None and state is not None:
        scb = state.SCB
    if cb is None or scb is None:
        raise ValueError(f"cannot dequantize {type(base).__name__}: no int8 codes / scales (SCB) found")
    return cb.float() * (scb.float().unsqueeze(1) / 127.0)


def _unpack_cpu_4bit(data: torch.Tensor, state):
    """(packed data, quant_state) of bitsandbytes' CPU inference layout -> the standard layout,
    without touching the layer's own tensors."""
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError as e:  # the layout is bitsandbytes' own; only its inverse can read it
        raise ValueError(
            "this bitsandbytes 4-bit weight is in the CPU inference layout, and the installed "
            "bitsandbytes has no inverse for it; use bitsandbytes>=0.50"
        ) from e
    state = copy.copy(state)  # the inverse writes into the state it is given
    # Keep absmax in float32 instead of re-quantizing it (the nested path): exact, and simpler.
    state.original_nested = False
    data, state = _convert_weight_packed_for_cpu_inverse(data.clone(), state)
    if state.absmax.dim() == 2:  # the CPU layout stores absmax as [d_in / blocksize, d_out]
        state.absmax = state.absmax.T.reshape(-1)
    state.absmax = state.absmax.float()
    state.dtype = torch.float32
    return data, state


class _FrozenBase(torch.autograd.Function):
    """y = base(x) without autograd; dx = dy @ W with W dequantized in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        ctx.base = base
        with torch.no_grad():
            y = base(x)
        # The LoRA delta is added into y in place; autograd forbids that on a view made inside a
        # Function (bitsandbytes reshapes its result), so return a tensor of its own.
        return y.clone() if y._is_view() or y is x else y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        w = dequantize_weight(ctx.base)  # [d_out, d_in]
        dx = (dy.to(torch.float32) @ w).to(dy.dtype)
        return dx, None


class _InputGrad(torch.autograd.Function):
    """Gives y, computed by `base` from a detached x, the input gradient dx = dy @ W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module, holder: list) -> torch.Tensor:
        # y travels in a list so autograd sees it as a fresh output, not an input returned as is.
        ctx.base = base
        y = holder[0]
        return y.clone() if y._is_view() else y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return _FrozenBase.backward(ctx, dy)[0], None, None


def _detach_input_hook(module: nn.Module, args: tuple):
    """Forward pre-hook: run the quantized layer on a detached input (no bitsandbytes autograd)."""
    if torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
        module._cgc_grad_input = args[0]
        return (args[0].detach(), *args[1:])
    return None


def _attach_grad_hook(module: nn.Module, args: tuple, output: torch.Tensor):
    """Forward hook: connect the output to the original input through dx = dy @ dequantize(W)."""
    x = module.__dict__.pop("_cgc_grad_input", None)
    if x is None:
        return None
    return _InputGrad.apply(x, module, [output])


def guard_quantized_layers(model: nn.Module, exclude: set[str] | list[str] = ()) -> list:
    """Make every quantized linear layer of `model` (except those at or under the module paths in
    `exclude`: CGC-LoRA layers handle their base themselves) pass gradients to its input through
    its dequantized weight instead of bitsandbytes' autograd; returns the hook handles (call
    .remove() on each to undo).

    Needed for the layers no adapter wraps too: an attention output projection left quantized
    sits between the adapted q/v projections and the loss."""
    prefixes = tuple(e + "." for e in exclude)
    exclude = set(exclude)
    handles = []
    for name, module in model.named_modules():
        if name and name not in exclude and not name.startswith(prefixes) and is_quantized(module):
            handles.append(module.register_forward_pre_hook(_detach_input_hook))
            handles.append(module.register_forward_hook(_attach_grad_hook))
    return handles


def frozen_base_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """base(x) [..., d_in] -> [..., d_out] for a frozen (quantized) base layer, with the input
    gradient computed from the dequantized weight (see the module docstring for why)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return base(x)
    y = _FrozenBase.apply(x, base)
    if y.dtype != x.dtype:  # bitsandbytes returns the input's dtype; keep dx's dtype consistent
        y = y.to(x.dtype)
    return y


@torch.no_grad()
def dequantized_linear(base: nn.Module, dtype: torch.dtype, delta: torch.Tensor | None = None) -> nn.Linear:
    """A full-precision nn.Linear equal to `base` (dequantized) plus `delta` [d_out, d_in]."""
    weight = dequantize_weight(base)
    if delta is not None:
        weight = weight + delta.to(weight.device, torch.float32)
    d_out, d_in = weight.shape
    bias = getattr(base, "bias", None)
    out = nn.Linear(d_in, d_out, bias=bias is not None, device=weight.device, dtype=dtype)
    out.weight.copy_(weight)
    if bias is not None:
        out.bias.copy_(bias.float())
    return out


def dequantize_model_(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace, in place, every quantized linear layer of `model` by its dequantized nn.Linear
    and drop the quantization markers transformers keeps, so the model saves and reloads as a
    plain full-precision model. `dtype` defaults to the input embeddings' dtype (float32 if none).
    Returns `model`."""
    if dtype is None:
        dtype = model_activation_dtype(model)
    for name, module in list(model.named_modules()):
        if name and is_quantized(module):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, dequantized_linear(module, dtype))
    strip_quantization_markers_(model)
    return model


def strip_quantization_markers_(model: nn.Module) -> None:
    """Forget that `model` was loaded quantized (config.quantization_config, hf_quantizer, flags)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if attr in vars(model):
            setattr(model, attr, False)


def model_activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations run in: the input embeddings' (float32 if the model has none)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.dtype.is_floating_point:
        return weight.dtype
    return torch.float32


def has_quantized_layers(model: nn.Module) -> bool:
    """True if any module of `model` is a quantized linear layer."""
    return any(is_quantized(m) for m in model.modules())
