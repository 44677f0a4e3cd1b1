"""The Z-Forcing model (Goyal et al., NIPS 2017, §3) in one file.

Notation follows DESIGN.md §2. A batch holds targets y_1..y_T; the model reads inputs
u_t = y_{t-1} (u_1 is a start symbol), so the bound covers every target element.

    generative   z_t ~ p(z_t | h_{t-1})                 prior, Eq. 5
                 h_t = LSTM([emb(u_t), g(z_t)], h_{t-1})  forward cell, Eq. 4
                 y_t ~ p(y_t | h_t)                      output head (h_t only, not z_t)
    inference    b_t = LSTM_back(emb(y_t), b_{t+1})      backward RNN, Eq. 6: b_t sees y_t..y_T
                 z_t ~ q(z_t | h_{t-1}, b_t)             posterior, Eq. 7
    auxiliary    -log p(b_t | z_t)                       aux head, Eq. 8 (b_t detached)
                 -log p(u_t | b_t)                       backward head, Eq. 10

Every Gaussian is parameterized by its mean and log-variance (the paper writes [mu, log sigma];
the family is the same). The ±clamp acts on both outputs of the prior and posterior MLPs, as
the authors' code clamped those MLPs' outputs.

The per-step forward loop is written so that everything that does not depend on h_{t-1} is
computed for all steps at once before the loop (input projections, the b_t half of the
posterior's first layer, the noise) and everything that depends only on h_t or z_t after it
(prior, output, auxiliary terms). Only the recurrence itself runs step by step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modelconfig import ZForcingConfig
from .recurrence import clipped_leaky_relu, loops_in_use, posterior_recurrence

LOG_2PI = math.log(2 * math.pi)
LN_EPS = 1e-5  # the authors' LayerNorm epsilon


@dataclass
class ZForcingOutput:
    """Per-sequence sums over the valid (unpadded) steps; each tensor is (B,)."""

    nll: Tensor  # -Σ_t log p(y_t | h_t)
    kl: Tensor  # Σ_t KL(q(z_t|h_{t-1},b_t) || p(z_t|h_{t-1})), analytic
    aux: Tensor  # -Σ_t log p(b_t | z_t)
    bwd: Tensor  # -Σ_{t≥2} log p(u_t | b_t) (from t = 1 with backward_first 'data' and a real u_1)
    log_q_minus_log_p: Tensor  # Σ_t log q(z_t) - log p(z_t) at the sampled z (for IWAE)

    @property
    def elbo(self) -> Tensor:
        return -(self.nll + self.kl)

    @property
    def log_importance_weight(self) -> Tensor:
        """log p(y, z) - log q(z | y) for the sampled z: the IWAE summand."""
        return -(self.nll + self.log_q_minus_log_p)


@dataclass
class StepTerms:
    """The objective's terms per step, unmasked (padding holds values that mean nothing)."""

    nll: Tensor  # (B, T) -log p(y_t | h_t)
    kl: Tensor  # (B, T, Z) KL per latent dimension
    aux: Tensor  # (B, T) -log p(b_t | z_t)
    bwd: Tensor  # (B, T) -log p(u_t | b_t)
    log_ratio: Tensor  # (B, T) log q(z_t) - log p(z_t) at the sampled z_t
    posterior_mean: Tensor  # (B, T, Z) mean of q(z_t | h_{t-1}, b_t)
    prior_mean: Tensor  # (B, T, Z) mean of p(z_t | h_{t-1})
    backward: Tensor  # (B, T, H) b_t, the aux cost's target
    aux_at_floor: Tensor  # (B, T) dimensions of b_t whose aux log-variance sits at the clamp's floor
    mask: Tensor  # (B, T) valid steps
    bwd_mask: Tensor  # (B, T) valid steps with a u_t to predict (not the start symbol)

    def summed(self) -> ZForcingOutput:
        """Each term masked and summed over the valid steps of each sequence."""
        return ZForcingOutput(
            nll=(self.nll * self.mask).sum(1),
            kl=(self.kl.sum(-1) * self.mask).sum(1),
            aux=(self.aux * self.mask).sum(1),
            bwd=(self.bwd * self.bwd_mask).sum(1),
            log_q_minus_log_p=(self.log_ratio * self.mask).sum(1),
        )


# ---------------------------------------------------------------------------------------------
# Distributions


def gaussian_log_prob(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(x; mean, exp(logvar)) per element."""
    return -0.5 * (LOG_2PI + logvar + (x - mean).pow(2) * torch.exp(-logvar))


def gaussian_kl(mean_q: Tensor, logvar_q: Tensor, mean_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(N(mean_q, var_q) || N(mean_p, var_p)) per element, in closed form."""
    return 0.5 * (
        logvar_p - logvar_q + (torch.exp(logvar_q) + (mean_q - mean_p).pow(2)) * torch.exp(-logvar_p) - 1.0
    )


class BernoulliHead:
    """p(y | params) = Bernoulli(sigmoid(logit)) for one binary value per step."""

    def num_params(self, size: int) -> int:
        return 1

    def nll(self, params: Tensor, target: Tensor) -> Tensor:  # (B, T, 1), (B, T) -> (B, T)
        return F.binary_cross_entropy_with_logits(params.squeeze(-1), target.to(params.dtype), reduction="none")

    def sample(self, params: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
        probs = torch.sigmoid(params.squeeze(-1) / temperature)
        return torch.bernoulli(probs, generator=generator)


class CategoricalHead:
    """p(y | params) = Categorical(softmax(logits)) over the vocabulary."""

    def num_params(self, size: int) -> int:
        return size

    def nll(self, params: Tensor, target: Tensor) -> Tensor:  # (B, T, V), (B, T) -> (B, T)
        # Rows of (B·T, V): the class dimension last and contiguous, 2× faster than (B, V, T).
        flat = F.cross_entropy(params.reshape(-1, params.shape[-1]), target.long().reshape(-1), reduction="none")
        return flat.view(target.shape)

    def sample(self, params: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
        probs = torch.softmax(params / temperature, dim=-1)
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


class GaussianHead:
    """p(y | params) = N(mean, diag(exp(logvar))) over the F values of a frame; logvar bounded."""

    def __init__(self, logvar_min: float, logvar_max: float):
        self.logvar_min, self.logvar_max = logvar_min, logvar_max

    def num_params(self, size: int) -> int:
        return 2 * size

    def split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = params.chunk(2, dim=-1)
        return mean, logvar.clamp(self.logvar_min, self.logvar_max)

    def nll(self, params: Tensor, target: Tensor) -> Tensor:  # (B, T, 2F), (B, T, F) -> (B, T)
        mean, logvar = self.split(params)
        return -gaussian_log_prob(target, mean, logvar).sum(-1)

    def sample(self, params: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
        mean, logvar = self.split(params)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + math.sqrt(temperature) * torch.exp(0.5 * logvar) * noise


def make_output_distribution(config: ZForcingConfig):
    if config.modality == "binary":
        return BernoulliHead()
    if config.modality == "tokens":
        return CategoricalHead()
    return GaussianHead(config.output_logvar_min, config.output_logvar_max)


# ---------------------------------------------------------------------------------------------
# Building blocks


def make_embedding(config: ZForcingConfig) -> nn.Module:
    """emb(·): a Linear on frames; a lookup table on pixels and words, with room for the start
    symbol, which may lie outside the output vocabulary."""
    if config.modality == "frames":
        return nn.Linear(config.input_size, config.embed_size)
    return nn.Embedding(max(config.input_size, config.start_index + 1), config.embed_size)


class MLP(nn.Module):
    """One hidden layer with the clipped leaky ReLU."""

    def __init__(self, in_size: int, hidden_size: int, out_size: int):
        super().__init__()
        self.hidden = nn.Linear(in_size, hidden_size)
        self.out = nn.Linear(hidden_size, out_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(clipped_leaky_relu(self.hidden(x)))


class GaussianMLP(MLP):
    """An MLP whose output is split into (mean, log-variance), both clamped to ±clamp."""

    def __init__(self, in_size: int, hidden_size: int, latent_size: int, clamp: float):
        super().__init__(in_size, hidden_size, 2 * latent_size)
        self.clamp = clamp

    def stats(self, hidden_activation: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.out(hidden_activation).clamp(-self.clamp, self.clamp).chunk(2, dim=-1)
        return mean, logvar

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return self.stats(clipped_leaky_relu(self.hidden(x)))


class Prior(GaussianMLP):
    """Parameterizes p(z_t | h_{t-1}) = N(mu_t^(p), sigma_t^(p)), Eq. 5."""


class Posterior(GaussianMLP):
    """Parameterizes q(z_t | h_{t-1}, b_t) = N(mu_t^(q), sigma_t^(q)), Eq. 7; input is [h_{t-1}, b_t]."""


class AuxHead(nn.Module):
    """Parameterizes p(b_t | z_t) = N(mu_t^(a), sigma_t^(a)), Eq. 8 (or p(b_t | h_{t-1}, z_t)).

    The mean goes through tanh because b_t is an LSTM output and lies in (-1, 1). The MLP's
    whole output is clamped like the prior's, as the authors' code clamped it: the mean before
    its tanh (where the gradient then stops) and the log-variance, which unbounded could let
    the cost fall without limit wherever b_t becomes predictable, and swamp the bound it
    regularises.
    """

    def __init__(self, in_size: int, hidden_size: int, target_size: int, clamp: float):
        super().__init__()
        self.mlp = MLP(in_size, hidden_size, 2 * target_size)
        self.clamp = clamp

    def stats(self, condition: Tensor) -> tuple[Tensor, Tensor]:  # (B, T, in) -> mean, logvar (B, T, H) each
        mean, logvar = self.mlp(condition).clamp(-self.clamp, self.clamp).chunk(2, dim=-1)
        return torch.tanh(mean), logvar

    def nll(self, condition: Tensor, target: Tensor) -> Tensor:  # (B, T, in), (B, T, H) -> (B, T)
        return -gaussian_log_prob(target, *self.stats(condition)).sum(-1)


def make_head(kind: str, in_size: int, hidden_size: int, out_size: int) -> nn.Module:
    """f(o) or the backward head: an MLP with one hidden layer, or one Linear (the authors')."""
    return MLP(in_size, hidden_size, out_size) if kind == "mlp" else nn.Linear(in_size, out_size)


class ForwardCell(nn.Module):
    """The forward LSTM of Eq. 4: h_t = LSTM([emb(u_t), g(z_t)], h_{t-1}), with g a Linear.

    Gate pre-activations are W_e emb(u_t) + W_g g(z_t) + W_h h_{t-1} + bias. Because g is linear,
    W_g g(z) = (W_g G) z + W_g g_bias: the loop multiplies z by one folded matrix. two_biases:
    the bias is the sum of two vectors, one with each weight, as in the authors' cell (the same
    forward pass; Adam and the gradient's norm see two parameters). latent_size 0: no z_t and no
    g, h_t = LSTM(emb(u_t), h_{t-1}) (a model without latent).
    """

    def __init__(self, embed_size: int, latent_size: int, z_embed_size: int, hidden_size: int, two_biases: bool = False):
        super().__init__()
        self.hidden_size = hidden_size
        self.latent_embed = nn.Linear(latent_size, z_embed_size) if latent_size else None  # g(z_t)
        self.input_to_gates = nn.Linear(embed_size + (z_embed_size if latent_size else 0), 4 * hidden_size)
        self.hidden_to_gates = nn.Linear(hidden_size, 4 * hidden_size, bias=two_biases)
        self.embed_size = embed_size

    def input_gates(self, embedded: Tensor) -> Tensor:
        """Gate contribution of emb(u_t) plus every bias, for all steps at once."""
        weight = self.input_to_gates.weight[:, : self.embed_size]
        bias = self.input_to_gates.bias
        if self.latent_embed is not None:
            bias = bias + self.input_to_gates.weight[:, self.embed_size :] @ self.latent_embed.bias
        if self.hidden_to_gates.bias is not None:
            bias = bias + self.hidden_to_gates.bias
        return F.linear(embedded, weight, bias)

    def latent_to_gates_weight(self) -> Tensor:
        """(4H, Z): the folded matrix W_g G."""
        return self.input_to_gates.weight[:, self.embed_size :] @ self.latent_embed.weight

    @staticmethod
    def update(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


def layer_norm(x: Tensor) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the last dimension, with the unbiased variance (N - 1),
    as the authors' LayerNorm computes it."""
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(x.var(-1, keepdim=True) + LN_EPS)


class ConditionalLNCell(nn.Module):
    """The forward LSTM of the authors' cond_ln: z_t sets the gains and biases of the layer norm
    of the recurrent gates instead of entering as an input. No LSTM bias: the norms' take its place.

        gates = LN(W_e emb(u_t)) · γ_e + β_e  +  LN(W_h h_{t-1}) · (1 + γ_t) + β_t
        [γ_t, β_t] = clamp(MLP(z_t), ±3)          (MLP: one hidden layer, output 8H)
    """

    CLAMP = 3.0

    def __init__(self, embed_size: int, latent_size: int, mlp_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.input_to_gates = nn.Linear(embed_size, 4 * hidden_size, bias=False)
        self.input_gain = nn.Parameter(torch.ones(4 * hidden_size))
        self.input_bias = nn.Parameter(torch.zeros(4 * hidden_size))
        self.hidden_to_gates = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        self.latent_mlp = MLP(latent_size, mlp_size, 8 * hidden_size)

    def input_gates(self, embedded: Tensor) -> Tensor:  # (B, T, E) -> (B, T, 4H), all steps at once
        return layer_norm(self.input_to_gates(embedded)) * self.input_gain + self.input_bias

    def step_gates(self, gates_in: Tensor, from_h: Tensor, z: Tensor) -> Tensor:
        """The gates of one step from its input part (B, 4H), W_h h_{t-1} (B, 4H) and z_t (B, Z)."""
        gain, bias = self.latent_mlp(z).clamp(-self.CLAMP, self.CLAMP).chunk(2, dim=-1)
        return gates_in + layer_norm(from_h) * (1.0 + gain) + bias


def authors_init(model: "ZForcing") -> None:
    """The authors' initialisation where it differs from torch's: in the forward LSTM, input
    weights uniform in ±1/√H, recurrent weights orthogonal (one 4H × H matrix), biases zero; in
    the backward LSTM, the first layer's recurrent weights orthogonal. Everything else keeps
    torch's default, as in their code."""
    cell = model.forward_cell
    bound = 1.0 / math.sqrt(model.config.hidden_size)
    with torch.no_grad():
        nn.init.uniform_(cell.input_to_gates.weight, -bound, bound)
        nn.init.orthogonal_(cell.hidden_to_gates.weight)
        for bias in (cell.input_to_gates.bias, cell.hidden_to_gates.bias):
            if bias is not None:
                bias.zero_()
        if model.config.latent:  # a model without latent has no backward LSTM
            nn.init.orthogonal_(model.backward_rnn.weight_hh_l0)


# ---------------------------------------------------------------------------------------------
# The model


class ZForcing(nn.Module):
    def __init__(self, config: ZForcingConfig):
        super().__init__()
        self.config = config
        # The hand-written BPTT of recurrence.py (True) or the plain autograd loop: same results
        # to float32 rounding; the second is the reference the tests and `zforcing bench` use.
        self.fused_recurrence = True
        c = config
        self.distribution = make_output_distribution(c)
        out_params = self.distribution.num_params(c.input_size)
        self.embedding = make_embedding(c)
        self.embed_dropout = nn.Dropout(c.embed_dropout)
        self.backward_rnn = nn.LSTM(c.embed_size, c.hidden_size, num_layers=c.backward_layers, batch_first=True)
        self.forward_cell: ForwardCell | ConditionalLNCell
        if c.cond_ln:
            self.forward_cell = ConditionalLNCell(c.embed_size, c.latent_size, c.mlp_size, c.hidden_size)
        else:
            self.forward_cell = ForwardCell(c.embed_size, c.latent_size, c.mlp_size, c.hidden_size, c.lstm_biases == "two")
        self.prior = Prior(c.hidden_size, c.mlp_size, c.latent_size, c.latent_clamp)
        self.posterior = Posterior(2 * c.hidden_size, c.mlp_size, c.latent_size, c.latent_clamp)
        self.output_head = make_head(c.output_head, c.hidden_size, c.mlp_size, out_params)
        aux_in = c.latent_size + (c.hidden_size if c.aux_on_hidden else 0)
        self.aux_head = AuxHead(aux_in, c.mlp_size, c.hidden_size, c.latent_clamp)
        self.backward_head = make_head(c.output_head, c.hidden_size, c.mlp_size, out_params)
        if c.init == "authors":
            authors_init(self)

    # -- inputs -----------------------------------------------------------------------------

    def start_input(self, batch: int, device: torch.device) -> Tensor:
        """u_1: the zero frame, or the start symbol."""
        if self.config.modality == "frames":
            return torch.zeros(batch, 1, self.config.input_size, device=device, dtype=self.forward_cell.hidden_to_gates.weight.dtype)
        return torch.full((batch, 1), self.config.start_index, dtype=torch.long, device=device)

    def shift_right(self, y: Tensor, first_input: Tensor | None = None) -> Tensor:
        """u_t = y_{t-1}, with u_1 the start input, or first_input (B[, F]) when given: the real
        frame before the sequence, as in the SRNN speech protocol. (B, T[, F]) -> (B, T[, F])."""
        if first_input is None:
            start = self.start_input(y.shape[0], y.device).to(y.dtype)
        else:
            start = first_input.unsqueeze(1).to(y.dtype)
        return torch.cat([start, y[:, :-1]], dim=1)

    def embed(self, x: Tensor) -> Tensor:
        if self.config.modality != "frames":
            x = x.long()
        return self.embed_dropout(self.embedding(x))  # (B, T, E)

    # -- inference network ------------------------------------------------------------------

    def backward_states(self, embedded_y: Tensor, lengths: Tensor) -> Tensor:
        """b_t for every t, each summarising y_t..y_T of its own sequence (Eq. 6).

        Each sequence is reversed within its own length, so padding sits after the real steps
        in the reversed order and never reaches a valid b_t.
        """
        reverse = reverse_index(lengths, embedded_y.shape[1])  # (B, T)
        gather = reverse.unsqueeze(-1).expand(-1, -1, embedded_y.shape[-1])
        reversed_states, _ = self.backward_rnn(embedded_y.gather(1, gather))
        gather = reverse.unsqueeze(-1).expand(-1, -1, reversed_states.shape[-1])
        return reversed_states.gather(1, gather)  # (B, T, H)

    # -- the whole bound ---------------------------------------------------------------------

    def forward(
        self,
        y: Tensor,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        auxiliary: bool = True,
        first_input: Tensor | None = None,
    ) -> ZForcingOutput:
        """Terms of the training objective (Eq. 10) for targets y (B, T[, F]), one posterior sample.

        mask (B, T) marks valid steps (a prefix of each row). noise (B, T, Z), if given, is the
        standard-normal draw of the reparameterisation; otherwise it is drawn with generator.
        auxiliary=False skips the two auxiliary terms (zero), which evaluation does not need.
        first_input (B[, F]), if given, is u_1 in place of the start input (see shift_right).
        """
        return self.step_terms(y, mask, generator, noise, auxiliary, first_input).summed()

    def step_terms(
        self,
        y: Tensor,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        auxiliary: bool = True,
        first_input: Tensor | None = None,
    ) -> "StepTerms":
        """The objective's terms at every step, before the sums over time of forward() (which
        takes the same arguments): for diagnostics such as the KL per step and dimension."""
        c = self.config
        batch, steps = y.shape[:2]
        y, mask = masked_targets(y, mask, self.forward_cell.hidden_to_gates.weight.dtype)
        lengths = mask.sum(1).long()
        if noise is None:
            noise = torch.randn(
                batch, steps, c.latent_size, generator=generator, device=y.device,
                dtype=mask.dtype,
            )

        embedded_u = self.embed(self.shift_right(y, first_input))  # (B, T, E)
        backward = self.backward_states(self.embed(y), lengths)  # (B, T, H)
        states, z, q_mean, q_logvar, _ = self.posterior_rollout(embedded_u, backward, noise)
        h_prev, h = states[:, :-1], states[:, 1:]  # h_{t-1} and h_t, (B, T, H) each

        p_mean, p_logvar = self.prior(h_prev)  # (B, T, Z) each

        nll = self.distribution.nll(self.output_head(h), y)  # (B, T)
        kl = gaussian_kl(q_mean, q_logvar, p_mean, p_logvar)  # (B, T, Z)
        log_ratio = (gaussian_log_prob(z, q_mean, q_logvar) - gaussian_log_prob(z, p_mean, p_logvar)).sum(-1)
        if auxiliary:
            aux, bwd, aux_logvar = self.auxiliary_costs(y, h_prev, z, backward, first_input)
            aux_at_floor = (aux_logvar.detach() <= -c.latent_clamp).sum(-1).to(nll.dtype)
            if c.aux_cost == "l2":
                aux_at_floor = torch.zeros_like(nll)  # the L2 cost has no variance to sit at a floor
        else:
            aux = bwd = aux_at_floor = torch.zeros_like(nll)
        return StepTerms(nll=nll, kl=kl, aux=aux, bwd=bwd, log_ratio=log_ratio, posterior_mean=q_mean, backward=backward,
                         aux_at_floor=aux_at_floor, mask=mask, prior_mean=p_mean,
                         bwd_mask=backward_mask(mask, self.predicts_first_input(first_input)))

    def predicts_first_input(self, first_input: Tensor | None) -> bool:
        """Whether the backward cost includes t = 1: with backward_first 'data', when u_1 is a
        real frame (first_input) rather than the start input."""
        return self.config.backward_first == "data" and first_input is not None

    def auxiliary_costs(
        self, y: Tensor, h_prev: Tensor, z: Tensor, backward: Tensor, first_input: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """-log p(b_t | z_t) (Eq. 8; with aux_cost 'l2' the squared error ||b_t - tanh(μ)||², the
        authors' use_l2) and -log p(u_t | b_t) (Eq. 10), each (B, T), and the aux head's
        log-variance (B, T, H)."""
        aux_condition = torch.cat([h_prev, z], dim=-1) if self.config.aux_on_hidden else z
        # The target b_t is detached: the auxiliary gradient trains z_t (through the posterior
        # and prior) and the aux head, never the backward RNN's states directly (§3.4).
        target = backward.detach()
        aux_mean, aux_logvar = self.aux_head.stats(aux_condition)
        if self.config.aux_cost == "l2":
            aux = (target - aux_mean).pow(2).sum(-1)
        else:
            aux = -gaussian_log_prob(target, aux_mean, aux_logvar).sum(-1)
        if self.predicts_first_input(first_input):  # u_1 is data: b_1 predicts it too
            return aux, self.distribution.nll(self.backward_head(backward), self.shift_right(y, first_input)), aux_logvar
        # b_t predicts u_t = y_{t-1} for t ≥ 2; u_1 is the start symbol, which may lie outside the
        # output vocabulary, so step 1 is left out here and padded with a zero cost.
        bwd = self.distribution.nll(self.backward_head(backward[:, 1:]), y[:, :-1])
        return aux, F.pad(bwd, (1, 0)), aux_logvar

    def posterior_rollout(
        self, embedded_u: Tensor, backward: Tensor, noise: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Run the forward LSTM with z_t ~ q(z_t | h_{t-1}, b_t).

        Returns h_0..h_T (B, T+1, H), z_t (B, T, Z), the posterior's mean and log-variance, and
        the last cell state c_T (B, H) (to continue a sequence from where it ends).
        Everything that does not depend on h_{t-1} is computed here for all steps at once; the
        loop itself runs in recurrence.py with a hand-written backward pass, or, with
        fused_recurrence off, in autograd_rollout (the reference the tests hold it to). The
        loops of recurrence.py know only the concatenated input of Eq. 4: with cond_ln the
        rollout always runs in autograd_rollout.
        """
        cell, post = self.forward_cell, self.posterior
        input_gates = cell.input_gates(embedded_u)  # (B, T, 4H)
        # The posterior's first layer on [h_{t-1}, b_t] splits into an h part and a b part.
        post_w_b = post.hidden.weight[:, self.config.hidden_size:]
        post_from_b = F.linear(backward, post_w_b, post.hidden.bias)  # (B, T, M)
        from_h_weight, z_weight, out_weight = recurrence_weights(self)
        if z_weight is None:  # cond_ln: z_t acts through the layer norms, which no loop of recurrence.py has
            return self.autograd_rollout(input_gates, post_from_b, noise, from_h_weight, None)
        if self.fused_recurrence:
            return posterior_recurrence(input_gates, post_from_b, noise, from_h_weight, z_weight,
                                        out_weight, post.out.bias, post.clamp)
        return self.autograd_rollout(input_gates, post_from_b, noise, from_h_weight, z_weight)

    def autograd_rollout(
        self, input_gates: Tensor, post_from_b: Tensor, noise: Tensor, from_h_weight: Tensor, z_weight: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """posterior_rollout's loop in plain autograd operations: the reference implementation,
        and the only one of cond_ln (z_weight None)."""
        post = self.posterior
        batch, size = input_gates.shape[0], self.config.hidden_size
        h = input_gates.new_zeros(batch, size)
        c = input_gates.new_zeros(batch, size)
        states, zs, means, logvars = [h], [], [], []
        # unbind once: indexing [:, t] inside the loop would make autograd allocate a full-size
        # gradient per step in the backward pass (quadratic in T).
        steps_in = zip(input_gates.unbind(1), post_from_b.unbind(1), noise.unbind(1))
        for gates_in, post_in, eps in steps_in:
            from_h = h @ from_h_weight.t()  # (B, 4H+M)
            mean, logvar = post.stats(clipped_leaky_relu(from_h[:, 4 * size :] + post_in))
            z = mean + torch.exp(0.5 * logvar) * eps  # reparameterised sample
            if z_weight is None:
                gates = self.forward_cell.step_gates(gates_in, from_h[:, : 4 * size], z)  # type: ignore[union-attr]
            else:
                gates = torch.addmm(gates_in + from_h[:, : 4 * size], z, z_weight.t())
            h, c = ForwardCell.update(gates, c)
            states.append(h)
            zs.append(z)
            means.append(mean)
            logvars.append(logvar)
        stacked = tuple(torch.stack(x, dim=1) for x in (states, zs, means, logvars))
        return (*stacked, c)  # type: ignore[return-value]

    @torch.no_grad()
    def encode(self, y: Tensor, first_input: Tensor | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The forward LSTM's state (h_T, c_T), each (B, H), after reading whole (unpadded)
        sequences y (B, T[, F]) with posterior latents: where a continuation starts."""
        dtype = self.forward_cell.hidden_to_gates.weight.dtype
        noise = torch.randn(y.shape[0], y.shape[1], self.config.latent_size, generator=generator, device=y.device, dtype=dtype)
        states, _, c = self.read(y, noise, first_input)
        return states[:, -1], c

    @torch.no_grad()
    def posterior_means(self, y: Tensor, first_input: Tensor | None = None) -> Tensor:
        """The posterior's means of z_1..z_T (B, T, Z) for whole (unpadded) sequences y: the
        latents that interpolation mixes (each mean taken along the path of the means before it)."""
        noise = y.new_zeros(y.shape[0], y.shape[1], self.config.latent_size, dtype=self.forward_cell.hidden_to_gates.weight.dtype)
        return self.read(y, noise, first_input)[1]

    def read(self, y: Tensor, noise: Tensor, first_input: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """h_0..h_T, z_1..z_T and c_T of a posterior rollout over whole sequences y."""
        lengths = torch.full((y.shape[0],), y.shape[1], dtype=torch.long, device=y.device)
        backward = self.backward_states(self.embed(y), lengths)
        states, z, _, _, c = self.posterior_rollout(self.embed(self.shift_right(y, first_input)), backward, noise)
        return states, z, c

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        num: int,
        steps: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        stop: Callable[[Tensor], Tensor] | None = None,
        first_input: Tensor | None = None,
        state: tuple[Tensor, Tensor] | None = None,
        choose: Callable[[Tensor, int], Tensor] | None = None,
        latents: tuple[Tensor, Tensor] | None = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        """Free-running samples from the prior: z_t ~ p(z_t|h_{t-1}), y_t ~ p(y_t|h_t), u_{t+1} = y_t.

        Returns (num, steps[, F]); with return_state, also the forward LSTM's state (h, c) where
        the samples end, to continue them with state= (and first_input= their last element). stop, if given, maps the sampled y_t (num,) to a bool mask of
        finished rows; generation ends early when every row has finished. first_input (num[, F])
        and state (h, c) (from encode) continue a sequence instead of starting one: first_input
        is then its last element. choose(params (num, 1, P), t) -> y_t (num, 1), if given,
        replaces sampling from p(y_t|h_t) at temperature (greedy or top-k decoding). latents
        (given (num, L, Z), weights (num, L)) set z_t = given_t + (1 - weights_t) · z_prior for
        t < L: weight 1 gives z_t directly, 0 leaves it to the prior, and in between mixes them
        (the interpolation of Table 3); steps from L on draw z_t from the prior.
        """
        cell = self.forward_cell
        weight = cell.hidden_to_gates.weight
        device, dtype = weight.device, weight.dtype
        size = self.config.hidden_size
        z_weight = None if isinstance(cell, ConditionalLNCell) or not self.config.latent else cell.latent_to_gates_weight()
        if state is None:
            h = torch.zeros(num, size, device=device, dtype=dtype)
            c = torch.zeros(num, size, device=device, dtype=dtype)
        else:
            h, c = state
        u = self.start_input(num, device) if first_input is None else first_input.unsqueeze(1)  # (num, 1[, F])
        outputs = []
        finished = torch.zeros(num, dtype=torch.bool, device=device)
        for t in range(steps):
            gates = self.prior_step_gates(u, h, t, generator, latents, z_weight)
            h, c = ForwardCell.update(gates, c)
            params = self.output_head(h.unsqueeze(1))
            y = self.distribution.sample(params, temperature, generator) if choose is None else choose(params, t)
            outputs.append(y)
            u = y
            if stop is not None:
                finished |= stop(y.squeeze(1))
                if bool(finished.all()):
                    break
        samples = torch.cat(outputs, dim=1)
        return (samples, (h, c)) if return_state else samples

    def prior_step_gates(self, u: Tensor, h: Tensor, t: int, generator: torch.Generator | None,
                         latents: tuple[Tensor, Tensor] | None, z_weight: Tensor | None) -> Tensor:
        """generate()'s gates at step t (B, 4H) from its input u_t and h_{t-1}, with z_t drawn from
        the prior (or mixed with latents' given z_t); z_weight: None with cond_ln."""
        cell = self.forward_cell
        weight = cell.hidden_to_gates.weight
        mean, logvar = self.prior(h)
        noise = torch.randn(mean.shape, generator=generator, device=weight.device, dtype=weight.dtype)
        z = mean + torch.exp(0.5 * logvar) * noise
        if latents is not None and t < latents[0].shape[1]:
            z = latents[0][:, t] + (1.0 - latents[1][:, t : t + 1]) * z
        gates_in = cell.input_gates(self.embed(u)).squeeze(1)
        if z_weight is None:
            return cell.step_gates(gates_in, h @ weight.t(), z)  # type: ignore[union-attr]
        return gates_in + h @ weight.t() + z @ z_weight.t()


class LatentFreeModel(ZForcing):
    """`--no-latent`: Z-Forcing's network without z, the deterministic baseline of the paper's RNN
    rows. The same embedding, forward LSTM (with no g(z_t) among its inputs) and output head as
    ZForcing's, and nothing else: no backward LSTM, prior, posterior, auxiliary or backward head.
    Its step terms are the NLL and zeros (KL, log q - log p, aux, bwd), so its ELBO is exactly
    -NLL: the likelihood itself, not a bound."""

    def __init__(self, config: ZForcingConfig):
        nn.Module.__init__(self)  # none of ZForcing's latent parts
        self.config = config
        self.distribution = make_output_distribution(config)
        self.embedding = make_embedding(config)
        self.embed_dropout = nn.Dropout(config.embed_dropout)
        self.forward_cell = ForwardCell(config.embed_size, 0, 0, config.hidden_size, config.lstm_biases == "two")
        self.output_head = make_head(config.output_head, config.hidden_size, config.mlp_size,
                                     self.distribution.num_params(config.input_size))
        if config.init == "authors":
            authors_init(self)

    def step_terms(self, y: Tensor, mask: Tensor | None = None, generator: torch.Generator | None = None,
                   noise: Tensor | None = None, auxiliary: bool = True, first_input: Tensor | None = None) -> StepTerms:
        """The NLL at every step, and zeros for the terms of z and b_t, which this model lacks
        (generator, noise and auxiliary, ZForcing's arguments, have nothing to act on)."""
        y, mask = masked_targets(y, mask, self.forward_cell.hidden_to_gates.weight.dtype)
        states, _ = self.lstm_states(self.embed(self.shift_right(y, first_input)))
        nll = self.distribution.nll(self.output_head(states[:, 1:]), y)  # (B, T)
        zeros, no_latent = torch.zeros_like(nll), nll.new_zeros(*nll.shape, 0)  # (B, T), (B, T, 0)
        return StepTerms(nll=nll, kl=no_latent, aux=zeros, bwd=zeros, log_ratio=zeros, posterior_mean=no_latent,
                         prior_mean=no_latent, backward=no_latent, aux_at_floor=zeros, mask=mask,
                         bwd_mask=backward_mask(mask, self.predicts_first_input(first_input)))

    def lstm_states(self, embedded_u: Tensor) -> tuple[Tensor, Tensor]:
        """h_0..h_T (B, T+1, H) and c_T (B, H) of the forward LSTM over emb(u_1..u_T) (B, T, E),
        from zero states: nn.LSTM's kernel (torch.lstm) on the forward cell's weights, whose gates
        come in nn.LSTM's order (i, f, g, o), with a zero second bias when the cell has one."""
        cell = self.forward_cell
        zeros = embedded_u.new_zeros(1, embedded_u.shape[0], self.config.hidden_size)  # (layers, B, H)
        second_bias = cell.hidden_to_gates.bias
        if second_bias is None:
            second_bias = torch.zeros_like(cell.input_to_gates.bias)
        weights = [cell.input_to_gates.weight, cell.hidden_to_gates.weight, cell.input_to_gates.bias, second_bias]
        output, _, c = torch.lstm(embedded_u, (zeros, zeros), weights, True, 1, 0.0, self.training, False, True)
        return torch.cat([zeros.transpose(0, 1), output], dim=1), c[0]

    def read(self, y: Tensor, noise: Tensor, first_input: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """h_0..h_T, no z (B, T, 0) and c_T of the forward LSTM over whole sequences y."""
        states, c = self.lstm_states(self.embed(self.shift_right(y, first_input)))
        return states, states.new_zeros(y.shape[0], y.shape[1], 0), c

    def prior_step_gates(self, u: Tensor, h: Tensor, t: int, generator: torch.Generator | None,
                         latents: tuple[Tensor, Tensor] | None, z_weight: Tensor | None) -> Tensor:
        """generate()'s gates at step t: the forward LSTM's, with no z_t to draw."""
        cell = self.forward_cell
        return cell.input_gates(self.embed(u)).squeeze(1) + h @ cell.hidden_to_gates.weight.t()


def build_model(config: ZForcingConfig) -> ZForcing:
    """The model a config describes: ZForcing, or LatentFreeModel when config.latent is False."""
    return ZForcing(config) if config.latent else LatentFreeModel(config)


def backward_mask(mask: Tensor, from_first: bool) -> Tensor:
    """The steps (B, T) with a u_t for b_t to predict: the valid ones, but t = 1 unless u_1 is
    data (from_first: ZForcing.predicts_first_input)."""
    bwd_mask = mask.clone()
    if not from_first:
        bwd_mask[:, 0] = 0.0  # u_1 is the start symbol, not data: nothing to predict
    return bwd_mask


def masked_targets(y: Tensor, mask: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """y (B, T[, F]) with its padding replaced by zeros, and the mask (B, T) in dtype (every step
    valid when None). Padding is replaced, not only masked out: 0 × NaN (or × an overflowed
    square) is NaN."""
    batch, steps = y.shape[:2]
    if mask is None:
        mask = torch.ones(batch, steps, device=y.device)
    mask = mask.to(dtype)
    valid = mask.bool().view(batch, steps, *([1] * (y.dim() - 2)))
    return torch.where(valid, y, torch.zeros((), dtype=y.dtype, device=y.device)), mask


def recurrence_weights(model: ZForcing) -> tuple[Tensor, Tensor | None, Tensor]:
    """The loop's weights: the LSTM's and the posterior's h weights stacked, so that one
    matmul per step serves both (4H+M, H); the latent's gate weights (4H, Z), None with
    cond_ln (z_t enters through the layer norms instead); the posterior's output weight (2Z, M)."""
    cell, post = model.forward_cell, model.posterior
    post_w_h = post.hidden.weight[:, :model.config.hidden_size]
    z_weight = None if isinstance(cell, ConditionalLNCell) else cell.latent_to_gates_weight()
    return torch.cat([cell.hidden_to_gates.weight, post_w_h], dim=0), z_weight, post.out.weight


def recurrence_loops(model: ZForcing) -> str:
    """Which loops posterior_rollout runs on the model's device, in words (recurrence.loops_in_use)."""
    if not model.config.latent:
        return "torch's LSTM (no latent)"
    if not model.fused_recurrence or model.config.cond_ln:
        return "autograd reference loop" + (" (cond_ln has no other)" if model.config.cond_ln else "")
    with torch.no_grad():  # as posterior_recurrence: at least float32
        weights = [weight.to(torch.promote_types(weight.dtype, torch.float32)) for weight in recurrence_weights(model)]
    return loops_in_use(weights[0], *weights)


def reverse_index(lengths: Tensor, steps: int) -> Tensor:
    """(B, T) indices that reverse the first lengths[b] steps of each row and keep the rest."""
    t = torch.arange(steps, device=lengths.device).unsqueeze(0)  # (1, T)
    last = (lengths - 1).unsqueeze(1)  # (B, 1)
    return torch.where(t <= last, last - t, t)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
