"""The recurrence's two loops as persistent Triton kernels, for a GPU: each loop one kernel.

recurrence.py's loops replay about a dozen small kernels per step from a CUDA graph; at 784
steps that is about 19,000 kernels per update, whatever the width, and at 64 units they are
most of it (an update 4.3 to 5.7 times the fused LSTM pair's on an H200). Here each loop is one
kernel that walks through time itself, as persistent RNN kernels do: one program per block of
16 sequences of the batch (sequences are independent, so the programs never wait for each
other), h_t and c_t kept in registers from one step to the next, the weights read from the
cache at every step. Each program computes, per step, exactly what `rollout` and
`backpropagate` compute and writes the same buffers; the weight gradients are then one product
over all B·T rows each, as there.

Taken only when ZFORCING_TRITON_LOOPS=1, on a CUDA device, in float32, with Triton installed,
and at widths up to MAX_WIDTH (a program keeps its rows' states and each step's gate block in
registers). It has been checked against the Python loops and the autograd reference in Triton's
interpreter on a CPU (TRITON_INTERPRET=1, tests/test_fused_gpu.py), not yet timed on a GPU:
`scripts/gpu_check.sh` times it beside the CUDA-graph loops, and the tests run it on the GPU.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch
from torch import Tensor

from .steps import CLIP, LEAK, weight_gradients

tl = None  # triton.language (an optional dependency), imported when the kernels are first made

SWITCH = "ZFORCING_TRITON_LOOPS"
ROWS = 16  # sequences per program: the smallest block tl.dot takes
MAX_WIDTH = 128  # hidden, MLP and latent sizes up to this: a padded 128 x 128 float32 weight block is 64 KiB


def enabled() -> bool:
    return os.environ.get(SWITCH, "0").strip().lower() in ("1", "on", "true", "yes")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def suits(reference: Tensor, *weights: Tensor) -> bool:
    if not (enabled() and reference.is_cuda and reference.dtype == torch.float32 and triton_available()):
        return False
    from_h_weight, z_weight, out_weight = weights
    size, latent, mlp = from_h_weight.shape[1], z_weight.shape[1], out_weight.shape[1]
    return max(size, latent, mlp) <= MAX_WIDTH


def loops(reference: Tensor, *weights: Tensor) -> tuple | None:
    """(rollout, backpropagate) as Triton kernels, where they suit the call; else None."""
    return (triton_rollout, triton_backpropagate) if suits(reference, *weights) else None


# ---------------------------------------------------------------------------------------------
# The kernels. Written as plain functions and handed to triton.jit on first use, so that the
# interpreter (TRITON_INTERPRET=1, read when they are made) can run them on a CPU in the tests.
# tl.dot's blocks are at least 16 on a side: sizes are padded to powers of two from 16, the
# padding loaded as zeros and never stored. Only Triton's builtins are called (tl.sigmoid and
# tl.zeros are jitted library functions, which the interpreter runs only when TRITON_INTERPRET
# was set before triton was imported).


def rollout_kernel(gates_in, post_in, noise, w_fh, w_z, w_out, b_out,
                   states, cells, activations, tanh_cells, hiddens, raw_stats, stats, zs,
                   batch, steps, scalars,
                   H: tl.constexpr, M: tl.constexpr, Z: tl.constexpr,
                   HP: tl.constexpr, MP: tl.constexpr, ZP: tl.constexpr,
                   BB: tl.constexpr, PRECISION: tl.constexpr):
    G = 4 * H
    F = G + M
    clamp, leak, clip = tl.load(scalars), tl.load(scalars + 1), tl.load(scalars + 2)  # at the data's precision
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    row_ok = rows < batch
    rows64 = rows.to(tl.int64)
    ch, cm, cz = tl.arange(0, HP), tl.arange(0, MP), tl.arange(0, ZP)
    kh, km, kz = ch[:, None], cm[:, None], cz[:, None]  # the inner dimension of a product, as rows
    h_ok, m_ok, z_ok = ch < H, cm < M, cz < Z
    rh = row_ok[:, None] & h_ok[None, :]
    rm = row_ok[:, None] & m_ok[None, :]
    rz = row_ok[:, None] & z_ok[None, :]
    # The weights' transposes as (in, out) blocks: x W^T = tl.dot(x, block).
    hh = h_ok[:, None] & h_ok[None, :]
    w_i = w_fh + (0 * H + ch[None, :]) * H + kh
    w_f = w_fh + (1 * H + ch[None, :]) * H + kh
    w_g = w_fh + (2 * H + ch[None, :]) * H + kh
    w_o = w_fh + (3 * H + ch[None, :]) * H + kh
    w_post = w_fh + (G + cm[None, :]) * H + kh
    hm = h_ok[:, None] & m_ok[None, :]
    wz_i = w_z + (0 * H + ch[None, :]) * Z + kz
    wz_f = w_z + (1 * H + ch[None, :]) * Z + kz
    wz_g = w_z + (2 * H + ch[None, :]) * Z + kz
    wz_o = w_z + (3 * H + ch[None, :]) * Z + kz
    zh = z_ok[:, None] & h_ok[None, :]
    wo_mean = w_out + cz[None, :] * M + km
    wo_logvar = w_out + (Z + cz[None, :]) * M + km
    mz = m_ok[:, None] & z_ok[None, :]
    bias_mean = tl.load(b_out + cz, mask=z_ok, other=0.0)[None, :]
    bias_logvar = tl.load(b_out + Z + cz, mask=z_ok, other=0.0)[None, :]

    h = tl.full((BB, HP), 0.0, gates_in.dtype.element_ty)
    c = tl.full((BB, HP), 0.0, gates_in.dtype.element_ty)
    tl.store(states + rows64[:, None] * H + ch[None, :], h, mask=rh)
    tl.store(cells + rows64[:, None] * H + ch[None, :], c, mask=rh)
    for t in range(steps):
        at_h = (t * batch + rows64)[:, None] * H + ch[None, :]  # time-major (T, B, ·) buffers
        at_m = (t * batch + rows64)[:, None] * M + cm[None, :]
        at_z = (t * batch + rows64)[:, None] * Z + cz[None, :]
        at_stats = (t * batch + rows64)[:, None] * (2 * Z) + cz[None, :]
        at_gates = (t * batch + rows64)[:, None] * G + ch[None, :]
        step_in = rows64[:, None] * steps + t  # batch-first (B, T, ·) inputs
        # q(z_t | h_{t-1}, b_t): clamp(lrelu(h W_post,h^T + post_in_t)) -> [mean, logvar]
        a = tl.dot(h, tl.load(w_post, mask=hm, other=0.0), input_precision=PRECISION)
        a += tl.load(post_in + step_in * M + cm[None, :], mask=rm, other=0.0)
        hidden = tl.where(a > 0, a, a * leak)
        hidden = tl.where(hidden < -clip, -clip, tl.where(hidden > clip, clip, hidden))
        tl.store(hiddens + at_m, hidden, mask=rm)
        raw_mean = tl.dot(hidden, tl.load(wo_mean, mask=mz, other=0.0), input_precision=PRECISION) + bias_mean
        raw_logvar = tl.dot(hidden, tl.load(wo_logvar, mask=mz, other=0.0), input_precision=PRECISION) + bias_logvar
        tl.store(raw_stats + at_stats, raw_mean, mask=rz)
        tl.store(raw_stats + at_stats + Z, raw_logvar, mask=rz)
        mean = tl.where(raw_mean < -clamp, -clamp, tl.where(raw_mean > clamp, clamp, raw_mean))
        logvar = tl.where(raw_logvar < -clamp, -clamp, tl.where(raw_logvar > clamp, clamp, raw_logvar))
        tl.store(stats + at_stats, mean, mask=rz)
        tl.store(stats + at_stats + Z, logvar, mask=rz)
        z = mean + tl.exp(logvar * 0.5) * tl.load(noise + step_in * Z + cz[None, :], mask=rz, other=0.0)
        tl.store(zs + at_z, z, mask=rz)
        # The forward LSTM of Eq. 4: gates_in_t + h W_hh^T + z_t W_z^T
        at_in = step_in * G + ch[None, :]
        gi = tl.load(gates_in + at_in, mask=rh, other=0.0) + tl.dot(h, tl.load(w_i, mask=hh, other=0.0), input_precision=PRECISION) \
            + tl.dot(z, tl.load(wz_i, mask=zh, other=0.0), input_precision=PRECISION)
        gf = tl.load(gates_in + at_in + H, mask=rh, other=0.0) + tl.dot(h, tl.load(w_f, mask=hh, other=0.0), input_precision=PRECISION) \
            + tl.dot(z, tl.load(wz_f, mask=zh, other=0.0), input_precision=PRECISION)
        gg = tl.load(gates_in + at_in + 2 * H, mask=rh, other=0.0) + tl.dot(h, tl.load(w_g, mask=hh, other=0.0), input_precision=PRECISION) \
            + tl.dot(z, tl.load(wz_g, mask=zh, other=0.0), input_precision=PRECISION)
        go = tl.load(gates_in + at_in + 3 * H, mask=rh, other=0.0) + tl.dot(h, tl.load(w_o, mask=hh, other=0.0), input_precision=PRECISION) \
            + tl.dot(z, tl.load(wz_o, mask=zh, other=0.0), input_precision=PRECISION)
        i = 1.0 / (1.0 + tl.exp(-gi))  # sigmoid
        f = 1.0 / (1.0 + tl.exp(-gf))
        g = 2.0 / (1.0 + tl.exp(-2.0 * gg)) - 1.0  # tanh
        o = 1.0 / (1.0 + tl.exp(-go))
        tl.store(activations + at_gates, i, mask=rh)
        tl.store(activations + at_gates + H, f, mask=rh)
        tl.store(activations + at_gates + 2 * H, g, mask=rh)
        tl.store(activations + at_gates + 3 * H, o, mask=rh)
        c = f * c + i * g
        tanh_c = 2.0 / (1.0 + tl.exp(-2.0 * c)) - 1.0
        h = o * tanh_c
        tl.store(tanh_cells + at_h, tanh_c, mask=rh)
        tl.store(states + at_h + batch * H, h, mask=rh)  # h_0..h_T: step t writes h_{t+1}
        tl.store(cells + at_h + batch * H, c, mask=rh)


def backward_kernel(cells, activations, tanh_cells, hiddens, raw_stats, stats, noise, w_fh, w_z, w_out,
                    d_states, d_z, d_mean, d_logvar, d_cell_last, d_from_h, d_stats, d_noise,
                    batch, steps, scalars,
                    H: tl.constexpr, M: tl.constexpr, Z: tl.constexpr,
                    HP: tl.constexpr, MP: tl.constexpr, ZP: tl.constexpr,
                    BB: tl.constexpr, PRECISION: tl.constexpr):
    G = 4 * H
    F = G + M
    clamp, leak, clip = tl.load(scalars), tl.load(scalars + 1), tl.load(scalars + 2)  # at the data's precision
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    row_ok = rows < batch
    rows64 = rows.to(tl.int64)
    ch, cm, cz = tl.arange(0, HP), tl.arange(0, MP), tl.arange(0, ZP)
    kh, km, kz = ch[:, None], cm[:, None], cz[:, None]
    h_ok, m_ok, z_ok = ch < H, cm < M, cz < Z
    rh = row_ok[:, None] & h_ok[None, :]
    rm = row_ok[:, None] & m_ok[None, :]
    rz = row_ok[:, None] & z_ok[None, :]
    # The weights themselves as (out, in) blocks: d (x W^T) / dx = tl.dot(d, block).
    hh = h_ok[:, None] & h_ok[None, :]
    w_i = w_fh + (0 * H + kh) * H + ch[None, :]
    w_f = w_fh + (1 * H + kh) * H + ch[None, :]
    w_g = w_fh + (2 * H + kh) * H + ch[None, :]
    w_o = w_fh + (3 * H + kh) * H + ch[None, :]
    w_post = w_fh + (G + km) * H + ch[None, :]
    mh = m_ok[:, None] & h_ok[None, :]
    wz_i = w_z + (0 * H + kh) * Z + cz[None, :]
    wz_f = w_z + (1 * H + kh) * Z + cz[None, :]
    wz_g = w_z + (2 * H + kh) * Z + cz[None, :]
    wz_o = w_z + (3 * H + kh) * Z + cz[None, :]
    hz = h_ok[:, None] & z_ok[None, :]
    wo_mean = w_out + kz * M + cm[None, :]
    wo_logvar = w_out + (Z + kz) * M + cm[None, :]
    zm = z_ok[:, None] & m_ok[None, :]

    dh = tl.load(d_states + (rows64[:, None] * (steps + 1) + steps) * H + ch[None, :], mask=rh, other=0.0)
    dc_next = tl.load(d_cell_last + rows64[:, None] * H + ch[None, :], mask=rh, other=0.0)
    for back in range(steps):
        t = steps - 1 - back
        at_h = (t * batch + rows64)[:, None] * H + ch[None, :]
        at_m = (t * batch + rows64)[:, None] * M + cm[None, :]
        at_stats = (t * batch + rows64)[:, None] * (2 * Z) + cz[None, :]
        at_gates = (t * batch + rows64)[:, None] * G + ch[None, :]
        at_from_h = (t * batch + rows64)[:, None] * F
        step_z = (rows64[:, None] * steps + t) * Z + cz[None, :]  # batch-first (B, T, Z)
        # dh_t is complete: the gates' gradients and dc_t (sigmoid' = s(1 - s), tanh' = 1 - t²)
        i = tl.load(activations + at_gates, mask=rh, other=0.0)
        f = tl.load(activations + at_gates + H, mask=rh, other=0.0)
        g = tl.load(activations + at_gates + 2 * H, mask=rh, other=0.0)
        o = tl.load(activations + at_gates + 3 * H, mask=rh, other=0.0)
        tanh_c = tl.load(tanh_cells + at_h, mask=rh, other=0.0)
        c_prev = tl.load(cells + at_h, mask=rh, other=0.0)
        dc = dc_next + dh * (o * (1.0 - tanh_c * tanh_c))
        di = (g * (1.0 - i) * i) * dc
        df = (c_prev * (1.0 - f) * f) * dc
        dg = (i * (1.0 - g * g)) * dc
        do = (tanh_c * (1.0 - o) * o) * dh
        dc_next = dc * f
        tl.store(d_from_h + at_from_h + ch[None, :], di, mask=rh)
        tl.store(d_from_h + at_from_h + H + ch[None, :], df, mask=rh)
        tl.store(d_from_h + at_from_h + 2 * H + ch[None, :], dg, mask=rh)
        tl.store(d_from_h + at_from_h + 3 * H + ch[None, :], do, mask=rh)
        # dz_t in full, then q's statistics where the clamp let them through
        dz = tl.load(d_z + step_z, mask=rz, other=0.0)
        dz += tl.dot(di, tl.load(wz_i, mask=hz, other=0.0), input_precision=PRECISION)
        dz += tl.dot(df, tl.load(wz_f, mask=hz, other=0.0), input_precision=PRECISION)
        dz += tl.dot(dg, tl.load(wz_g, mask=hz, other=0.0), input_precision=PRECISION)
        dz += tl.dot(do, tl.load(wz_o, mask=hz, other=0.0), input_precision=PRECISION)
        raw_mean = tl.load(raw_stats + at_stats, mask=rz, other=0.0)
        raw_logvar = tl.load(raw_stats + at_stats + Z, mask=rz, other=0.0)
        mean_passes = tl.where((raw_mean >= -clamp) & (raw_mean <= clamp), 1.0, 0.0)
        logvar_passes = tl.where((raw_logvar >= -clamp) & (raw_logvar <= clamp), 1.0, 0.0)
        std = tl.exp(tl.load(stats + at_stats + Z, mask=rz, other=0.0) * 0.5)
        eps = tl.load(noise + step_z, mask=rz, other=0.0)
        d_m = tl.load(d_mean + step_z, mask=rz, other=0.0) * mean_passes + dz * mean_passes
        d_l = tl.load(d_logvar + step_z, mask=rz, other=0.0) * logvar_passes + dz * (0.5 * eps * std * logvar_passes)
        tl.store(d_stats + at_stats, d_m, mask=rz)
        tl.store(d_stats + at_stats + Z, d_l, mask=rz)
        tl.store(d_noise + step_z, dz * std, mask=rz)
        # back through the posterior's output layer and its clipped leaky ReLU
        from_stats = tl.dot(d_m, tl.load(wo_mean, mask=zm, other=0.0), input_precision=PRECISION) \
            + tl.dot(d_l, tl.load(wo_logvar, mask=zm, other=0.0), input_precision=PRECISION)
        hidden = tl.load(hiddens + at_m, mask=rm, other=0.0)
        slope = tl.where((hidden <= -clip) | (hidden >= clip), 0.0, tl.where(hidden > 0, 1.0, leak))
        d_hidden = from_stats * slope
        tl.store(d_from_h + at_from_h + G + cm[None, :], d_hidden, mask=rm)
        # dL/dh_{t-1}: the loss's own, plus through [W_hh; W_post,h]
        dh = tl.load(d_states + (rows64[:, None] * (steps + 1) + t) * H + ch[None, :], mask=rh, other=0.0)
        dh += tl.dot(di, tl.load(w_i, mask=hh, other=0.0), input_precision=PRECISION)
        dh += tl.dot(df, tl.load(w_f, mask=hh, other=0.0), input_precision=PRECISION)
        dh += tl.dot(dg, tl.load(w_g, mask=hh, other=0.0), input_precision=PRECISION)
        dh += tl.dot(do, tl.load(w_o, mask=hh, other=0.0), input_precision=PRECISION)
        dh += tl.dot(d_hidden, tl.load(w_post, mask=mh, other=0.0), input_precision=PRECISION)


@lru_cache(maxsize=None)
def compiled(interpret: bool) -> tuple:
    """The two kernels, jitted (or, with interpret, made for Triton's CPU interpreter)."""
    global tl
    import triton
    import triton.language

    tl = triton.language  # the kernels' global
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(rollout_kernel), InterpretedFunction(backward_kernel)
    return triton.jit(rollout_kernel), triton.jit(backward_kernel)


def kernels() -> tuple:
    return compiled(os.environ.get("TRITON_INTERPRET", "0") == "1")


def scalar_args(like: Tensor, clamp: float) -> Tensor:
    """[clamp, LEAK, CLIP] on the device at the data's precision (Triton would take Python
    floats as float32). Filled there, not copied from the host, which graph capture refuses."""
    values = like.new_empty(3)
    for index, value in enumerate((clamp, LEAK, CLIP)):
        values[index] = value
    return values


def padded(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def launch_sizes(batch: int, size: int, mlp: int, latent: int, dtype: torch.dtype) -> dict:
    # TF32 products when torch's own float32 products take them (a GPU's setting); float64
    # (the interpreter's tests) exactly.
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return dict(H=size, M=mlp, Z=latent, HP=padded(size), MP=padded(mlp), ZP=padded(latent), BB=ROWS,
                PRECISION="tf32" if tf32 else "ieee")


def triton_rollout(inputs: tuple[Tensor, ...], clamp: float) -> tuple[Tensor, ...]:
    """recurrence.rollout as one kernel: the same RolloutInputs and the same buffers."""
    input_gates, post_in, noise, from_h_weight, z_weight, out_weight, out_bias = inputs
    batch, steps, gate_size = input_gates.shape
    size, latent, mlp = gate_size // 4, noise.shape[-1], post_in.shape[-1]
    new = input_gates.new_empty
    buffers = (new(steps + 1, batch, size), new(steps + 1, batch, size), new(steps, batch, gate_size),
               new(steps, batch, size), new(steps, batch, mlp), new(steps, batch, 2 * latent),
               new(steps, batch, 2 * latent), new(steps, batch, latent))
    inputs = [x.contiguous() for x in (input_gates, post_in, noise, from_h_weight, z_weight, out_weight, out_bias)]
    rollout, _ = kernels()
    rollout[(triton_cdiv(batch, ROWS),)](*inputs, *buffers, batch, steps, scalar_args(input_gates, clamp),
                                         **launch_sizes(batch, size, mlp, latent, input_gates.dtype))
    return buffers


def triton_backpropagate(inputs: tuple[Tensor, ...], clamp: float) -> tuple[Tensor, ...]:
    """recurrence.backpropagate as one kernel and three products: the same BackwardInputs and results."""
    (states, cells, activations, tanh_cells, hidden, raw_stats, stats, zs, noise, from_h_weight, z_weight, out_weight,
     d_states, d_z, d_mean, d_logvar, d_cell_last) = inputs
    steps, batch, gate_size = activations.shape
    size, latent, mlp = gate_size // 4, zs.shape[-1], hidden.shape[-1]
    new = states.new_empty
    d_from_h, d_stats, d_noise = new(steps, batch, gate_size + mlp), new(steps, batch, 2 * latent), new(batch, steps, latent)
    tensors = [x.contiguous() for x in (cells, activations, tanh_cells, hidden, raw_stats, stats, noise, from_h_weight,
                                        z_weight, out_weight, d_states, d_z, d_mean, d_logvar, d_cell_last)]
    _, backward = kernels()
    backward[(triton_cdiv(batch, ROWS),)](*tensors, d_from_h, d_stats, d_noise, batch, steps, scalar_args(states, clamp),
                                          **launch_sizes(batch, size, mlp, latent, states.dtype))
    d_gates, d_hidden = d_from_h[..., :gate_size], d_from_h[..., gate_size:]
    return d_gates.transpose(0, 1), d_hidden.transpose(0, 1), d_noise, *weight_gradients(d_from_h, d_stats, states, zs, hidden)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
