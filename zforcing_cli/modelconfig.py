"""The model's configuration, `ZForcingConfig`: a plain record with no torch in it, so that
what reads or describes configs (presets, run configs, the command line's help) loads fast."""

from __future__ import annotations

from dataclasses import asdict, dataclass

MODALITIES = ("binary", "tokens", "frames")


@dataclass
class ZForcingConfig:
    modality: str = "binary"  # binary pixels (Bernoulli), tokens (categorical), frames (Gaussian)
    input_size: int = 2  # 2 for binary, vocabulary size for tokens, samples per frame for frames
    start_index: int = 2  # index of the start symbol u_1 (binary: 2; tokens: the <s> id)
    embed_size: int = 64
    hidden_size: int = 256  # units of the forward and of the backward LSTM
    latent_size: int = 32
    mlp_size: int = 256  # hidden units of every one-hidden-layer MLP
    aux_on_hidden: bool = False  # False: p(b_t | z_t) as Eq. 8; True: p(b_t | h_{t-1}, z_t) (original code)
    latent_clamp: float = 8.0  # prior/posterior MLP outputs clamped to ±this, for stability
    output_logvar_min: float = -9.0  # bounds of the Gaussian output head's log-variance
    output_logvar_max: float = 9.0
    embed_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, not {self.modality!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ZForcingConfig":
        return cls(**values)
