"""The forward recurrence of Z-Forcing with backpropagation through time written by hand.

One step of the posterior rollout (model.py's `autograd_rollout` is the same computation left to
autograd, and the tests hold this file to it):

    from_h = h_{t-1} W_fh^T                           (B, 4H+M): LSTM gates and posterior, one product
    a_t    = from_h[4H:] + post_in_t                  posterior's hidden pre-activation (post_in: the b_t part)
    s_t    = clamp(lrelu(a_t) W_o^T + b_o, ±C)        [mean, log-variance] of q(z_t | h_{t-1}, b_t), Eq. 7
    z_t    = mean + exp(logvar / 2) · eps_t           the reparameterised sample
    gates  = gates_in_t + from_h[:4H] + z_t W_z^T     forward LSTM of Eq. 4 (W_z folds g(z) into the gates)
    c_t, h_t = LSTM cell update

Why by hand: autograd records ~25 small operations per step and, in the backward pass, forms
each weight gradient step by step as a product whose inner dimension is the batch. Here the
forward pass records nothing, the backward loop carries only what must be sequential (the
gradients of h_t and c_t), every elementwise derivative that does not depend on them is
computed for all steps at once before the loop, and each weight gradient is one matrix product
over all B·T rows after it.

The recurrence always runs in float32: under autocast the caller passes float32 inputs, so the
state is accumulated at full precision (on a GPU the products may still use TF32).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fused_cpu, fused_gpu
from .steps import CLIP, LEAK, onednn_ready, step_threads, weight_gradients



def clipped_leaky_relu(x: Tensor) -> Tensor:
    """Leaky ReLU with slope 1/3, clipped to [-3, 3] (the paper's §4.1 nonlinearity)."""
    return ClippedLeakyReLU.apply(x)


def clipped_leaky_relu_backward(grad: Tensor, output: Tensor) -> Tensor:
    """grad times the nonlinearity's derivative, read from its output: 1 where the output is
    positive, LEAK where it is not, 0 where it was clipped. (An output of exactly ±CLIP counts as
    clipped; autograd's clamp would let the gradient through an input exactly at ±CLIP.)"""
    inside = torch.ops.aten.hardtanh_backward(grad, output, -CLIP, CLIP)  # 0 where |output| = CLIP
    return torch.ops.aten.leaky_relu_backward(inside, output, LEAK, True)  # the output's sign is the input's


class ClippedLeakyReLU(torch.autograd.Function):
    """clamp(leaky_relu(x)) with a backward pass of two fused kernels that needs only the
    output: autograd's own keeps the input and the output and runs five (the clamp's mask alone
    takes three), on every head of every update."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        output = F.leaky_relu(x, negative_slope=LEAK).clamp_(-CLIP, CLIP)
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (output,) = ctx.saved_tensors
        return clipped_leaky_relu_backward(grad, output)




class StepProduct:
    """x @ weight^T for the (B, ·) rows of one step, the weight prepared once for every step."""

    def __init__(self, weight: Tensor, rows: int):  # weight (N, K), a transposed view or not
        self.weight_t = weight.t()
        ready = onednn_ready(weight)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows) if ready else None

    def __call__(self, x: Tensor, out: Tensor) -> Tensor:  # (B, K) -> out (B, N)
        if self.packed is None:
            return torch.mm(x, self.weight_t, out=out)
        return out.copy_(self.onednn(x))

    def plus(self, base: Tensor, x: Tensor, out: Tensor) -> Tensor:
        """out = base + x @ weight^T (out may be base itself)."""
        if self.packed is None:
            return torch.addmm(base, x, self.weight_t, out=out)
        return torch.add(base, self.onednn(x), out=out)

    def onednn(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def per_step(*buffers: Tensor) -> zip:
    """The (B, ·) views of each time-major buffer, step by step: taken once, not per step."""
    return zip(*(buffer.unbind(0) for buffer in buffers))


class RolloutInputs(NamedTuple):
    """The forward loop's tensor inputs."""

    input_gates: Tensor  # (B, T, 4H): emb(u_t)'s gate contribution plus the biases
    post_in: Tensor  # (B, T, M): the b_t half of the posterior's first layer, with its bias
    noise: Tensor  # (B, T, Z): eps_t
    from_h_weight: Tensor  # (4H+M, H): [W_hh; posterior's h part]
    z_weight: Tensor  # (4H, Z)
    out_weight: Tensor  # (2Z, M): the posterior's output layer
    out_bias: Tensor  # (2Z,)


class Rollout(NamedTuple):
    """The forward loop's time-major buffers, which the backward loop reads."""

    states: Tensor  # h_0..h_T (T+1, B, H)
    cells: Tensor  # c_0..c_T (T+1, B, H)
    activations: Tensor  # the gates' sigmoid(i, f, o) and tanh(g) (T, B, 4H)
    tanh_cells: Tensor  # tanh(c_t) (T, B, H)
    hiddens: Tensor  # the posterior's hidden layer lrelu(a_t) (T, B, M)
    raw_stats: Tensor  # its [mean, log-variance] before the clamp (T, B, 2Z)
    stats: Tensor  # and after it (T, B, 2Z)
    zs: Tensor  # z_t (T, B, Z)


class BackwardInputs(NamedTuple):
    """The backward loop's tensor inputs: the Rollout, the forward inputs it needs (the two
    kept for backward, in this order, by PosteriorRecurrence), then the gradients of the five
    outputs (batch-first, as returned)."""

    states: Tensor
    cells: Tensor
    activations: Tensor
    tanh_cells: Tensor
    hiddens: Tensor
    raw_stats: Tensor
    stats: Tensor
    zs: Tensor
    noise: Tensor
    from_h_weight: Tensor
    z_weight: Tensor
    out_weight: Tensor
    d_states: Tensor  # (B, T+1, H)
    d_z: Tensor  # (B, T, Z)
    d_mean: Tensor  # (B, T, Z)
    d_logvar: Tensor  # (B, T, Z)
    d_cell_last: Tensor  # (B, H)


SAVED_INPUTS = ("noise", "from_h_weight", "z_weight", "out_weight")  # the RolloutInputs the backward loop reads
assert BackwardInputs._fields[: len(Rollout._fields) + len(SAVED_INPUTS)] == Rollout._fields + SAVED_INPUTS


def rollout(inputs: RolloutInputs, clamp: float) -> Rollout:
    """The forward loop: its buffers, time-major."""
    input_gates, post_in, noise, from_h_weight, z_weight, out_weight, out_bias = inputs
    batch, steps, gate_size = input_gates.shape
    size = gate_size // 4
    latent = noise.shape[-1]
    new = input_gates.new_empty
    # Time-major buffers: step t is a contiguous (B, ·) block.
    states, cells = new(steps + 1, batch, size), new(steps + 1, batch, size)
    states[0] = 0.0
    cells[0] = 0.0
    activations = new(steps, batch, gate_size)  # sigmoid(i, f, o) and tanh(g)
    tanh_cells = new(steps, batch, size)
    hiddens = new(steps, batch, post_in.shape[-1])  # lrelu(a_t)
    raw_stats, stats = new(steps, batch, 2 * latent), new(steps, batch, 2 * latent)
    zs = new(steps, batch, latent)
    from_h, gates, std = new(batch, from_h_weight.shape[0]), new(batch, gate_size), new(batch, latent)
    from_h_gates, from_h_post, gates_g = from_h[:, :gate_size], from_h[:, gate_size:], gates[:, 2 * size : 3 * size]
    # A tensor: a Python number with out= costs a conversion every step. Filled on the device,
    # not copied from the host (new_tensor), which CUDA-graph capture refuses.
    half = input_gates.new_full((), 0.5)
    from_h_product, z_product = StepProduct(from_h_weight, batch), StepProduct(z_weight, batch)
    out_product, out_bias_rows = StepProduct(out_weight, batch), out_bias.expand(batch, -1)
    means, logvars = stats[..., :latent], stats[..., latent:]
    i, f, g, o = activations.chunk(4, dim=-1)
    # (Starting each product from [gates_in_t, post_in_t] would save the two adds, but a copy of
    # both for all steps costs more memory than the adds cost time: 0.5 GB at evaluation's batch.)
    time_major = (input_gates.transpose(0, 1), post_in.transpose(0, 1), noise.transpose(0, 1))
    buffers = (states[:-1], states[1:], cells[:-1], cells[1:], hiddens, raw_stats, stats, means, logvars, zs,
               activations, i, f, g, o, tanh_cells)
    with step_threads(from_h_weight, batch):
        for gates_in, post, eps, h, h_next, c, c_next, hidden, raw, s, mean, logvar, z, act, i_t, f_t, g_t, o_t, tanh_c in per_step(*time_major, *buffers):
            from_h_product(h, out=from_h)
            a = torch.add(from_h_post, post, out=from_h_post)
            torch.clamp(F.leaky_relu_(a, negative_slope=LEAK), -CLIP, CLIP, out=hidden)
            out_product.plus(out_bias_rows, hidden, out=raw)
            torch.clamp(raw, -clamp, clamp, out=s)
            torch.mul(logvar, half, out=std).exp_()
            torch.addcmul(mean, std, eps, out=z)
            z_product.plus(torch.add(gates_in, from_h_gates, out=gates), z, out=gates)
            torch.sigmoid(gates, out=act)
            torch.tanh(gates_g, out=g_t)
            torch.mul(f_t, c, out=c_next).addcmul_(i_t, g_t)
            torch.mul(o_t, torch.tanh(c_next, out=tanh_c), out=h_next)
    return Rollout(states, cells, activations, tanh_cells, hiddens, raw_stats, stats, zs)


def backpropagate(inputs: BackwardInputs, clamp: float) -> tuple[Tensor, ...]:
    """The backward loop: the gradients of the seven RolloutInputs (noise's: d z_t · std)."""
    (states, cells, activations, tanh_cells, hidden, raw_stats, stats, zs, noise, from_h_weight, z_weight, out_weight,
     d_states, d_z, d_mean, d_logvar, d_cell_last) = inputs
    steps, batch, gate_size = activations.shape
    size, latent = gate_size // 4, zs.shape[-1]

    new = states.new_empty  # buffers written whole

    # Everything that does not depend on the incoming gradients, for all steps at once.
    i, f, g, o = activations.chunk(4, dim=-1)
    # d gates = [dc·g·i(1-i), dc·c_{t-1}·f(1-f), dc·i·(1-g²), dh·tanh(c_t)·o(1-o)]
    # (torch's sigmoid_backward(a, s) = a·s(1-s) and tanh_backward(a, t) = a·(1-t²), fused.)
    gate_slopes = new(steps, batch, gate_size)
    slope_i, slope_f, slope_g, slope_o = gate_slopes.chunk(4, dim=-1)
    torch.ops.aten.sigmoid_backward.grad_input(g, i, grad_input=slope_i)
    torch.ops.aten.sigmoid_backward.grad_input(cells[:-1], f, grad_input=slope_f)
    torch.ops.aten.tanh_backward.grad_input(i, g, grad_input=slope_g)
    torch.ops.aten.sigmoid_backward.grad_input(tanh_cells, o, grad_input=slope_o)
    cell_slope = torch.ops.aten.tanh_backward(o, tanh_cells)  # dc_t += dh_t · o · (1 - tanh²(c_t))
    hidden_slope = clipped_leaky_relu_backward(torch.ones_like(hidden), hidden)
    passes = ((raw_stats >= -clamp) & (raw_stats <= clamp)).to(stats.dtype)
    std = torch.exp(0.5 * stats[..., latent:])
    eps = noise.transpose(0, 1)
    # d stats = (given d[mean, logvar] + dz · [1, eps·std/2]) · passes
    z_slope = torch.cat([passes[..., :latent], 0.5 * eps * std * passes[..., latent:]], dim=-1)
    given = torch.cat([d_mean.transpose(0, 1), d_logvar.transpose(0, 1)], dim=-1) * passes

    d_from_h = new(steps, batch, from_h_weight.shape[0])  # [d gates, d a_t] per step
    d_stats = new(steps, batch, 2 * latent)
    dz_all = new(steps, batch, latent)
    d_gates, d_hidden = d_from_h[..., :gate_size], d_from_h[..., gate_size:]
    # The products by the transposed weights: d(x W^T)/dx = d · W. (The large ones from a
    # contiguous copy of W^T, which oneDNN reorders faster than the transposed view.)
    from_h_product, z_product = (StepProduct(w.t().contiguous(), batch) for w in (from_h_weight, z_weight))
    out_product = StepProduct(out_weight.t(), batch)  # where small, MKL multiplies by out_weight itself
    from_stats = new(batch, out_weight.shape[1])
    # Views taken once, for all steps: the loop itself only computes.
    slopes, d_gates4 = gate_slopes.view(steps, batch, 4, size), d_gates.view(steps, batch, 4, size)
    dh_given = d_states.transpose(0, 1)  # (T+1, B, H): the loss's own gradient for h_0..h_T
    dh = dh_given[-1].clone()  # dL/dh_t, complete when step t's turn comes
    dc_next = d_cell_last.clone()  # dc_{t+1} · f_{t+1}
    dc = new(batch, size)
    dc_across_gates = dc.unsqueeze(1)
    buffers = (dh_given[:-1], cell_slope, slopes[:, :, :3], slopes[:, :, 3], d_from_h, d_gates, d_gates4[:, :, :3],
               d_gates4[:, :, 3], d_hidden, f, d_z.transpose(0, 1), dz_all, dz_all.unsqueeze(2),
               given.view(steps, batch, 2, latent), z_slope.view(steps, batch, 2, latent), d_stats,
               d_stats.view(steps, batch, 2, latent), hidden_slope)
    with step_threads(from_h_weight, batch):
        for (dh_before, c_slope, slopes_ifg, slope_o, d_fh, d_g, d_ifg, d_o, d_hid, f_t, dz_in, dz, dz_across, giv, zs_slope,
             d_s, d_s_split, h_slope) in reversed(list(per_step(*buffers))):
            torch.addcmul(dc_next, dh, c_slope, out=dc)
            torch.mul(slopes_ifg, dc_across_gates, out=d_ifg)
            torch.mul(slope_o, dh, out=d_o)
            torch.mul(dc, f_t, out=dc_next)
            z_product.plus(dz_in, d_g, out=dz)
            torch.addcmul(giv, dz_across, zs_slope, out=d_s_split)
            torch.mul(out_product(d_s, out=from_stats), h_slope, out=d_hid)
            from_h_product.plus(dh_before, d_fh, out=dh)  # dL/dh_{t-1}: the loss's own plus through W_fh

    d_noise = (dz_all * std).transpose(0, 1)
    return d_gates.transpose(0, 1), d_hidden.transpose(0, 1), d_noise, *weight_gradients(d_from_h, d_stats, states, zs, hidden)


def loops_for(reference: Tensor, *weights: Tensor) -> tuple:
    """(forward loop, backward loop): fused_cpu.py's compiled pair where it suits the call and
    builds (a CPU at small widths), fused_gpu.py's Triton kernels where asked for (a GPU), else
    rollout and backpropagate above."""
    return fused_cpu.loops(reference, *weights) or fused_gpu.loops(reference, *weights) or (rollout, backpropagate)


def loops_in_use(reference: Tensor, *weights: Tensor) -> str:
    """Which loops loops_for gives such a call, in words for a start line: the compiled ones,
    Triton's, or the Python ones and why."""
    if fused_gpu.loops(reference, *weights):
        return "Triton loops"
    if reference.is_cuda:
        return "Python loops" + (" replayed as CUDA graphs" if CUDA_GRAPHS else "")
    why = fused_cpu.why_not(reference, *weights)
    # A build's failure in its first clause ("could not build fused_cpu.cpp"): its warning said the rest.
    return "compiled loops" if why is None else f"Python loops ({why.split(': ', 1)[0]})"


class PosteriorRecurrence(torch.autograd.Function):
    """h_0..h_T, z_1..z_T, q's mean and log-variance, and c_T, with a hand-written backward."""

    @staticmethod
    def forward(ctx, input_gates, post_in, noise, from_h_weight, z_weight, out_weight, out_bias, clamp):  # type: ignore[override]
        inputs = RolloutInputs(input_gates, post_in, noise, from_h_weight, z_weight, out_weight, out_bias)
        forward_loop, ctx.backward_loop = loops_for(input_gates, from_h_weight, z_weight, out_weight)
        buffers = Rollout(*run_loop(forward_loop, inputs, clamp))
        latent = buffers.zs.shape[-1]
        ctx.clamp = clamp
        ctx.save_for_backward(*buffers, *(getattr(inputs, name) for name in SAVED_INPUTS))  # BackwardInputs' order
        means, logvars = buffers.stats[..., :latent], buffers.stats[..., latent:]
        return (buffers.states.transpose(0, 1), buffers.zs.transpose(0, 1), means.transpose(0, 1), logvars.transpose(0, 1),
                buffers.cells[-1])

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        d_input_gates, d_post_in, d_noise, *d_weights = run_loop(ctx.backward_loop, BackwardInputs(*ctx.saved_tensors, *grads),
                                                                 ctx.clamp)
        return (d_input_gates, d_post_in, d_noise if ctx.needs_input_grad[2] else None, *d_weights, None)


# ---------------------------------------------------------------------------------------------
# CUDA graphs: on a GPU each step is a dozen small kernels whose launches cost more than their
# work (batch × units is small), so each loop is captured once per shape and replayed as one.

CUDA_GRAPHS = True  # replay the loops as CUDA graphs on a GPU (off: launch every kernel)
GRAPH_CACHE_SIZE = 8  # captured shapes kept per process (text batches vary in length)


class LoopGraph:
    """One loop captured for fixed input shapes: its static inputs and outputs, and the graph."""

    def __init__(self, loop, inputs: NamedTuple, clamp: float):
        self.inputs = inputs._make(x.detach().clone() for x in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # a first run outside the capture sets up the libraries' workspaces
            loop(self.inputs, clamp)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = loop(self.inputs, clamp)

    def __call__(self, inputs: NamedTuple) -> tuple[Tensor, ...]:
        for static, x in zip(self.inputs, inputs):
            static.copy_(x)
        self.graph.replay()
        # The graph writes into the same buffers at its next replay: hand out copies.
        return tuple(x.clone() for x in self.outputs)


GRAPHS: OrderedDict[tuple, LoopGraph] = OrderedDict()


def run_loop(loop, inputs: NamedTuple, clamp: float) -> tuple[Tensor, ...]:
    """loop(inputs, clamp), replayed from a CUDA graph on a GPU (inputs: the loop's NamedTuple
    of tensors)."""
    reference = inputs[0]
    if not (CUDA_GRAPHS and reference.is_cuda):
        return loop(inputs, clamp)
    # A graph keeps the kernels chosen at its capture: TensorFloat-32 products or not is part of the key.
    key = (loop.__name__, clamp, reference.device, torch.backends.cuda.matmul.allow_tf32,
           *((x.shape, x.dtype) for x in inputs))
    with torch.cuda.device(reference.device):
        graph = GRAPHS.pop(key, None) or LoopGraph(loop, inputs, clamp)
        GRAPHS[key] = graph  # most recently used last
        while len(GRAPHS) > GRAPH_CACHE_SIZE:
            GRAPHS.popitem(last=False)
        return graph(inputs)


def posterior_recurrence(
    input_gates: Tensor, post_in: Tensor, noise: Tensor, from_h_weight: Tensor, z_weight: Tensor,
    out_weight: Tensor, out_bias: Tensor, clamp: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(h_0..h_T (B, T+1, H), z (B, T, Z), q's mean and log-variance (B, T, Z) each, c_T (B, H)),
    computed in at least float32 with autocast off (see the module's docstring)."""
    with torch.autocast(input_gates.device.type, enabled=False):
        inputs = [x.to(torch.promote_types(x.dtype, torch.float32))
                  for x in (input_gates, post_in, noise, from_h_weight, z_weight, out_weight, out_bias)]
        return PosteriorRecurrence.apply(*inputs, clamp)
