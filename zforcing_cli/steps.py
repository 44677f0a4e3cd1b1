"""What every implementation of the recurrence's loops shares (recurrence.py's Python loops,
fused_cpu.py's compiled ones, fused_gpu.py's Triton kernels): the nonlinearity's constants, and
how a step's products run on a CPU (through oneDNN or not, on how many threads)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

# On CPU, oneDNN multiplies a batch of rows by a weight it has reordered once faster
# than MKL's general product (measured on a 2-core AMD EPYC with 32 rows of 1024 by 4608), but
# it costs more per call: below about this many weight elements the plain product wins.
ONEDNN_MIN_WEIGHT = 1 << 18

LEAK = 1.0 / 3.0  # slope of the clipped leaky ReLU below zero
CLIP = 3.0  # its output range


def onednn_ready(weight: Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.numel() >= ONEDNN_MIN_WEIGHT
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


SERIAL_MAX_WORK = 1 << 21  # see step_threads


@contextmanager
def step_threads(from_h_weight: Tensor, rows: int):
    """One CPU thread for a loop whose per-step product by from_h_weight has fewer than
    SERIAL_MAX_WORK multiply-adds. Such a step is a dozen operations on tensors too small to
    share between threads: a second thread only adds a barrier to every product, where it waits
    (on a busy or virtual machine, for as long as its core is taken away)."""
    threads = torch.get_num_threads()
    serial = from_h_weight.device.type == "cpu" and rows * from_h_weight.numel() < SERIAL_MAX_WORK and threads > 1
    if serial:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if serial:
            torch.set_num_threads(threads)


def weight_gradients(d_from_h: Tensor, d_stats: Tensor, states: Tensor, zs: Tensor, hidden: Tensor) -> tuple[Tensor, ...]:
    """The gradients of W_fh, W_z, W_o and b_o from the backward loop's time-major d_from_h
    (T, B, 4H+M) and d_stats (T, B, 2Z): each one product over all B·T rows, not one per step."""
    steps, batch, _ = d_from_h.shape
    size, latent = states.shape[-1], zs.shape[-1]
    rows = steps * batch
    d_from_h_rows, d_stats_rows = d_from_h.view(rows, -1), d_stats.view(rows, -1)
    d_from_h_weight = d_from_h_rows.t() @ states[:-1].reshape(rows, size)
    d_z_weight = d_from_h_rows[:, :4 * size].t() @ zs.reshape(rows, latent)
    d_out_weight = d_stats_rows.t() @ hidden.reshape(rows, -1)
    return d_from_h_weight, d_z_weight, d_out_weight, d_stats_rows.sum(0)
