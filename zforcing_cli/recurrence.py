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

import torch
import torch.nn.functional as F
from torch import Tensor

# On CPU, oneDNN multiplies a batch of rows by a weight it has reordered once up to 1.8× faster
# than MKL's general product (measured on a 2-core AMD EPYC with 32 rows of 1024 by 4608), but
# it costs more per call: below about this many weight elements the plain product wins.
ONEDNN_MIN_WEIGHT = 1 << 18

LEAK = 1.0 / 3.0  # slope of the clipped leaky ReLU (model.clipped_leaky_relu)
CLIP = 3.0  # its output range


def clipped_leaky_relu_with_slope(pre: Tensor) -> tuple[Tensor, Tensor]:
    """The clipped leaky ReLU of `pre` and its derivative, elementwise, as autograd defines them
    (leaky_relu: slope 1 where pre > 0; clamp: gradient passes where min ≤ value ≤ max)."""
    leaky = F.leaky_relu(pre, negative_slope=LEAK)
    slope = torch.full_like(pre, LEAK).masked_fill_(pre > 0, 1.0) * ((leaky >= -CLIP) & (leaky <= CLIP))
    return leaky.clamp(-CLIP, CLIP), slope


def onednn_ready(weight: Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.numel() >= ONEDNN_MIN_WEIGHT
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class StepProduct:
    """x @ weight^T for the (B, ·) rows of one step, the weight prepared once for every step."""

    def __init__(self, weight: Tensor, rows: int):  # weight (N, K)
        self.weight = weight
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows) if onednn_ready(weight) else None

    def __call__(self, x: Tensor, bias: Tensor | None = None) -> Tensor:  # (B, K) -> (B, N)
        if self.packed is None:
            return F.linear(x, self.weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


class PosteriorRecurrence(torch.autograd.Function):
    """h_0..h_T, z_1..z_T, q's mean and log-variance, and c_T, with a hand-written backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        input_gates: Tensor,  # (B, T, 4H): emb(u_t)'s gate contribution plus the biases
        post_in: Tensor,  # (B, T, M): the b_t half of the posterior's first layer, with its bias
        noise: Tensor,  # (B, T, Z): eps_t
        from_h_weight: Tensor,  # (4H+M, H): [W_hh; posterior's h part]
        z_weight: Tensor,  # (4H, Z)
        out_weight: Tensor,  # (2Z, M): the posterior's output layer
        out_bias: Tensor,  # (2Z,)
        clamp: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
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
        pre = new(steps, batch, post_in.shape[-1])  # a_t
        raw_stats, stats = new(steps, batch, 2 * latent), new(steps, batch, 2 * latent)
        zs = new(steps, batch, latent)
        gates_in, post_steps, eps = input_gates.transpose(0, 1), post_in.transpose(0, 1), noise.transpose(0, 1)
        from_h_product, z_product, out_product = (StepProduct(w, batch) for w in (from_h_weight, z_weight, out_weight))
        for t in range(steps):
            from_h = from_h_product(states[t])
            hidden = torch.add(from_h[:, gate_size:], post_steps[t], out=pre[t])
            hidden = F.leaky_relu(hidden, negative_slope=LEAK).clamp_(-CLIP, CLIP)
            raw_stats[t] = out_product(hidden, out_bias)
            step_stats = torch.clamp(raw_stats[t], -clamp, clamp, out=stats[t])
            mean, logvar = step_stats[:, :latent], step_stats[:, latent:]
            z = torch.addcmul(mean, torch.exp(0.5 * logvar), eps[t], out=zs[t])
            gates = torch.add(gates_in[t], from_h[:, :gate_size]).add_(z_product(z))
            act = activations[t]
            torch.sigmoid(gates, out=act)
            torch.tanh(gates[:, 2 * size : 3 * size], out=act[:, 2 * size : 3 * size])
            i, f, g, o = act.chunk(4, dim=-1)
            cell = torch.addcmul(f * cells[t], i, g, out=cells[t + 1])
            torch.mul(o, torch.tanh(cell, out=tanh_cells[t]), out=states[t + 1])
        ctx.clamp = clamp
        ctx.set_materialize_grads(False)  # outputs the loss does not use send None, not zeros
        ctx.save_for_backward(states, cells, activations, tanh_cells, pre, raw_stats, stats, zs, noise,
                              from_h_weight, z_weight, out_weight)
        mean, logvar = stats.transpose(0, 1).chunk(2, dim=-1)
        return states.transpose(0, 1), zs.transpose(0, 1), mean, logvar, cells[-1]

    @staticmethod
    def backward(ctx, d_states, d_z, d_mean, d_logvar, d_cell_last):  # type: ignore[override]
        states, cells, activations, tanh_cells, pre, raw_stats, stats, zs, noise, from_h_weight, z_weight, out_weight = ctx.saved_tensors
        steps, batch, gate_size = activations.shape
        size, latent = gate_size // 4, zs.shape[-1]
        zeros = states.new_zeros

        # Everything that does not depend on the incoming gradients, for all steps at once.
        i, f, g, o = activations.chunk(4, dim=-1)
        # d gates = [dc·g·i(1-i), dc·c_{t-1}·f(1-f), dc·i·(1-g²), dh·tanh(c_t)·o(1-o)]
        gate_slopes = torch.cat([g * i * (1 - i), cells[:-1] * f * (1 - f), i * (1 - g * g), tanh_cells * o * (1 - o)], dim=-1)
        cell_slope = o * (1 - tanh_cells * tanh_cells)  # dc_t += dh_t · o · (1 - tanh²(c_t))
        hidden, hidden_slope = clipped_leaky_relu_with_slope(pre)
        passes = ((raw_stats >= -ctx.clamp) & (raw_stats <= ctx.clamp)).to(stats.dtype)
        std = torch.exp(0.5 * stats[..., latent:])
        eps = noise.transpose(0, 1)
        # d stats = (given d[mean, logvar] + dz · [1, eps·std/2]) · passes
        z_slope = torch.cat([passes[..., :latent], 0.5 * eps * std * passes[..., latent:]], dim=-1)
        given = torch.cat([
            zeros(steps, batch, latent) if d_mean is None else d_mean.transpose(0, 1),
            zeros(steps, batch, latent) if d_logvar is None else d_logvar.transpose(0, 1),
        ], dim=-1) * passes
        dz_given = zeros(steps, batch, latent) if d_z is None else d_z.transpose(0, 1)
        dh_given = None if d_states is None else d_states.transpose(0, 1)

        d_from_h = zeros(steps, batch, from_h_weight.shape[0])  # [d gates, d a_t] per step
        d_stats = zeros(steps, batch, 2 * latent)
        dz_all = zeros(steps, batch, latent)
        # The products by the transposed weights: d(x W^T)/dx = d · W. (oneDNN reorders a
        # contiguous copy of W^T faster than it reorders the transposed view.)
        from_h_product, z_product, out_product = (StepProduct(w.t().contiguous(), batch) for w in (from_h_weight, z_weight, out_weight))
        dh = zeros(batch, size)  # from step t+1 through W_fh
        dc_next = zeros(batch, size) if d_cell_last is None else d_cell_last  # dc_{t+1} · f_{t+1}
        for t in range(steps - 1, -1, -1):
            if dh_given is not None:
                dh = dh + dh_given[t + 1]
            dc = torch.addcmul(dc_next, dh, cell_slope[t])
            d_gates = d_from_h[t, :, :gate_size].view(batch, 4, size)
            slopes = gate_slopes[t].view(batch, 4, size)
            torch.mul(slopes[:, :3], dc.unsqueeze(1), out=d_gates[:, :3])
            torch.mul(slopes[:, 3], dh, out=d_gates[:, 3])
            dc_next = dc * f[t]
            dz = torch.add(dz_given[t], z_product(d_from_h[t, :, :gate_size]), out=dz_all[t])
            torch.addcmul(given[t].view(batch, 2, latent), dz.unsqueeze(1), z_slope[t].view(batch, 2, latent),
                          out=d_stats[t].view(batch, 2, latent))
            torch.mul(out_product(d_stats[t]), hidden_slope[t], out=d_from_h[t, :, gate_size:])
            dh = from_h_product(d_from_h[t])

        # Each weight gradient: one product over all B·T rows.
        rows = steps * batch
        d_from_h_rows, d_stats_rows = d_from_h.view(rows, -1), d_stats.view(rows, -1)
        d_from_h_weight = d_from_h_rows.t() @ states[:-1].reshape(rows, size)
        d_z_weight = d_from_h_rows[:, :gate_size].t() @ zs.view(rows, latent)
        d_out_weight = d_stats_rows.t() @ hidden.view(rows, -1)
        d_out_bias = d_stats_rows.sum(0)
        d_noise = (dz_all * std).transpose(0, 1) if ctx.needs_input_grad[2] else None
        d_input_gates = d_from_h[..., :gate_size].transpose(0, 1)
        d_post_in = d_from_h[..., gate_size:].transpose(0, 1)
        return d_input_gates, d_post_in, d_noise, d_from_h_weight, d_z_weight, d_out_weight, d_out_bias, None


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
