"""Benchmarks anyone can run: `zforcing bench` (cli/bench.py prints; this package measures and
never touches the terminal). docs/performance.md says what each figure means and records them.

- workload.py: the presets and sizes measured, their models, and the training update timed;
- synthetic.py: the synthetic prepared datasets they train on;
- lstm_pair.py: the fused LSTM pair, the floor a stochastic RNN cannot beat;
- measure.py: timing, memory readings and the machine's description;
- speed.py: the speed benchmark (run_speed);
- sharing.py: CPU trainings sharing the machine (bench_shared);
- memory.py: host memory on a Blizzard-sized dataset (run_memory).

`python -m zforcing_cli.bench ARGS` is `zforcing bench ARGS` (__main__.py, the only module here
that imports the command line).
"""

from .memory import run_memory
from .sharing import bench_shared
from .speed import run_speed
from .workload import Resize

__all__ = ["run_speed", "run_memory", "bench_shared", "Resize"]
