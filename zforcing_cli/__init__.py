"""zforcing: the Z-Forcing stochastic recurrent model (Goyal et al., NIPS 2017) as a toolkit.

The library API needs neither typer nor rich:

    from zforcing_cli import ZForcing, ZForcingConfig, open_dataset, train, evaluate_split
"""

from .data import open_dataset, prepare
from .evaluate import EvalResult, evaluate_split
from .model import ZForcing, ZForcingConfig, ZForcingOutput
from .runconfig import RunConfig, TrainConfig
from .train import TrainEvent, train
from .version import __version__

__all__ = [
    "__version__", "ZForcing", "ZForcingConfig", "ZForcingOutput", "open_dataset", "prepare",
    "EvalResult", "evaluate_split", "RunConfig", "TrainConfig", "TrainEvent", "train",
]
