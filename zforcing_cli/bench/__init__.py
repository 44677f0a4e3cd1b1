"""Benchmarks anyone can run: `zforcing bench` (cli/bench.py prints; this package measures and
never touches the terminal). docs/performance.md says what each figure means and records them.

- defaults.py: the sizes and default counts, without torch (the command line's help shows them);
- workload.py: the presets and sizes measured, their models, and the training update timed;
- synthetic.py: the synthetic prepared datasets they train on;
- lstm_pair.py: the fused LSTM pair, the floor a stochastic RNN cannot beat;
- measure.py: timing, memory readings and the machine's description;
- speed.py: the speed benchmark (run_speed);
- sharing.py: CPU trainings sharing the machine (bench_shared);
- memory.py: host memory on a Blizzard-sized dataset (run_memory).

`python -m zforcing_cli.bench ARGS` is `zforcing bench ARGS` (__main__.py, the only module here
that imports the command line). The names below are imported on first use, with torch.
"""

__all__ = ["run_speed", "run_memory", "bench_shared", "Resize"]


def __getattr__(name: str):
    if name not in __all__:  # a submodule being imported, or a name that is not here
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import memory, sharing, speed, workload

    return {"run_speed": speed.run_speed, "run_memory": memory.run_memory, "bench_shared": sharing.bench_shared,
            "Resize": workload.Resize}[name]
