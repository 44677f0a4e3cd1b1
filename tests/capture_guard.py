"""A CPU stand-in for CUDA-graph capture: refuse, on any device, what a capture would refuse.

CI has no GPU, and a GPU refuses only while it captures (recurrence.py's loops) or, for the
waits, nowhere at all: they only make training slower. CaptureGuard makes both visible on a
CPU. Inside it, each of these raises CaptureRefused, naming the operation:

- a tensor made from host data (aten.lift_fresh: torch.tensor, new_tensor, as_tensor of a
  list) used by anything but a fill (`x[0] = 0.0` lifts its number only to fill with it, which
  a GPU does from the host's value without a copy); on a GPU such a tensor is copied from the
  host, and capture refuses the copy;
- a read of a value back to the host: `.item()`, `bool()`, `float()`, `int()`, `.tolist()`,
  `.numpy()`, `.cpu()`, aten._local_scalar_dense, aten.equal, aten.is_nonzero;
- an operation whose output's shape depends on the data, which must read it first:
  nonzero (also under boolean-mask indexing), masked_select, unique, repeat_interleave
  without output_size, bincount;
- a random draw from a generator of one's own (capture records only the default one's).

What a CPU cannot show: a copy written as `.to(device)` (same device here, a copy there), and
a CPU tensor given to a GPU operation. scripts/gpu_check.sh covers those on a GPU.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class CaptureRefused(AssertionError):
    """What CUDA-graph capture (or a host that must not wait) would refuse."""


HOST_READS = {  # Tensor methods that bring a value back to the host
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu,
    torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
}
SYNCING_OPS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
DATA_SHAPED_OPS = {  # their output's shape is read from the data
    aten.nonzero.default, aten.masked_select.default, aten._unique.default, aten._unique2.default,
    aten.unique_dim.default, aten.unique_consecutive.default, aten.bincount.default, aten.repeat_interleave.Tensor,
}
LIFTS = {aten.lift_fresh.default, aten.lift_fresh_copy.default}


def refuse(what: str) -> None:
    raise CaptureRefused(f"CUDA-graph capture refuses {what}")


class _HostReads(TorchFunctionMode):
    def __init__(self, guard: "CaptureGuard") -> None:
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.guard.active and func in HOST_READS:
            refuse(f"Tensor.{func.__name__}(): a value read back to the host")
        return func(*args, **(kwargs or {}))


class _DeviceOps(TorchDispatchMode):
    def __init__(self, guard: "CaptureGuard") -> None:
        super().__init__()
        self.guard = guard
        self.lifted: dict[int, weakref.ref] = {}  # tensors made from host data, and their views

    def is_lifted(self, value) -> bool:
        if not isinstance(value, torch.Tensor):
            return False
        held = self.lifted.get(id(value))
        return held is not None and held() is value

    def remember(self, tensor: torch.Tensor) -> None:
        key = id(tensor)
        self.lifted[key] = weakref.ref(tensor, lambda _, key=key: self.lifted.pop(key, None))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.guard.active:
            return func(*args, **kwargs)
        name = func.name()
        if func in SYNCING_OPS:
            refuse(f"{name}: the host waits for a value")
        if func in DATA_SHAPED_OPS:
            refuse(f"{name}: its output's shape depends on the data")
        if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in (args[1] or ())
        ):
            refuse(f"{name} with a boolean mask: it finds the mask's nonzero entries first")
        if kwargs.get("generator") is not None:
            refuse(f"{name} with a generator of its own: capture records the default generator's draws only")
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        lifted_input = any(self.is_lifted(value) for value in inputs)
        output = func(*args, **kwargs)
        if func in LIFTS:
            self.remember(output)
        elif lifted_input and func.is_view:
            for value in torch.utils._pytree.tree_leaves(output):
                if isinstance(value, torch.Tensor):
                    self.remember(value)
        elif lifted_input and "fill" not in name:
            refuse(f"{name} on a tensor made from host data (torch.tensor, new_tensor): a copy from the host; "
                   "make it on the device (new_full, full, zeros)")
        return output


class CaptureGuard:
    """Context manager: inside it, what CUDA-graph capture refuses raises CaptureRefused."""

    def __init__(self) -> None:
        self.active = True

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Let through what the host does on purpose meanwhile (a batch made and sent to the
        device before an update)."""
        self.active = False
        try:
            yield
        finally:
            self.active = True

    def __enter__(self) -> "CaptureGuard":
        self.modes = (_HostReads(self), _DeviceOps(self))
        for mode in self.modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self.modes):
            mode.__exit__(*exc)
