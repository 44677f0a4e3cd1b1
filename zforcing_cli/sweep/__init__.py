"""`zforcing sweep`'s core, on Optuna: the spec (spec.py), the folder and the study (study.py),
the worker that trains configurations seed by seed and reaps dead workers' trials (worker.py),
the report (report.py, with stats.py's numbers) and its picture (plot.py).

    from zforcing_cli.sweep import read_spec, open_study, SweepWorker
"""

from .report import build_report, configurations
from .spec import SweepSpec, read_spec
from .study import SweepError, default_folder, load_study, open_study, recorded_sweep
from .worker import SweepCounts, SweepEvent, SweepStopped, SweepWorker

__all__ = ["SweepSpec", "read_spec", "SweepError", "default_folder", "open_study", "load_study", "recorded_sweep", "SweepWorker",
           "SweepEvent", "SweepCounts", "SweepStopped", "build_report", "configurations"]
