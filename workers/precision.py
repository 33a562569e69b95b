"""The numeric precision a text model runs in: float32, bfloat16, float16, or int8 Linear layers.

``int8`` is dynamic quantization of every ``nn.Linear`` (the LM head included) with torch's own
quantized kernels (``torch.ops.quantized.linear_dynamic``, fbgemm/oneDNN, CPU only): weights are
quantized once per output channel, activations on the fly. torch's stock dynamic Linear
(``torch.ao.quantization.quantize_dynamic``) picks one activation scale for the whole input
tensor, so a row's numbers would depend on what else shares its batch, and an item's output on
its batch-mates. :class:`RowScaledInt8Linear` scales each token's activations to [-1, 1] first
and appends one fixed row spanning [-1, 1], so the kernel's per-tensor scale is always the same
and every row is quantized on its own: the int8 layers give a row the same numbers whatever
shares its batch, given the same input. The float parts are not exactly batch-independent
(attention's sums over a row's left padding), and a last-bit change there can move a token's
scale or rounding, so a whole model's int8 output still depends a little on its batch-mates.
Activations keep 8 bits; weights keep 8 where the kernel has VNNI and 7 where it does not
(:func:`kernel_saturates`).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


class PrecisionError(ValueError):
    """A precision this device cannot run (int8 on a GPU, an unknown name)."""


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete precision for ``device``. ``auto``: on CPU, bf16 where the CPU computes it
    natively (AMX, AVX512-BF16), else int8 (both faster than fp32 with quality within the guard:
    docs/benchmarks.md), else fp32; on GPUs bf16 where supported, else fp16."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown text precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        if precision == "int8":
            raise PrecisionError("int8 (dynamic quantization) runs on CPU only; on a GPU use bf16 "
                                 "or fp16 (AIGC_TEXT_PRECISION=auto picks one)")
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return precision
    if precision == "auto":
        if has_native_bf16():
            return "bf16"
        engines = torch.backends.quantized.supported_engines
        return "int8" if "fbgemm" in engines or "x86" in engines else "fp32"
    return precision


def load_dtype(precision: str) -> torch.dtype:
    """The dtype to load weights in for ``precision`` (int8 quantizes from float32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        return frozenset(Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").split())
    except OSError:  # not Linux: assume the least
        return frozenset()


def has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16), where oneDNN makes
    bf16 faster than int8 and fp32 (benchmarks/text_vs_peer.py); elsewhere bf16 is emulated."""
    return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


@functools.cache
def kernel_saturates() -> bool:
    """Whether torch's int8 kernel adds pairs of u8 x s8 products in 16 bits, as fbgemm does
    without VNNI (``vpmaddubsw``, AVX2 and AVX512 alike): two products of 255 x 127 then
    overflow and the sum saturates. Asked of the kernel itself, since which code it runs depends
    on more than the CPU's flags (``FBGEMM_ENABLE_INSTRUCTIONS``, no VEX AVX-VNNI in fbgemm)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weight = torch.quantize_per_channel(torch.ones(8, 64), torch.full((8,), 1 / 127, dtype=torch.double),
                                            torch.zeros(8, dtype=torch.long), 0, torch.qint8)  # every weight 127
        x = torch.ones(2, 64)
        x[:, 0] = -1.0  # range [-1, 1]: 1.0 is quantized to 255
        out = torch.ops.quantized.linear_dynamic(x, torch.ops.quantized.linear_prepack(weight, None),
                                                 reduce_range=False)
    return bool((out - 62.0).abs().max() > 1.0)  # exactly 62 without saturation, about 0.5 with


class RowScaledInt8Linear(nn.Module):
    """``nn.Linear`` with int8 weights (one scale per output channel) and int8 activations
    quantized per token, through torch's dynamic quantized Linear kernel.

    The kernel quantizes its whole input with one scale from the input's min and max. Each token
    is divided by its own largest magnitude (so it lies in [-1, 1]) and a fixed row holding -1
    and 1 is appended: the kernel's range is then always [-1, 1], whatever shares the batch, and
    the output row is multiplied back by the token's scale.
    """

    def __init__(self, linear: nn.Module, weight_levels: int | None = None):
        super().__init__()
        # Where the kernel saturates (above), weights keep 7 bits (±63) so that two products of
        # a full 8-bit activation never leave 16 bits. The alternative, torch's reduce_range (7-bit
        # activations), lost more: next-token agreement with fp32 83.9% against 88.6%
        # (docs/benchmarks.md); where it does not saturate, 8 bits of each give 91.9%.
        self.weight_levels = weight_levels or (63 if kernel_saturates() else 127)
        weight = linear.weight.detach().float()  # (out, in)
        if type(linear).__name__ == "Conv1D":  # GPT-2's Linear keeps its weight as (in, out)
            weight = weight.t().contiguous()
        self.out_features, self.in_features = weight.shape
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / self.weight_levels  # (out,) symmetric per channel
        qweight = torch.quantize_per_channel(weight, scales.double(), torch.zeros_like(scales, dtype=torch.long),
                                             0, torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(),
                                                                 requires_grad=False)
        span = torch.zeros(1, self.in_features)
        span[0, 0], span[0, -1] = 1.0, -1.0
        self.register_buffer("span", span, persistent=False)  # (1, in): fixes the kernel's range
        self.weight_bytes = weight.numel() + scales.numel() * 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features).float()  # (N, in)
        scale = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)  # (N, 1)
        rows = torch.cat([flat / scale, self.span])  # (N + 1, in), every row within [-1, 1]
        out = torch.ops.quantized.linear_dynamic(rows, self._packed, reduce_range=False)[:-1] * scale
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)  # (..., out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel/token, "
                f"weights ±{self.weight_levels}")


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (and transformers' ``Conv1D``, GPT-2's Linear)
    in place by :class:`RowScaledInt8Linear`."""
    from transformers.pytorch_utils import Conv1D

    with warnings.catch_warnings():  # torch.ao announces its move to torchao; the kernels stay
        warnings.simplefilter("ignore")
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) in (nn.Linear, Conv1D):
                    setattr(parent, name, RowScaledInt8Linear(child))
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by int8 weights packed outside the module's parameters."""
    return sum(m.weight_bytes for m in model.modules() if isinstance(m, RowScaledInt8Linear))
