"""Tests of the Z-Forcing model (paper §3, Eqs. 4-10; DESIGN.md §2), its bounds and training rules.

Everything is tiny (hidden sizes 4-16, T <= 12, B <= 8) and most checks run in double precision.
The central check is `reference_forward`: an explicit per-step implementation written here from the
equations, using the model's own parameters but none of its code paths (no weight folding, no
batched reversal, its own LSTM steps, torch.distributions for the densities).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Normal, kl_divergence

from zforcing_cli.data import Batch
from zforcing_cli.evaluate import evaluate_split, evaluation_passes
from zforcing_cli.model import (
    AuxHead,
    GaussianHead,
    ZForcing,
    ZForcingConfig,
    ZForcingOutput,
    clipped_leaky_relu,
    gaussian_kl,
    gaussian_log_prob,
)
from zforcing_cli.runconfig import TrainConfig, TrainerState
from zforcing_cli.schedule import annealed_aux_weight, annealed_kl_weight
from zforcing_cli.train import plateau_update
from zforcing_cli.update import objective

TERMS = ("nll", "kl", "aux", "bwd", "log_q_minus_log_p")


# ---------------------------------------------------------------------------------------------
# Helpers


def make_config(modality: str, **overrides) -> ZForcingConfig:
    base = dict(embed_size=5, hidden_size=6, latent_size=3, mlp_size=7)
    if modality == "binary":
        base.update(input_size=2, start_index=2)
    elif modality == "tokens":
        base.update(input_size=7, start_index=1)
    else:
        base.update(input_size=3)
    base.update(overrides)
    return ZForcingConfig(modality=modality, **base)


def make_model(modality: str, seed: int = 0, scale: float | None = 0.6, double: bool = True, **overrides) -> ZForcing:
    """A small model; with `scale`, every parameter is redrawn from N(0, scale^2) so that the clipped
    nonlinearity, the clamps and the LSTM gates all work away from their linear regime."""
    torch.manual_seed(seed)
    model = ZForcing(make_config(modality, **overrides))
    if scale is not None:
        gen = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    if double:
        model = model.double()
    return model.eval()


def make_targets(modality: str, config: ZForcingConfig, batch: int, steps: int, seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    if modality == "binary":
        return torch.randint(0, 2, (batch, steps), generator=gen).to(dtype)
    if modality == "tokens":
        return torch.randint(0, config.input_size, (batch, steps), generator=gen)
    return torch.randn(batch, steps, config.input_size, generator=gen, dtype=dtype)


def make_noise(model: ZForcing, batch: int, steps: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, steps, model.config.latent_size, generator=gen, dtype=dtype)


def prefix_mask(lengths, steps: int, dtype=torch.float64) -> torch.Tensor:
    return (torch.arange(steps).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).to(dtype)


# ---------------------------------------------------------------------------------------------
# The reference implementation


def ref_clipped_leaky_relu(x):
    return torch.where(x > 0, x, x / 3.0).clamp(-3.0, 3.0)


def ref_linear(layer, x):
    out = x @ layer.weight.t()
    return out if layer.bias is None else out + layer.bias


def ref_mlp(mlp, x):
    """An MLP of one hidden layer, or (the authors' heads) one Linear."""
    if isinstance(mlp, torch.nn.Linear):
        return ref_linear(mlp, x)
    return ref_linear(mlp.out, ref_clipped_leaky_relu(ref_linear(mlp.hidden, x)))


def ref_lstm_step(gates, c):
    i, f, g, o = gates.chunk(4, dim=-1)  # PyTorch's gate order
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def ref_embed(model, x):
    if model.config.modality == "frames":
        return ref_linear(model.embedding, x)
    return model.embedding.weight[x.long()]


def ref_output_nll(model, params, target):
    """-log p(target | params) for one step of a batch: params (B, P), target (B[, F]) -> (B,)."""
    c = model.config
    if c.modality == "binary":
        return -Bernoulli(logits=params.squeeze(-1)).log_prob(target.to(params.dtype))
    if c.modality == "tokens":
        return -Categorical(logits=params).log_prob(target.long())
    mean, logvar = params.chunk(2, dim=-1)
    logvar = logvar.clamp(c.output_logvar_min, c.output_logvar_max)
    return -Normal(mean, torch.exp(0.5 * logvar)).log_prob(target).sum(-1)


def ref_gaussian_stats(model, mlp, x):
    out = ref_mlp(mlp, x).clamp(-model.config.latent_clamp, model.config.latent_clamp)
    mean, logvar = out.chunk(2, dim=-1)
    return mean, logvar


def ref_layer_norm(x):
    """The authors' LayerNorm without gain and bias: the unbiased variance, eps 1e-5."""
    centred = x - x.mean(-1, keepdim=True)
    variance = centred.pow(2).sum(-1, keepdim=True) / (x.shape[-1] - 1)
    return centred / torch.sqrt(variance + 1e-5)


def ref_forward_gates(model, embedded_u, z, h_prev):
    """The forward LSTM's gate pre-activations: Eq. 4's concatenation, or the authors' cond_ln."""
    cell = model.forward_cell
    if not model.config.cond_ln:
        lstm_in = torch.cat([embedded_u, ref_linear(cell.latent_embed, z)], -1)  # Eq. 4
        return ref_linear(cell.input_to_gates, lstm_in) + ref_linear(cell.hidden_to_gates, h_prev)
    gain, bias = ref_mlp(cell.latent_mlp, z).clamp(-3.0, 3.0).chunk(2, dim=-1)
    from_input = ref_layer_norm(embedded_u @ cell.input_to_gates.weight.t()) * cell.input_gain + cell.input_bias
    return from_input + ref_layer_norm(h_prev @ cell.hidden_to_gates.weight.t()) * (1.0 + gain) + bias


def ref_backward_sequence(model, seq):
    """b_t of one unpadded sequence (T[, F]) -> (T, H): each layer of the backward LSTM right to left."""
    rnn, size = model.backward_rnn, model.config.hidden_size
    inputs = [ref_embed(model, x) for x in seq]
    for layer in range(rnn.num_layers):
        w_ih, w_hh = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}")
        bias = getattr(rnn, f"bias_ih_l{layer}") + getattr(rnn, f"bias_hh_l{layer}")
        hb = torch.zeros(size, dtype=w_ih.dtype)
        cb = torch.zeros(size, dtype=w_ih.dtype)
        outputs = [None] * len(inputs)
        for t in reversed(range(len(inputs))):
            hb, cb = ref_lstm_step(w_ih @ inputs[t] + w_hh @ hb + bias, cb)
            outputs[t] = hb
        inputs = outputs
    return torch.stack(inputs)


def reference_forward(model: ZForcing, y, mask, noise, first_input=None) -> dict:
    """Per-sequence terms of Eq. 10 computed step by step, each sequence over its own valid length."""
    c = model.config
    batch, steps = y.shape[:2]
    size = c.hidden_size
    lengths = [int(v) for v in mask.sum(1).tolist()]
    dtype = noise.dtype

    # u_1 = start input (or the given first input), u_t = y_{t-1}
    if first_input is not None:
        start = first_input
    elif c.modality == "frames":
        start = torch.zeros(batch, c.input_size, dtype=dtype)
    else:
        start = torch.full((batch,), c.start_index, dtype=torch.long)
    u = [start] + [y[:, t - 1] for t in range(1, steps)]

    # backward states, each row over its own valid steps only (Eq. 6)
    b = torch.zeros(batch, steps, size, dtype=dtype)
    for i in range(batch):
        if lengths[i]:
            b[i, : lengths[i]] = ref_backward_sequence(model, y[i, : lengths[i]])

    h = torch.zeros(batch, size, dtype=dtype)
    cc = torch.zeros(batch, size, dtype=dtype)
    per_step = {name: [] for name in TERMS}
    for t in range(steps):
        h_prev = h
        q_mean, q_logvar = ref_gaussian_stats(model, model.posterior, torch.cat([h_prev, b[:, t]], -1))  # Eq. 7
        p_mean, p_logvar = ref_gaussian_stats(model, model.prior, h_prev)  # Eq. 5
        z = q_mean + torch.exp(0.5 * q_logvar) * noise[:, t]
        h, cc = ref_lstm_step(ref_forward_gates(model, ref_embed(model, u[t]), z, h_prev), cc)

        q = Normal(q_mean, torch.exp(0.5 * q_logvar))
        p = Normal(p_mean, torch.exp(0.5 * p_logvar))
        per_step["nll"].append(ref_output_nll(model, ref_mlp(model.output_head, h), y[:, t]))  # p(y_t | h_t)
        per_step["kl"].append(kl_divergence(q, p).sum(-1))
        per_step["log_q_minus_log_p"].append((q.log_prob(z) - p.log_prob(z)).sum(-1))
        aux_cond = torch.cat([h_prev, z], -1) if c.aux_on_hidden else z
        # The aux MLP's whole output clamped like the prior's, as in the authors' code.
        a_mean, a_logvar = ref_mlp(model.aux_head.mlp, aux_cond).clamp(-c.latent_clamp, c.latent_clamp).chunk(2, dim=-1)
        if c.aux_cost == "l2":  # the authors' use_l2: the squared error, no variance, no ½
            per_step["aux"].append((b[:, t] - torch.tanh(a_mean)).pow(2).sum(-1))
        else:
            per_step["aux"].append(-Normal(torch.tanh(a_mean), torch.exp(0.5 * a_logvar)).log_prob(b[:, t]).sum(-1))
        if t == 0 and not (c.backward_first == "data" and first_input is not None):
            per_step["bwd"].append(torch.zeros(batch, dtype=dtype))  # u_1 is not data
        else:
            per_step["bwd"].append(ref_output_nll(model, ref_mlp(model.backward_head, b[:, t]), u[t]))

    result = {}
    for name in TERMS:
        values = torch.stack(per_step[name], 1)  # (B, T)
        result[name] = torch.stack([values[i, : lengths[i]].sum() for i in range(batch)])
    return result


def assert_terms_close(out: ZForcingOutput, ref: dict, atol=1e-7, rtol=1e-7):
    # 1e-7, not ~1e-15: BernoulliHead.nll casts the target to float32, and the mixed-dtype
    # binary_cross_entropy_with_logits then only has float32 accuracy (~1e-8) in a double model.
    for name in TERMS:
        torch.testing.assert_close(getattr(out, name), ref[name], atol=atol, rtol=rtol, msg=name)


# ---------------------------------------------------------------------------------------------
# 1-2. Distributions


def test_gaussian_kl_matches_monte_carlo():
    mq = torch.tensor([0.3, -1.2, 2.0, 0.0], dtype=torch.float64)
    lq = torch.tensor([-0.5, 0.7, -2.0, 1.5], dtype=torch.float64)
    mp = torch.tensor([-0.4, 0.5, 1.0, 0.3], dtype=torch.float64)
    lp = torch.tensor([0.2, -0.3, 0.5, -1.0], dtype=torch.float64)
    analytic = gaussian_kl(mq, lq, mp, lp)

    n = 200_000
    gen = torch.Generator().manual_seed(0)
    z = mq + torch.exp(0.5 * lq) * torch.randn(n, 4, generator=gen, dtype=torch.float64)
    q, p = Normal(mq, torch.exp(0.5 * lq)), Normal(mp, torch.exp(0.5 * lp))
    samples = q.log_prob(z) - p.log_prob(z)
    estimate = samples.mean(0)
    stderr = samples.std(0) / math.sqrt(n)
    assert torch.all((analytic - estimate).abs() < 5 * stderr), (analytic, estimate, stderr)
    assert torch.all(analytic > 0.05)  # non-trivial divergences, so the check has power
    # KL(q || q) = 0 and the argument order matters
    assert gaussian_kl(mq, lq, mq, lq).abs().max() < 1e-15
    assert not torch.allclose(gaussian_kl(mp, lp, mq, lq), analytic)


def test_gaussian_log_prob_matches_torch_normal():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64) * 3
    mean = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    logvar = torch.linspace(-8, 8, 20, dtype=torch.float64).view(5, 4)
    expected = Normal(mean, torch.exp(0.5 * logvar)).log_prob(x)
    torch.testing.assert_close(gaussian_log_prob(x, mean, logvar), expected, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# 3. Backward states


@pytest.mark.parametrize("modality", ["frames", "tokens"])
def test_backward_state_sees_only_present_and_future(modality):
    model = make_model(modality)
    steps, t = 8, 4
    y = make_targets(modality, model.config, 2, steps, seed=3)
    lengths = torch.full((2,), steps)
    with torch.no_grad():
        base = model.backward_states(model.embed(y), lengths)
        for s in list(range(t)) + [slice(0, t)]:
            changed = y.clone()
            if modality == "frames":
                changed[:, s] = changed[:, s] + 5.0
            else:
                changed[:, s] = (changed[:, s] + 3) % model.config.input_size
            b = model.backward_states(model.embed(changed), lengths)
            assert torch.equal(b[:, t:], base[:, t:]), f"b_t for t >= {t} changed when y_{s} changed"
            assert not torch.allclose(b[:, :t], base[:, :t]), "earlier b must see y_s"
        changed = y.clone()
        if modality == "frames":
            changed[:, t] = changed[:, t] + 5.0
        else:
            changed[:, t] = (changed[:, t] + 3) % model.config.input_size
        b = model.backward_states(model.embed(changed), lengths)
        assert not torch.allclose(b[:, t], base[:, t])
        assert torch.equal(b[:, t + 1 :], base[:, t + 1 :])
        # and b_t depends on the far future too
        changed = y.clone()
        changed[:, -1] = changed[:, -1] + 1 if modality == "frames" else (changed[:, -1] + 1) % model.config.input_size
        b = model.backward_states(model.embed(changed), lengths)
        assert not torch.allclose(b[:, t], base[:, t])


def test_backward_states_reference_and_padding():
    """A padded row gives the unpadded sequence's b_t, whatever the padding values (even NaN)."""
    model = make_model("frames")
    steps, short = 7, 4
    y = make_targets("frames", model.config, 2, steps, seed=4)
    lengths = torch.tensor([steps, short])
    with torch.no_grad():
        b = model.backward_states(model.embed(y), lengths)
        for pad in (0.0, 1e30, float("nan"), -7.5):
            padded = y.clone()
            padded[1, short:] = pad
            b_pad = model.backward_states(model.embed(padded), lengths)
            assert torch.equal(b_pad[1, :short], b[1, :short]), pad
            assert torch.equal(b_pad[0], b[0])
        alone = model.backward_states(model.embed(y[1:, :short]), torch.tensor([short]))
        torch.testing.assert_close(b[1, :short], alone[0], atol=1e-12, rtol=1e-12)
        # against an explicit right-to-left LSTM over the valid steps only
        ref = reference_backward(model, y[1, :short])
        torch.testing.assert_close(b[1, :short], ref, atol=1e-12, rtol=1e-12)


def reference_backward(model, seq):
    rnn = model.backward_rnn
    size = model.config.hidden_size
    hb = torch.zeros(size, dtype=torch.float64)
    cb = torch.zeros(size, dtype=torch.float64)
    out = [None] * len(seq)
    for t in reversed(range(len(seq))):
        x = ref_embed(model, seq[t])
        hb, cb = ref_lstm_step(rnn.weight_ih_l0 @ x + rnn.bias_ih_l0 + rnn.weight_hh_l0 @ hb + rnn.bias_hh_l0, cb)
        out[t] = hb
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# 4. The auxiliary cost's gradient and the detached target


def undetached_auxiliary_costs(self, y, h_prev, z, backward, first_input=None):
    """ZForcing.auxiliary_costs without the detach of b_t (the thing the design forbids)."""
    aux_condition = torch.cat([h_prev, z], dim=-1) if self.config.aux_on_hidden else z
    aux = self.aux_head.nll(aux_condition, backward)
    bwd = self.distribution.nll(self.backward_head(backward), self.shift_right(y))
    return aux, bwd, self.aux_head.stats(aux_condition)[1]


def grads(loss, params):
    out = torch.autograd.grad(loss, list(params), allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(out, params)]


def max_abs(gradients):
    return max(float(g.abs().max()) for g in gradients)


@pytest.mark.parametrize("aux_on_hidden", [False, True])
def test_aux_gradient_does_not_reach_backward_rnn_through_target(aux_on_hidden, monkeypatch):
    model = make_model("frames", aux_on_hidden=aux_on_hidden)
    size = model.config.hidden_size
    with torch.no_grad():
        model.posterior.hidden.weight[:, size:] = 0.0  # z no longer depends on b
    y = make_targets("frames", model.config, 3, 6, seed=5)
    noise = make_noise(model, 3, 6, seed=6)
    backward_params = list(model.backward_rnn.parameters())

    out = model(y, noise=noise)
    assert max_abs(grads(out.aux.sum(), backward_params)) == 0.0
    # the backward head's cost does train the backward RNN (sanity: the parameters are reachable)
    assert max_abs(grads(out.bwd.sum(), backward_params)) > 1e-6

    monkeypatch.setattr(ZForcing, "auxiliary_costs", undetached_auxiliary_costs)
    out = model(y, noise=noise)
    assert max_abs(grads(out.aux.sum(), backward_params)) > 1e-6, "the test must see the undetached gradient"


@pytest.mark.parametrize("aux_on_hidden", [False, True])
def test_aux_gradient_trains_latent_path(aux_on_hidden):
    model = make_model("binary", aux_on_hidden=aux_on_hidden)
    y = make_targets("binary", model.config, 3, 6, seed=7)
    out = model(y, noise=make_noise(model, 3, 6, seed=8))
    modules = {
        "posterior": model.posterior,
        "aux_head": model.aux_head,
        "forward_cell": model.forward_cell,  # z_t depends on h_{t-1}
        "embedding": model.embedding,
        "prior": model.prior,
        "output_head": model.output_head,
        "backward_head": model.backward_head,
    }
    g = {name: max_abs(grads(out.aux.sum(), list(m.parameters()))) for name, m in modules.items()}
    for name in ("posterior", "aux_head", "forward_cell", "embedding"):
        assert g[name] > 1e-6, (name, g)
    # -log p(b_t | z_t) with z_t from the posterior: the prior and the two output heads are not on its path
    for name in ("prior", "output_head", "backward_head"):
        assert g[name] == 0.0, (name, g)


def test_aux_head_clamps_its_whole_output_as_the_authors_code():
    """Eq. 8's Gaussian from the aux MLP's output clamped to ±clamp, the mean before its tanh
    too: past the clamp, neither half moves the cost, and the cost is the clamped Gaussian's."""
    torch.manual_seed(0)
    head = AuxHead(3, 4, 2, clamp=1.5).double()
    with torch.no_grad():
        head.mlp.out.weight.zero_()
        head.mlp.out.bias.copy_(torch.tensor([3.0, -0.5, -4.0, 0.7], dtype=torch.float64))  # [mean, logvar]
    target = torch.tensor([[[0.2, -0.1]]], dtype=torch.float64)
    cost = head.nll(torch.randn(1, 1, 3, dtype=torch.float64), target)
    expected = -Normal(torch.tanh(torch.tensor([1.5, -0.5], dtype=torch.float64)),
                       torch.exp(0.5 * torch.tensor([-1.5, 0.7], dtype=torch.float64))).log_prob(target).sum(-1)
    torch.testing.assert_close(cost, expected, rtol=1e-12, atol=1e-12)
    cost.sum().backward()
    assert head.mlp.out.bias.grad[0] == 0.0 and head.mlp.out.bias.grad[2] == 0.0  # clamped: mean and logvar
    assert head.mlp.out.bias.grad[1] != 0.0 and head.mlp.out.bias.grad[3] != 0.0


# ---------------------------------------------------------------------------------------------
# 5-6. The whole bound against the reference; padding


def terms_and_reference(model: ZForcing, modality: str) -> tuple:
    """The model's terms and reference_forward's on three sequences of lengths 6, 4 and 1, with
    the same noise."""
    steps, lengths = 6, [6, 4, 1]
    y = make_targets(modality, model.config, 3, steps, seed=11)
    mask = prefix_mask(lengths, steps)
    noise = make_noise(model, 3, steps, seed=12)
    with torch.no_grad():
        return model(y, mask, noise=noise), reference_forward(model, y, mask, noise)


@pytest.mark.parametrize("aux_on_hidden", [False, True])
@pytest.mark.parametrize("modality", ["binary", "tokens", "frames"])
def test_forward_matches_reference(modality, aux_on_hidden):
    # tight clamps so that the latent and output clamps are exercised by the comparison too
    model = make_model(modality, aux_on_hidden=aux_on_hidden, latent_clamp=1.5, output_logvar_min=-0.7,
                       output_logvar_max=0.5)
    out, ref = terms_and_reference(model, modality)
    assert_terms_close(out, ref)
    assert out.bwd[2] == 0.0  # a length-1 sequence has nothing to predict backwards
    assert torch.all(out.kl > 0) and torch.all(out.bwd[:2] > 0)  # non-trivial terms are compared


def test_forward_matches_reference_with_default_init_float32():
    model = make_model("binary", scale=None, double=False, hidden_size=8, latent_size=4, mlp_size=8)
    y = make_targets("binary", model.config, 4, 9, seed=13, dtype=torch.float32)
    noise = make_noise(model, 4, 9, seed=14, dtype=torch.float32)
    with torch.no_grad():
        out = model(y, noise=noise)
        ref = reference_forward(model, y, torch.ones(4, 9), noise)
    assert_terms_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("modality", ["tokens", "frames"])
def test_padding_is_ignored(modality):
    model = make_model(modality)
    steps, lengths = 7, [7, 4]
    y = make_targets(modality, model.config, 2, steps, seed=21)
    mask = prefix_mask(lengths, steps)
    noise = make_noise(model, 2, steps, seed=22)
    with torch.no_grad():
        out = model(y, mask, noise=noise)
        other = y.clone()
        other[1, lengths[1]:] = make_targets(modality, model.config, 1, steps - lengths[1], seed=23)[0] * (
            3 if modality == "frames" else 1
        )
        assert not torch.equal(other, y)
        other_noise = noise.clone()
        other_noise[1, lengths[1]:] = 10.0
        out_other = model(other, mask, noise=other_noise)
        for i, length in enumerate(lengths):
            alone = model(y[i : i + 1, :length], noise=noise[i : i + 1, :length])
            for name in TERMS:
                torch.testing.assert_close(getattr(out, name)[i], getattr(alone, name)[0], atol=1e-10, rtol=1e-10)
                torch.testing.assert_close(getattr(out_other, name)[i], getattr(out, name)[i], atol=1e-12, rtol=0)


def test_nonfinite_frame_padding_is_ignored():
    """Padding is not data: NaN (or overflowing) padding must not turn a row's terms into NaN.

    Currently FAILS: forward masks per-step terms by multiplication, and NaN * 0 = NaN (inf * 0
    too, e.g. 1e25 padding squared in float32). See the report for the proposed fix.
    """
    model = make_model("frames", double=False)
    steps, lengths = 6, [6, 3]
    y = make_targets("frames", model.config, 2, steps, seed=24, dtype=torch.float32)
    mask = prefix_mask(lengths, steps, torch.float32)
    noise = make_noise(model, 2, steps, seed=25, dtype=torch.float32)
    with torch.no_grad():
        clean = model(y, mask, noise=noise)
        for pad in (float("nan"), 1e25):
            padded = y.clone()
            padded[1, lengths[1]:] = pad
            out = model(padded, mask, noise=noise)
            for name in TERMS:
                torch.testing.assert_close(getattr(out, name), getattr(clean, name), msg=f"{name} with pad {pad}")


def test_tokens_with_start_symbol_outside_output_vocabulary():
    """The embedding is sized max(input_size, start_index + 1), i.e. a <s> id that the output
    vocabulary never predicts is supported; the bound must then be computable.

    Currently FAILS with IndexError: the backward head's cross-entropy is evaluated on the masked
    step t = 1, whose target u_1 = start_index is out of range for the output head.
    """
    model = make_model("tokens", input_size=5, start_index=5)
    y = make_targets("tokens", model.config, 2, 5, seed=26)
    noise = make_noise(model, 2, 5, seed=27)
    with torch.no_grad():
        out = model(y, noise=noise)
        ref = reference_forward(model, y, torch.ones(2, 5, dtype=torch.float64), noise)
    assert_terms_close(out, ref)


# ---------------------------------------------------------------------------------------------
# 7. The output head reads h_t


def test_output_head_reads_h_t_only():
    model = make_model("binary", scale=0.8)
    size = model.config.hidden_size
    assert model.output_head.hidden.in_features == size  # h_t alone, no z_t
    with torch.no_grad():
        model.posterior.hidden.weight[:, size:] = 0.0  # make z_t independent of the future, so prefixes are exact
    steps = 6
    y = make_targets("binary", model.config, 2, steps, seed=31)
    noise = make_noise(model, 2, steps, seed=32)

    def per_step_nll(targets, eps):
        with torch.no_grad():
            sums = [torch.zeros(2, dtype=torch.float64)]
            for length in range(1, steps + 1):
                sums.append(model(targets, prefix_mask([length, length], steps), noise=eps).nll)
        return torch.stack([sums[t + 1] - sums[t] for t in range(steps)], 1)  # (B, T)

    base = per_step_nll(y, noise)
    t = 3  # 0-based step index
    # u_t = y_{t-1} enters h_t, which p(y_t | .) reads: nll_t must change (it would not if fed h_{t-1})
    flipped = y.clone()
    flipped[:, t - 1] = 1 - flipped[:, t - 1]
    changed = per_step_nll(flipped, noise)
    assert torch.allclose(changed[:, : t - 1], base[:, : t - 1], atol=1e-12)
    assert torch.all((changed[:, t] - base[:, t]).abs() > 1e-9)
    # z_t enters h_t too
    eps = noise.clone()
    eps[:, t] += 2.0
    changed = per_step_nll(y, eps)
    assert torch.allclose(changed[:, :t], base[:, :t], atol=1e-12)
    assert torch.all((changed[:, t] - base[:, t]).abs() > 1e-9)
    # the step's own target is what is scored
    flipped = y.clone()
    flipped[:, t] = 1 - flipped[:, t]
    changed = per_step_nll(flipped, noise)
    assert torch.allclose(changed[:, :t], base[:, :t], atol=1e-12)
    # Bernoulli: nll(1-y) and nll(y) are -log sigma(l) and -log sigma(-l) for the same logit l
    logit_base = torch.where(y[:, t] == 1, 1, -1) * torch.log(torch.expm1(base[:, t]))
    logit_flip = torch.where(flipped[:, t] == 1, 1, -1) * torch.log(torch.expm1(changed[:, t]))
    torch.testing.assert_close(logit_base, logit_flip, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# 8. IWAE and ELBO through evaluate_split


class TinySplit:
    def __init__(self, data: torch.Tensor):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, indices):
        targets = self.data[torch.as_tensor(np.asarray(indices))]
        return Batch(targets, torch.ones_like(targets))


def tiny_binary_split(count: int, steps: int, seed: int) -> TinySplit:
    gen = torch.Generator().manual_seed(seed)
    return TinySplit(torch.randint(0, 2, (count, steps), generator=gen).float())


def evaluation_noise(model, split, count: int, seed: int, copies: int) -> torch.Tensor:
    """The noise evaluate_split draws for the split's first `count` sequences, `copies` samples each."""
    _, noise = next(evaluation_passes(model, split, count, count, "cpu", seed, None))
    return noise.draw(copies)


def test_iwae_at_least_elbo_and_k1_consistent():
    model = make_model("binary", scale=0.3, double=False)  # KL about 4 nats per sequence
    count = 256
    split = tiny_binary_split(count, 8, seed=41)
    res10 = evaluate_split(model, split, batch_size=1000, iwae_samples=10, seed=3)
    assert res10.iwae >= res10.elbo
    assert res10.sequences == count and res10.steps == count * 8

    # K = 1: iwae - elbo = mean over sequences of (KL - (log q - log p)), zero in expectation
    res1 = evaluate_split(model, split, batch_size=1000, iwae_samples=1, seed=5)
    targets, mask, _ = split.batch(np.arange(count))
    with torch.no_grad():
        out = model(targets, mask, noise=evaluation_noise(model, split, count, seed=5, copies=1), auxiliary=False)
    diff = (out.kl - out.log_q_minus_log_p).double()
    assert res1.iwae - res1.elbo == pytest.approx(diff.mean().item(), abs=1e-4)
    assert res1.elbo == pytest.approx(out.elbo.double().mean().item(), abs=1e-4)
    assert abs(diff.mean().item()) < 4 * diff.std().item() / math.sqrt(len(diff))
    assert diff.std().item() > 1e-3  # the statistical check is not vacuous


def test_log_ratio_is_unbiased_for_kl():
    """E_q[log q(z) - log p(z)] = KL(q || p) for the model's own sampled z (what IWAE relies on)."""
    model = make_model("frames", scale=0.4)  # KL about 10 nats
    y = make_targets("frames", model.config, 1, 5, seed=42).expand(2000, -1, -1)
    with torch.no_grad():
        out = model(y, noise=make_noise(model, 2000, 5, seed=43), auxiliary=False)
    d = out.log_q_minus_log_p - out.kl  # per draw (the KL of later steps depends on z_{<t} through h)
    assert d.std().item() > 0.1  # the check has something to average
    assert abs(d.mean().item()) < 4 * d.std().item() / math.sqrt(len(d))


def test_iwae_exact_when_posterior_equals_prior():
    model = make_model("binary", scale=0.8, double=False)
    with torch.no_grad():
        for head in (model.prior, model.posterior):
            head.out.weight.zero_()
            head.out.bias.zero_()  # q = p = N(0, I): KL = log q - log p = 0
    split = tiny_binary_split(12, 6, seed=44)
    res1 = evaluate_split(model, split, batch_size=100, iwae_samples=1, seed=1)
    assert res1.kl == 0.0
    assert res1.iwae == pytest.approx(res1.elbo, abs=1e-9)

    k = 10
    res = evaluate_split(model, split, batch_size=1000, iwae_samples=k, seed=2)
    targets, mask, _ = split.batch(np.arange(12))
    with torch.no_grad():
        out = model(targets.repeat_interleave(k, 0), mask.repeat_interleave(k, 0),
                    noise=evaluation_noise(model, split, 12, seed=2, copies=k), auxiliary=False)
    log_w = -out.nll.double().view(12, k)
    expected_iwae = (torch.logsumexp(log_w, 1) - math.log(k)).mean().item()
    assert res.iwae == pytest.approx(expected_iwae, abs=1e-5)
    assert res.elbo == pytest.approx(log_w[:, 0].mean().item(), abs=1e-5)  # the first sample's
    assert res.iwae > res.elbo + 1e-4  # Jensen, strict because the samples' likelihoods differ


# ---------------------------------------------------------------------------------------------
# 9. Clamps and the nonlinearity


def test_clipped_leaky_relu_values():
    x = torch.tensor([-20.0, -9.0, -6.0, -3.0, -0.3, 0.0, 0.5, 2.9, 3.0, 7.0])
    expected = torch.tensor([-3.0, -3.0, -2.0, -1.0, -0.1, 0.0, 0.5, 2.9, 3.0, 3.0])
    torch.testing.assert_close(clipped_leaky_relu(x), expected)


def test_clipped_leaky_relu_gradient_is_its_slope_times_the_incoming_gradient():
    x = torch.tensor([-20.0, -9.5, -6.0, -3.0, -0.3, 0.5, 2.9, 7.0], dtype=torch.float64, requires_grad=True)
    clipped_leaky_relu(x).backward(torch.arange(1.0, 9.0, dtype=torch.float64))
    # slopes: clipped (0) below -9 and above 3, 1/3 below zero, 1 above
    expected = torch.tensor([0.0, 0.0, 3 / 3, 4 / 3, 5 / 3, 6.0, 7.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(x.grad, expected)


def test_clipped_leaky_relu_backward_matches_autograd_of_its_definition():
    x = (torch.randn(64, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 6).requires_grad_()
    grad = torch.randn(64, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    (ours,) = torch.autograd.grad(clipped_leaky_relu(x), x, grad)
    (reference,) = torch.autograd.grad(ref_clipped_leaky_relu(x), x, grad)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-15)
    assert torch.autograd.gradcheck(clipped_leaky_relu, (x.detach()[:4].clone().requires_grad_(),))


def test_latent_clamps_hold_with_huge_weights():
    model = make_model("binary", latent_clamp=2.5)
    gen = torch.Generator().manual_seed(51)
    with torch.no_grad():
        for head in (model.prior, model.posterior):
            head.out.weight.copy_(torch.randn(head.out.weight.shape, generator=gen, dtype=torch.float64) * 1e3)
        h = torch.randn(16, model.config.hidden_size, generator=gen, dtype=torch.float64)
        b = torch.randn(16, model.config.hidden_size, generator=gen, dtype=torch.float64)
        stats = [*model.prior(h), *model.posterior(torch.cat([h, b], -1))]
        y = make_targets("binary", model.config, 4, 5, seed=52)
        emb_u = model.embed(model.shift_right(y))
        backward = model.backward_states(model.embed(y), torch.full((4,), 5))
        _, _, q_mean, q_logvar, _ = model.posterior_rollout(emb_u, backward, make_noise(model, 4, 5, seed=53))
        stats += [q_mean, q_logvar]
        for s in stats:
            assert s.abs().max() <= 2.5
            assert (s.abs() == 2.5).any()  # the clamp is active, so the bound is the clamp's doing
        out = model(y, noise=make_noise(model, 4, 5, seed=53))
        assert all(torch.isfinite(getattr(out, name)).all() for name in TERMS)


def test_gaussian_output_logvar_bounded():
    head = GaussianHead(-2.0, 3.0)
    params = torch.tensor([[[1e4, -1e4, 0.5, 1e4, -1e4, 0.5]]], dtype=torch.float64)  # F = 3
    mean, logvar = head.split(params)
    torch.testing.assert_close(mean, params[..., :3])
    torch.testing.assert_close(logvar, torch.tensor([[[3.0, -2.0, 0.5]]], dtype=torch.float64))
    target = torch.zeros(1, 1, 3, dtype=torch.float64)
    expected = -Normal(mean, torch.exp(0.5 * logvar)).log_prob(target).sum(-1)
    torch.testing.assert_close(head.nll(params, target), expected)

    model = make_model("frames", output_logvar_min=-1.0, output_logvar_max=2.0)
    with torch.no_grad():
        model.output_head.out.weight.mul_(1e4)
        y = make_targets("frames", model.config, 2, 4, seed=54)
        h = torch.randn(2, 4, model.config.hidden_size, dtype=torch.float64)
        _, lv = model.distribution.split(model.output_head(h))
        assert lv.min() == -1.0 and lv.max() == 2.0
        out = model(y, noise=make_noise(model, 2, 4, seed=55))
        assert torch.isfinite(out.nll).all()


# ---------------------------------------------------------------------------------------------
# 10. Inputs


def test_shift_right():
    model = make_model("binary")
    y = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    u = model.shift_right(y)
    assert torch.equal(u, torch.tensor([[2.0, 1.0, 0.0, 1.0], [2.0, 0.0, 0.0, 1.0]]))

    model = make_model("tokens", input_size=9, start_index=4)
    y = torch.tensor([[7, 1, 3], [0, 8, 2]])
    assert torch.equal(model.shift_right(y), torch.tensor([[4, 7, 1], [4, 0, 8]]))

    model = make_model("frames")
    y = torch.randn(2, 4, 3)
    u = model.shift_right(y)
    assert u.shape == y.shape
    assert torch.equal(u[:, 0], torch.zeros(2, 3))
    assert torch.equal(u[:, 1:], y[:, :-1])


# ---------------------------------------------------------------------------------------------
# 11. Generation


@pytest.mark.parametrize("modality", ["binary", "tokens", "frames"])
def test_generate_shapes_support_and_seeds(modality):
    model = make_model(modality, double=False)
    def run(seed):
        return model.generate(4, 7, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    expected_shape = (4, 7, 3) if modality == "frames" else (4, 7)
    assert a.shape == expected_shape
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    if modality == "binary":
        assert set(a.unique().tolist()) <= {0.0, 1.0}
    if modality == "tokens":
        assert a.min() >= 0 and a.max() < model.config.input_size and a.dtype == torch.long


def test_generate_stop_callback():
    model = make_model("binary", double=False)
    calls = []

    def stop(y):
        calls.append(y.clone())
        finished = torch.zeros(3, dtype=torch.bool)
        finished[0] = True  # row 0 is done at the first step; the others only at the third
        if len(calls) >= 3:
            finished[:] = True
        return finished

    out = model.generate(3, 10, generator=torch.Generator().manual_seed(0), stop=stop)
    assert out.shape == (3, 3)
    assert len(calls) == 3 and calls[0].shape == (3,)
    assert torch.equal(torch.stack(calls, 1), out)  # the callback sees each step's samples
    full = model.generate(3, 10, generator=torch.Generator().manual_seed(0))
    assert full.shape == (3, 10) and torch.equal(full[:, :3], out)


def test_generate_follows_prior_and_feeds_back_outputs():
    """With z switched off and a near-deterministic Gaussian head, samples are the explicit rollout
    h_t = LSTM([emb(y_{t-1}), g(z)], h_{t-1}), y_t = mean(h_t)."""
    model = make_model("frames", double=False, output_logvar_min=-30.0, output_logvar_max=-30.0)
    with torch.no_grad():
        model.forward_cell.latent_embed.weight.zero_()
        out = model.generate(2, 5, generator=torch.Generator().manual_seed(0))
        cell = model.forward_cell
        size = model.config.hidden_size
        h = torch.zeros(2, size)
        c = torch.zeros(2, size)
        u = torch.zeros(2, 3)
        z_embed = cell.latent_embed.bias.expand(2, -1)
        expected = []
        for _ in range(5):
            gates = ref_linear(cell.input_to_gates, torch.cat([ref_embed(model, u), z_embed], -1))
            h, c = ref_lstm_step(gates + ref_linear(cell.hidden_to_gates, h), c)
            u = ref_mlp(model.output_head, h)[:, :3]
            expected.append(u)
    torch.testing.assert_close(out, torch.stack(expected, 1), atol=1e-4, rtol=1e-4)
    assert out.std() > 0.1


# ---------------------------------------------------------------------------------------------
# 12. KL annealing and the objective


def test_annealed_kl_weight():
    on = TrainConfig(kl_anneal=True)
    assert annealed_kl_weight(on, 0) == pytest.approx(0.2, abs=1e-15)
    for n in (1, 10, 1000, 8000, 15999):
        assert annealed_kl_weight(on, n) == pytest.approx(0.2 + 5e-5 * n, abs=1e-12)
    assert annealed_kl_weight(on, 15999) < 1.0
    assert annealed_kl_weight(on, 16000) == 1.0
    for n in (16001, 20000, 10**7):
        assert annealed_kl_weight(on, n) == 1.0
    off = TrainConfig(kl_anneal=False)
    for n in (0, 5, 16000, 10**6):
        assert annealed_kl_weight(off, n) == 1.0


def test_annealed_aux_weight_moves_by_its_increment_then_stays():
    """The authors' schedule of α: linear from aux_start to aux_weight by aux_increment per update,
    down as well as up; constant without aux_start."""
    down = TrainConfig(aux_start=1e-2, aux_weight=1e-3, aux_increment=5e-5)
    assert annealed_aux_weight(down, 0) == 1e-2
    assert annealed_aux_weight(down, 100) == pytest.approx(1e-2 - 100 * 5e-5, abs=1e-15)
    assert annealed_aux_weight(down, 179) > 1e-3 and annealed_aux_weight(down, 180) == 1e-3  # exactly, once reached
    assert annealed_aux_weight(down, 10**6) == 1e-3
    up = TrainConfig(aux_start=0.0, aux_weight=2e-4, aux_increment=5e-5)
    assert [annealed_aux_weight(up, n) for n in (0, 1, 3, 4, 9)] == pytest.approx([0.0, 5e-5, 1.5e-4, 2e-4, 2e-4], abs=1e-15)
    assert all(annealed_aux_weight(TrainConfig(aux_weight=3e-3), n) == 3e-3 for n in (0, 7, 10**6))


def test_objective_takes_the_scheduled_aux_weight():
    out = ZForcingOutput(nll=torch.tensor([10.0]), kl=torch.tensor([1.0]), aux=torch.tensor([100.0]),
                         bwd=torch.tensor([0.0]), log_q_minus_log_p=torch.tensor([0.0]))
    config = TrainConfig(aux_weight=0.5)
    assert objective(out, 1.0, config).item() == pytest.approx(61.0)
    assert objective(out, 1.0, config, aux_weight=0.25).item() == pytest.approx(36.0)
    assert objective(out, 1.0, config, aux_weight=0.0).item() == pytest.approx(11.0)


def test_objective_combines_terms_and_averages_over_batch():
    out = ZForcingOutput(
        nll=torch.tensor([10.0, 20.0, 30.0]),
        kl=torch.tensor([1.0, 2.0, 4.0]),
        aux=torch.tensor([100.0, 200.0, 300.0]),
        bwd=torch.tensor([7.0, 8.0, 9.0]),
        log_q_minus_log_p=torch.tensor([0.0, 0.0, 0.0]),
    )
    config = TrainConfig(aux_weight=0.5, bwd_weight=0.25)
    expected = np.mean([10 + 0.3 * 1 + 0.5 * 100 + 0.25 * 7, 20 + 0.3 * 2 + 0.5 * 200 + 0.25 * 8,
                        30 + 0.3 * 4 + 0.5 * 300 + 0.25 * 9])
    assert objective(out, 0.3, config).item() == pytest.approx(expected, rel=1e-6)
    assert objective(out, 1.0, TrainConfig()).item() == pytest.approx(np.mean([11, 22, 34]), rel=1e-6)
    # with a zero weight, a term that was not computed (or is non-finite) does not enter the loss
    out.aux = torch.full((3,), float("inf"))
    assert objective(out, 1.0, TrainConfig(bwd_weight=1.0)).item() == pytest.approx(np.mean([18, 30, 43]), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# 13. Learning-rate plateau rule


def run_plateau(values, patience):
    state = TrainerState(lr=1e-3)
    config = TrainConfig(lr_patience=patience, lr_decay=0.5)
    halved = [plateau_update(state, v, config) for v in values]
    return state, halved


def test_plateau_halves_after_patience_epochs_without_improvement():
    state, halved = run_plateau([-100.0, -101.0, -102.0, -103.0, -104.0], patience=2)
    assert halved == [False, False, True, False, True]
    assert state.lr == pytest.approx(1e-3 / 4) and state.lr_halvings == 2
    assert state.best_valid == -100.0


def test_plateau_tracks_best_across_epochs():
    # -92 is better than the previous epoch (-95) but not than the best (-90): still a bad epoch.
    # A rule that compared against the last epoch (or reset the best each epoch) never halves here.
    state, halved = run_plateau([-100.0, -90.0, -95.0, -92.0], patience=2)
    assert halved == [False, False, False, True]
    assert state.best_valid == -90.0 and state.lr == pytest.approx(5e-4)
    # an improvement resets the count of bad epochs
    state, halved = run_plateau([-100.0, -101.0, -99.0, -100.0, -98.0, -99.0], patience=2)
    assert halved == [False] * 6 and state.lr == 1e-3 and state.best_valid == -98.0
    # patience 1: every non-improving epoch halves
    state, halved = run_plateau([-100.0, -100.0, -90.0, -91.0], patience=1)
    assert halved == [False, True, False, True] and state.lr_halvings == 2


def test_the_default_patience_rides_out_noisy_validations():
    """A bound that still improves, with a worse figure now and then, keeps its lr: only three
    validations in a row without a better bound halve it."""
    state = TrainerState(lr=1e-3)
    noisy = [-100.0, -101.0, -98.0, -99.0, -97.0, -98.0, -97.5, -96.0]
    assert [plateau_update(state, value, TrainConfig()) for value in noisy] == [False] * 8
    assert [plateau_update(state, value, TrainConfig()) for value in (-97.0, -96.5, -96.1)] == [False, False, True]


# ---------------------------------------------------------------------------------------------
# A real first input (the SRNN speech protocol's context frame) and continuing a sequence


def test_first_input_replaces_the_start_frame():
    """A zero first_input is the default start frame; any other u_1 changes the bound."""
    model = make_model("frames")
    y = make_targets("frames", model.config, 3, 6, seed=61)
    noise = make_noise(model, 3, 6, seed=62)
    default = model(y, noise=noise)
    zero = model(y, noise=noise, first_input=torch.zeros(3, model.config.input_size, dtype=y.dtype))
    other = model(y, noise=noise, first_input=torch.full((3, model.config.input_size), 0.7, dtype=y.dtype))
    for term in TERMS:
        assert torch.equal(getattr(default, term), getattr(zero, term)), term
    assert not torch.allclose(default.nll, other.nll)
    assert torch.equal(model.shift_right(y, y[:, 0])[:, 1:], y[:, :-1])


def test_encode_ends_where_the_rollout_ends():
    """encode's (h_T, c_T) continues the sequence: one more step from it equals the rollout of
    the sequence one step longer."""
    model = make_model("frames")
    y = make_targets("frames", model.config, 2, 5, seed=63)
    first = torch.randn(2, model.config.input_size, generator=torch.Generator().manual_seed(64), dtype=y.dtype)
    h, c = model.encode(y, first_input=first, generator=torch.Generator().manual_seed(65))
    noise = torch.randn(2, 5, model.config.latent_size, generator=torch.Generator().manual_seed(65), dtype=y.dtype)
    lengths = torch.full((2,), 5)
    states, *_ = model.posterior_rollout(model.embed(model.shift_right(y, first)), model.backward_states(model.embed(y), lengths), noise)
    assert torch.equal(h, states[:, -1])
    continued = model.generate(2, 3, generator=torch.Generator().manual_seed(66), first_input=y[:, -1], state=(h, c))
    fresh = model.generate(2, 3, generator=torch.Generator().manual_seed(66))
    assert continued.shape == fresh.shape == (2, 3, model.config.input_size)
    assert not torch.allclose(continued, fresh)


# ---------------------------------------------------------------------------------------------
# The authors' forms of docs/protocols.md's departures, each against the reference above

DEPARTURES = {
    "linear heads": dict(output_head="linear"),
    "two biases": dict(lstm_biases="two"),
    "cond_ln": dict(cond_ln=True),
    "backward layers": dict(backward_layers=3),
    "aux l2": dict(aux_cost="l2"),
    "all": dict(output_head="linear", lstm_biases="two", backward_layers=2, aux_cost="l2", init="authors"),
}


@pytest.mark.parametrize("loops", ["compiled", "python", "autograd"])
@pytest.mark.parametrize("departure", DEPARTURES)
@pytest.mark.parametrize("modality", ["binary", "frames"])
def test_departures_match_the_reference(modality, departure, loops, monkeypatch):
    """Each option computes its equations, on the hand-written loops (compiled or Python) and on
    autograd_rollout; cond_ln, which the loops cannot run, falls back to autograd_rollout."""
    monkeypatch.setenv("ZFORCING_COMPILED_LOOPS", "0" if loops == "python" else "1")
    model = make_model(modality, latent_clamp=1.5, **DEPARTURES[departure])
    model.fused_recurrence = loops != "autograd"
    out, ref = terms_and_reference(model, modality)
    assert_terms_close(out, ref)
    assert torch.all(out.kl > 0) and torch.all(out.aux != 0)


def test_linear_heads_are_one_linear_each():
    model = make_model("frames", output_head="linear", scale=None)
    size, params = model.config.hidden_size, 2 * model.config.input_size
    for head in (model.output_head, model.backward_head):
        assert isinstance(head, torch.nn.Linear) and head.weight.shape == (params, size) and head.bias.shape == (params,)
    h = torch.randn(2, 4, size, dtype=torch.float64)
    torch.testing.assert_close(model.output_head(h), h @ model.output_head.weight.t() + model.output_head.bias)


def test_two_biases_give_the_same_forward_pass_and_each_the_summed_bias_gradient():
    two = make_model("frames", lstm_biases="two")
    one = make_model("frames")
    state = two.state_dict()
    state["forward_cell.input_to_gates.bias"] = state["forward_cell.input_to_gates.bias"] + state.pop("forward_cell.hidden_to_gates.bias")
    one.load_state_dict(state)
    y = make_targets("frames", one.config, 3, 5, seed=3)
    noise = make_noise(one, 3, 5, seed=4)
    losses = [sum(model(y, noise=noise).__dict__[name].sum() for name in ("nll", "kl", "aux", "bwd")) for model in (one, two)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    for loss in losses:
        loss.backward()
    summed = one.forward_cell.input_to_gates.bias.grad
    assert summed.abs().max() > 1e-3
    torch.testing.assert_close(two.forward_cell.input_to_gates.bias.grad, summed, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(two.forward_cell.hidden_to_gates.bias.grad, summed, rtol=1e-10, atol=1e-12)


def test_authors_init_is_orthogonal_recurrent_uniform_input_and_zero_biases():
    torch.manual_seed(0)
    model = ZForcing(make_config("frames", hidden_size=16, embed_size=8, mlp_size=8, init="authors", lstm_biases="two",
                                 backward_layers=2))
    cell, rnn, size = model.forward_cell, model.backward_rnn, 16
    for weight in (cell.hidden_to_gates.weight, rnn.weight_hh_l0):  # (4H, H): orthonormal columns
        torch.testing.assert_close(weight.t() @ weight, torch.eye(size), atol=1e-5, rtol=0)
    bound = 1 / math.sqrt(size)
    inputs = cell.input_to_gates.weight
    assert inputs.abs().max() <= bound and inputs.abs().max() > 0.95 * bound
    assert abs(float(inputs.detach().pow(2).mean()) - bound**2 / 3) < 0.2 * bound**2 / 3  # the variance of U(-a, a)
    assert not cell.input_to_gates.bias.any() and not cell.hidden_to_gates.bias.any()
    # what their code leaves to torch: the backward LSTM's biases and upper layers
    assert rnn.bias_ih_l0.any() and not torch.allclose(rnn.weight_hh_l1.t() @ rnn.weight_hh_l1, torch.eye(size), atol=1e-2)
    torch.manual_seed(0)
    default = ZForcing(make_config("frames", hidden_size=16, embed_size=8, mlp_size=8))
    weight = default.forward_cell.hidden_to_gates.weight
    assert not torch.allclose(weight.t() @ weight, torch.eye(size), atol=1e-2)  # torch's is not orthogonal


def test_cond_ln_step_against_a_hand_written_reference():
    """One step of the authors' LayerNorm-LSTM: the gates' input part normalised with its own
    gain and bias, the recurrent part normalised with gain 1 + γ_t and bias β_t from z_t."""
    model = make_model("binary", cond_ln=True)
    cell, size = model.forward_cell, 6
    assert not hasattr(cell, "latent_embed") and cell.latent_mlp.out.out_features == 8 * size
    gen = torch.Generator().manual_seed(5)
    x, h, z = (torch.randn(2, n, generator=gen, dtype=torch.float64) for n in (5, size, 3))
    gates = cell.step_gates(cell.input_gates(x), h @ cell.hidden_to_gates.weight.t(), z)
    wx, wh = x @ cell.input_to_gates.weight.t(), h @ cell.hidden_to_gates.weight.t()
    normed_x = (wx - wx.mean(1, keepdim=True)) / torch.sqrt(wx.var(1, keepdim=True, unbiased=True) + 1e-5)
    normed_h = (wh - wh.mean(1, keepdim=True)) / torch.sqrt(wh.var(1, keepdim=True, unbiased=True) + 1e-5)
    conditioning = torch.clamp(ref_mlp(cell.latent_mlp, z), -3, 3)
    expected = normed_x * cell.input_gain + cell.input_bias + normed_h * (1 + conditioning[:, : 4 * size]) + conditioning[:, 4 * size :]
    torch.testing.assert_close(gates, expected, rtol=1e-12, atol=1e-12)


def test_cond_ln_generates_from_the_same_cell():
    """generate() runs the cond_ln cell: with z fixed by latents of weight 1, its first step's
    output is the head applied to the cell's state."""
    model = make_model("frames", cond_ln=True)
    z = torch.randn(2, 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    picked = []
    model.generate(2, 1, latents=(z, torch.ones(2, 1, dtype=torch.float64)), choose=lambda params, t: picked.append(params) or params[..., :3])
    cell = model.forward_cell
    h0 = torch.zeros(2, 6, dtype=torch.float64)
    gates = ref_forward_gates(model, ref_embed(model, torch.zeros(2, 3, dtype=torch.float64)), z[:, 0], h0)
    h, _ = ref_lstm_step(gates, torch.zeros(2, 6, dtype=torch.float64))
    torch.testing.assert_close(picked[0][:, 0], ref_mlp(model.output_head, h), rtol=1e-10, atol=1e-12)
    assert cell.hidden_to_gates.bias is None


def test_backward_lstm_depth():
    model = make_model("tokens", backward_layers=3)
    assert model.backward_rnn.num_layers == 3
    y = make_targets("tokens", model.config, 2, 5, seed=1)
    with torch.no_grad():
        b = model.backward_states(model.embed(y), torch.tensor([5, 3]))
    torch.testing.assert_close(b[1, :3], ref_backward_sequence(model, y[1, :3]), rtol=1e-12, atol=1e-12)


def test_l2_aux_cost_value():
    model = make_model("binary", aux_cost="l2")
    h_prev, z, b = (torch.randn(2, 4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) for n in (6, 3, 6))
    aux, _, _ = model.auxiliary_costs(torch.zeros(2, 4, dtype=torch.float64), h_prev, z, b)
    mean = torch.tanh(model.aux_head.mlp(z).clamp(-8, 8)[..., :6])
    torch.testing.assert_close(aux, (b - mean).pow(2).sum(-1), rtol=1e-12, atol=1e-12)


def test_backward_cost_at_t1_for_speech_with_a_first_input():
    """backward_first 'data': b_1 predicts u_1 when it is the real frame before the sequence;
    without a first input (u_1 the zero start frame) t = 1 stays out, as with 'skip'."""
    data = make_model("frames", backward_first="data")
    skip = make_model("frames")
    y = make_targets("frames", data.config, 3, 5, seed=1)
    first = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    noise = make_noise(data, 3, 5, seed=3)
    with torch.no_grad():
        with_first = data(y, noise=noise, first_input=first)
        torch.testing.assert_close(with_first.bwd, reference_forward(data, y, torch.ones(3, 5), noise, first)["bwd"])
        skipped = skip(y, noise=noise, first_input=first)
        b1 = data.backward_states(data.embed(y), torch.full((3,), 5))[:, 0]
        first_term = ref_output_nll(data, ref_mlp(data.backward_head, b1), first)
        torch.testing.assert_close(with_first.bwd - skipped.bwd, first_term, rtol=1e-10, atol=1e-10)
        assert first_term.abs().min() > 1e-3
        torch.testing.assert_close(data(y, noise=noise).bwd, skip(y, noise=noise).bwd)


def test_departure_options_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="u_1 of pixels and words is the start symbol"):
        make_config("binary", backward_first="data")
    with pytest.raises(ValueError, match="cond_ln has no LSTM biases"):
        make_config("frames", cond_ln=True, lstm_biases="two")
    with pytest.raises(ValueError, match="output_head"):
        make_config("frames", output_head="deep")


# A model of before these options, seeded: its parameters and terms as the code of 853db27
# (the commit before them) computed them. A run whose config lacks the new keys rebuilds it.
BEFORE_THE_OPTIONS = {
    "binary": {"weights": -9.446832005880424, "nll": [5.682350802547574, 5.556692102892736, 5.45729003041583],
               "kl": [1.3614848989872392, 1.3495415388766256, 1.3677673234953764],
               "aux": [44.450351847344415, 45.44618160901253, 47.53347297450527],
               "bwd": [4.948319072834428, 4.704309924190143, 4.855798464506569]},
    "frames": {"weights": -3.2834811783541227, "nll": [37.953778142568865, 42.83593653287514, 34.5961107165908],
               "kl": [1.6012361000318427, 1.5322010249644347, 1.6270930843842193],
               "aux": [53.13131343428681, 49.018979648840315, 48.56106360631627],
               "bwd": [24.943016033005286, 35.96715063729728, 27.720734659695534]},
}


@pytest.mark.parametrize("modality", ["binary", "frames"])
def test_a_config_without_the_new_keys_builds_and_computes_the_model_as_before(modality):
    old_keys = dict(modality=modality, input_size=2 if modality == "binary" else 3, start_index=2, embed_size=5, hidden_size=6,
                    latent_size=3, mlp_size=7, aux_on_hidden=False, latent_clamp=8.0, output_logvar_min=-9.0,
                    output_logvar_max=9.0, embed_dropout=0.0)  # config.json's model of a run of 0.1.0
    torch.manual_seed(0)
    model = ZForcing(ZForcingConfig.from_dict(old_keys)).double()
    g = torch.Generator().manual_seed(1)
    if modality == "binary":
        y, first = torch.randint(0, 2, (3, 8), generator=g).double(), None
    else:
        y = torch.randn(3, 8, 3, generator=g, dtype=torch.float64)
        first = torch.randn(3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 8, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = model(y, noise=noise, first_input=first)
        expected = BEFORE_THE_OPTIONS[modality]
        assert float(sum(p.sum() for p in model.parameters())) == pytest.approx(expected["weights"], rel=1e-12)
    for name in ("nll", "kl", "aux", "bwd"):
        torch.testing.assert_close(getattr(out, name), torch.tensor(expected[name], dtype=torch.float64), rtol=1e-10, atol=1e-10)
