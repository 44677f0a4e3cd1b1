"""The floor the speed benchmark measures against: two fused LSTMs with Z-Forcing's heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import (
    MLP,
    AuxHead,
    GaussianMLP,
    StepTerms,
    ZForcingConfig,
    ZForcingOutput,
    gaussian_kl,
    gaussian_log_prob,
    make_embedding,
    make_output_distribution,
    reverse_index,
)


class FusedLSTMPair(nn.Module):
    """What a stochastic RNN's training update cannot beat: Z-Forcing's embedding, heads and loss
    around two fused nn.LSTM layers of its width (cuDNN on a GPU, oneDNN/MKL on a CPU), one
    forward over the inputs u_t and one over the reversed targets.

    The forward LSTM does not read z_t, so nothing runs step by step in Python: every head (prior,
    posterior, output, auxiliary, backward prediction; the model's sizes) applies to all steps at
    once. The loss has the model's form: the output NLL of the modality, the Gaussian KL of the
    reparameterised posterior against the prior, and the auxiliary and backward costs, summed
    over the valid steps and weighted by `objective` as in training. What it leaves out is the
    z_t -> gates product inside the recurrence.
    """

    def __init__(self, config: ZForcingConfig):
        super().__init__()
        c = self.config = config
        self.distribution = make_output_distribution(c)
        out_params = self.distribution.num_params(c.input_size)
        self.embedding = make_embedding(c)
        self.embed_dropout = nn.Dropout(c.embed_dropout)
        self.forward_rnn = nn.LSTM(c.embed_size, c.hidden_size, batch_first=True)
        self.backward_rnn = nn.LSTM(c.embed_size, c.hidden_size, batch_first=True)
        self.prior = GaussianMLP(c.hidden_size, c.mlp_size, c.latent_size, c.latent_clamp)
        self.posterior = GaussianMLP(2 * c.hidden_size, c.mlp_size, c.latent_size, c.latent_clamp)
        self.output_head = MLP(c.hidden_size, c.mlp_size, out_params)
        aux_in = c.latent_size + (c.hidden_size if c.aux_on_hidden else 0)
        self.aux_head = AuxHead(aux_in, c.mlp_size, c.hidden_size, c.latent_clamp)
        self.backward_head = MLP(c.hidden_size, c.mlp_size, out_params)

    def embed(self, x: Tensor) -> Tensor:
        return self.embed_dropout(self.embedding(x if self.config.modality == "frames" else x.long()))

    def forward(self, y: Tensor, mask: Tensor, noise: Tensor, first_input: Tensor | None = None) -> ZForcingOutput:
        """The loss terms per sequence for targets y (B, T[, F]), mask (B, T) and the
        posterior's standard-normal noise (B, T, Z); first_input (B[, F]) is u_1 when given."""
        c = self.config
        steps = y.shape[1]
        if first_input is not None:
            start = first_input.unsqueeze(1).to(y.dtype)
        elif c.modality == "frames":
            start = y.new_zeros(y.shape[0], 1, c.input_size)
        else:
            start = torch.full_like(y[:, :1], c.start_index)
        h, _ = self.forward_rnn(self.embed(torch.cat([start, y[:, :-1]], dim=1)))  # h_1..h_T
        h_prev = F.pad(h[:, :-1], (0, 0, 1, 0))  # h_0 = 0, ..., h_{T-1}
        reverse = reverse_index(mask.sum(1).long(), steps).unsqueeze(-1)  # within each sequence's length
        embedded_y = self.embed(y)
        reversed_states, _ = self.backward_rnn(embedded_y.gather(1, reverse.expand(-1, -1, embedded_y.shape[-1])))
        b = reversed_states.gather(1, reverse.expand(-1, -1, c.hidden_size))  # b_t reads y_t..y_T
        q_mean, q_logvar = self.posterior(torch.cat([h_prev, b], dim=-1))
        z = q_mean + torch.exp(0.5 * q_logvar) * noise
        p_mean, p_logvar = self.prior(h_prev)
        aux_condition = torch.cat([h_prev, z], dim=-1) if c.aux_on_hidden else z
        bwd = self.distribution.nll(self.backward_head(b[:, 1:]), y[:, :-1])
        bwd_mask = mask.clone()
        bwd_mask[:, 0] = 0.0
        return StepTerms(
            nll=self.distribution.nll(self.output_head(h), y),
            kl=gaussian_kl(q_mean, q_logvar, p_mean, p_logvar),
            aux=self.aux_head.nll(aux_condition, b.detach()),
            bwd=F.pad(bwd, (1, 0)),
            log_ratio=(gaussian_log_prob(z, q_mean, q_logvar) - gaussian_log_prob(z, p_mean, p_logvar)).sum(-1),
            posterior_mean=q_mean,
            prior_mean=p_mean,
            backward=b,
            aux_at_floor=torch.zeros_like(mask),
            mask=mask,
            bwd_mask=bwd_mask,
        ).summed()
