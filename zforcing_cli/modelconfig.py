"""The model's configuration, `ZForcingConfig`: a plain record with no torch in it, so that
what reads or describes configs (presets, run configs, the command line's help) loads fast."""

from __future__ import annotations

from dataclasses import asdict, dataclass

MODALITIES = ("binary", "tokens", "frames")
# The choices of the options that keep the authors' form one value away (docs/protocols.md,
# "Departures"); each config field's first choice is what runs written before them used.
OUTPUT_HEADS = ("mlp", "linear")
BACKWARD_FIRST = ("skip", "data")
INITS = ("torch", "authors")
LSTM_BIASES = ("one", "two")
AUX_COSTS = ("gaussian", "l2")


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
    # Where the authors' code differs (docs/protocols.md); the defaults reproduce earlier runs.
    output_head: str = "mlp"  # f(o) and the backward head: one hidden layer (mlp) or one Linear each (linear: authors)
    backward_first: str = "skip"  # skip: no backward cost at t = 1; data: predict u_1 from b_1 when u_1 is data (authors, speech)
    init: str = "torch"  # torch's default initialisation, or the authors' (orthogonal recurrent weights, zero biases)
    lstm_biases: str = "one"  # the forward LSTM's gates: one bias vector, or two summed (authors)
    cond_ln: bool = False  # z_t enters the forward LSTM through layer-norm gains and biases (authors' cond_ln)
    backward_layers: int = 1  # layers of the backward LSTM (authors' nlayers)
    aux_cost: str = "gaussian"  # -log p(b_t | z_t) (gaussian), or the squared error to its mean (l2: authors' use_l2)
    # False: the same network without z (`--no-latent`, the paper's RNN rows): the embedding, the
    # forward LSTM and the output head only, trained on the exact NLL (model.LatentFreeModel).
    latent: bool = True

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, not {self.modality!r}")
        for name, choices in (("output_head", OUTPUT_HEADS), ("backward_first", BACKWARD_FIRST), ("init", INITS),
                              ("lstm_biases", LSTM_BIASES), ("aux_cost", AUX_COSTS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, not {getattr(self, name)!r}")
        if self.backward_layers < 1:
            raise ValueError(f"backward_layers must be at least 1, not {self.backward_layers}")
        if self.cond_ln and self.lstm_biases != "one":
            raise ValueError("cond_ln has no LSTM biases (the layer norms' biases take their place): lstm_biases must be 'one'")
        if self.cond_ln and not self.latent:
            raise ValueError("cond_ln conditions the forward LSTM on z_t: a model without latent has none")
        if self.backward_first == "data" and self.modality != "frames":
            raise ValueError("backward_first 'data' needs frames: u_1 of pixels and words is the start symbol")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ZForcingConfig":
        return cls(**values)
