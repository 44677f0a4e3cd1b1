"""Turning `--device auto|cpu|cuda[:N]` into a torch.device, with clear errors."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import UsageError, ZForcingError
from .runconfig import PRECISION_NAMES

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceError(ZForcingError):
    pass


def resolve_device(spec: str) -> torch.device:
    spec = spec.strip().lower()
    if not DEVICE_PATTERN.match(spec):
        raise UsageError(f"Unknown device {spec!r}.", "Use auto, cpu, cuda or cuda:N.")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"--device {spec} was asked for, but CUDA is not available on this machine.",
            "Use --device cpu (or auto), or install a CUDA build of PyTorch on a machine with an NVIDIA GPU.",
        )
    device = torch.device(spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(
            f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s).",
            f"Use cuda:0 .. cuda:{torch.cuda.device_count() - 1}.",
        )
    return device


# --precision: the dtype the forward pass autocasts to (None: none, float32; tf32 only lets a
# GPU's float32 matrix products round their inputs, see tensor_float32).
PRECISIONS = dict(zip(PRECISION_NAMES, (None, None, torch.bfloat16, torch.float16)))
GPU_ONLY = {  # the precisions a CPU refuses, with the hint
    "tf32": "Train on a GPU (--device cuda), or use --precision fp32 here: a CPU has no TensorFloat-32 arithmetic.",
    "fp16": "Train on a GPU (--device cuda), or use --precision bf16 or fp32 here.",
}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be fp32, tf32, bf16 or fp16, not {precision!r}.",
                         "fp32 is exact; tf32, bf16 and fp16 are faster on GPUs.")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """What the forward pass of training autocasts to for `precision` on `device`: bf16 on a
    GPU that has it or on the CPU; fp16 only on a GPU (its gradient scaler is a GPU tool);
    tf32 (no autocast: see tensor_float32) only on a GPU that has it."""
    check_precision(precision)
    if precision in GPU_ONLY and device.type != "cuda":
        raise UsageError(
            f"--precision {precision} needs a CUDA device, and this training runs on the {device.type.upper()}.",
            GPU_ONLY[precision],
        )
    if precision == "tf32" and torch.cuda.get_device_capability(device)[0] < 8:
        raise DeviceError(
            f"--precision tf32: {torch.cuda.get_device_name(device)} has no TensorFloat-32 tensor cores (NVIDIA Ampere and later have them).",
            "Use --precision fp32 (or fp16) on this GPU.",
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(
            f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 arithmetic.",
            "Use --precision fp16 on this GPU (or fp32).",
        )
    return PRECISIONS[precision]


@contextmanager
def tensor_float32(on: bool) -> Iterator[None]:
    """With on, float32 matrix products on a GPU meanwhile use TensorFloat-32 tensor cores: their
    inputs rounded to 10 bits of mantissa, their sums kept in float32 (torch's default already
    lets cuDNN's LSTM do so, not cuBLAS's products). Without on, the setting is left as it is."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = before or on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
