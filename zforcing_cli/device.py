"""Turning `--device auto|cpu|cuda[:N]` into a torch.device, with clear errors."""

from __future__ import annotations

import re

import torch

from .errors import UsageError, ZForcingError

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


# --precision: the dtype the forward pass autocasts to (None: none, plain float32).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be fp32, bf16 or fp16, not {precision!r}.", "fp32 is exact; bf16 and fp16 are faster on GPUs.")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """What the forward pass of training autocasts to for `precision` on `device`: bf16 on a
    GPU that has it or on the CPU; fp16 only on a GPU (its gradient scaler is a GPU tool)."""
    check_precision(precision)
    if precision == "fp16" and device.type != "cuda":
        raise UsageError(
            f"--precision fp16 needs a CUDA device, and this training runs on the {device.type.upper()}.",
            "Train on a GPU (--device cuda), or use --precision bf16 or fp32 here.",
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(
            f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 arithmetic.",
            "Use --precision fp16 on this GPU (or fp32).",
        )
    return PRECISIONS[precision]
