"""zforcing: the Z-Forcing stochastic recurrent model (Goyal et al., NIPS 2017) as a toolkit.

The library API needs neither typer nor rich:

    from zforcing_cli import ZForcing, ZForcingConfig, open_dataset, train, evaluate_split
"""

__version__ = "0.1.0"

from .data import open_dataset, prepare  # noqa: E402
from .evaluate import EvalResult, evaluate_split  # noqa: E402
from .model import ZForcing, ZForcingConfig, ZForcingOutput  # noqa: E402
from .train import RunConfig, TrainConfig, TrainEvent, train  # noqa: E402

__all__ = [
    "__version__", "ZForcing", "ZForcingConfig", "ZForcingOutput", "open_dataset", "prepare",
    "EvalResult", "evaluate_split", "RunConfig", "TrainConfig", "TrainEvent", "train",
]
