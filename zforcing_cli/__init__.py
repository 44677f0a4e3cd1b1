"""zforcing: the Z-Forcing stochastic recurrent model (Goyal et al., NIPS 2017) as a toolkit.

The library API needs neither typer nor rich:

    from zforcing_cli import ZForcing, ZForcingConfig, open_dataset, train, evaluate_split

Those names are imported on first use, so that the command line (zforcing_cli.cli) answers
--help, and errors about paths and options, before torch is loaded (seconds on a busy machine).
"""

import sys
import types

from .version import __version__

__all__ = [
    "__version__", "ZForcing", "ZForcingConfig", "ZForcingOutput", "open_dataset", "prepare",
    "EvalResult", "evaluate_split", "RunConfig", "TrainConfig", "TrainEvent", "train",
]


def library() -> dict:
    """The public names of __all__, imported."""
    from .data import open_dataset, prepare
    from .evaluate import EvalResult, evaluate_split
    from .model import ZForcing, ZForcingOutput
    from .modelconfig import ZForcingConfig
    from .runconfig import RunConfig, TrainConfig
    from .train import TrainEvent, train

    return dict(ZForcing=ZForcing, ZForcingConfig=ZForcingConfig, ZForcingOutput=ZForcingOutput, open_dataset=open_dataset,
                prepare=prepare, EvalResult=EvalResult, evaluate_split=evaluate_split, RunConfig=RunConfig,
                TrainConfig=TrainConfig, TrainEvent=TrainEvent, train=train)


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = library()[name]
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class Package(types.ModuleType):
    """The package, whose `train` stays the function (what `from zforcing_cli import train`
    gives) once the module of that name is imported: Python binds a submodule to the package's
    attribute of the same name, which this property takes and ignores."""

    @property
    def train(self):
        return library()["train"]

    @train.setter
    def train(self, module) -> None:
        pass


sys.modules[__name__].__class__ = Package
