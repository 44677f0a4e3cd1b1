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
