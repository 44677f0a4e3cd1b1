"""The speed benchmark, `zforcing bench` (run_speed), for a preset's model and data shape, in
one process:
- a training update (forward, backward, clipping, Adam; median of N after a warm-up) of this
  implementation (`model.fused_recurrence = True`), of the plain-autograd reference recurrence
  (`False`) and of a FusedLSTMPair, the floor a stochastic RNN cannot beat. The three take
  turns round by round, each round in a rotated order, so that the machine's drift reaches
  them alike;
- free-running sampling, in sequences per second (and times real time for audio);
- fetching a random batch from a memory-mapped prepared dataset;
- peak memory.
The data are synthetic prepared datasets written to a temporary folder (synthetic.py), except
MNIST's, the embedded set. Training batches come from them.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..data.prepared import DatasetMeta
from ..device import resolve_device, tensor_float32
from ..errors import UsageError
from ..model import ZForcing, count_parameters, recurrence_loops
from ..update import make_optimizer, step_generator
from ..version import __version__
from .defaults import DEFAULT_UPDATES
from .lstm_pair import FusedLSTMPair
from .measure import Meter, Progress, interleaved_updates, machine_description, median_fetch_seconds, peak_rss_bytes
from .synthetic import bench_dataset
from .workload import Resize, check_preset, training_setup, update

IMPLEMENTATIONS = ("fused", "reference", "fused_lstm_pair")
SAMPLE_REPEATS = 3  # timed sampling calls after a warm-up one
FETCH_SECONDS = {"tiny": 0.1}  # time spent fetching batches; 2 s for real sizes


def run_speed(preset: str = "mnist", size: str | None = None, device_spec: str = "auto", updates: int = DEFAULT_UPDATES,
        folder: Path | None = None, progress: Progress | None = None, tf32: bool = False,
        resize: Resize = Resize(), counted: Callable[[int, int], None] | None = None) -> dict:
    """The speed benchmark of one preset (see the module's docstring); a record of numbers.
    Temporary datasets go under folder (default: the temporary folder). tf32: on a GPU, every
    float32 product on TensorFloat-32 tensor cores (as `train --precision tf32`). resize: other
    widths or batch than the size's. counted(done, total): every timed update, as it is taken."""
    size = check_preset(preset, size)
    device = resolve_device(device_spec)
    if tf32 and device.type != "cuda":
        raise UsageError(f"--tf32 needs a CUDA device, and this benchmark runs on the {device.type.upper()}.",
                         "Add --device cuda on a machine with an NVIDIA GPU, or leave --tf32 out.")
    say = progress or (lambda message: None)
    with tempfile.TemporaryDirectory(prefix="zforcing-bench-", dir=folder) as temporary, tensor_float32(tf32):
        say(f"Writing the {preset} benchmark dataset")
        dataset = bench_dataset(preset, Path(temporary))
        model, train_config, batch = training_setup(dataset, size, device, resize)
        loops = recurrence_loops(model)  # the fused update's
        torch.manual_seed(0)
        pair = FusedLSTMPair(model.config).to(device)
        model.train(True)
        pair.train(True)
        on_gpu = device.type == "cuda"  # Adam fused into one kernel there, as the trainer has it
        model_optimizer, pair_optimizer = (make_optimizer(module, train_config, fused=on_gpu) for module in (model, pair))
        steps = itertools.count()

        def model_update(fused: bool) -> Callable[[], object]:
            def take():
                model.fused_recurrence = fused
                return update(model, model_optimizer, batch, train_config, step_generator(0, next(steps), device))
            return take

        def pair_update():
            return update(pair, pair_optimizer, batch, train_config, step_generator(0, next(steps), device))

        meter = Meter(device)
        say(f"Timing training updates (fused, reference, fused LSTM pair): a warm-up, then {updates} each")
        timed = interleaved_updates({"fused": model_update(True), "reference": model_update(False),
                                     "fused_lstm_pair": pair_update}, updates, meter, counted)
        say("Timing sampling")
        sampling = sampling_figures(model, dataset.meta, train_config.batch_size, device, meter)
        say("Timing batch fetches from the memory-mapped dataset")
        fetch = median_fetch_seconds(dataset.split("train"), train_config.batch_size, FETCH_SECONDS.get(size, 2.0))
    fused, reference, floor = (timed[name]["seconds"] for name in IMPLEMENTATIONS)
    return {
        "zforcing": __version__,
        "device": str(device),
        "tf32": tf32,
        "machine": machine_description(device),
        "preset": preset,
        "size": size,
        "batch_size": train_config.batch_size,
        "hidden_size": model.config.hidden_size,
        "mlp_size": model.config.mlp_size,
        "steps": dataset.meta.sequence_length,
        "input_size": dataset.meta.input_size,
        "parameters": count_parameters(model),
        "loops": loops,
        "fused_lstm_pair_parameters": count_parameters(pair),
        "updates": updates,
        **{f"update_ms_{name}": timed[name]["seconds"] * 1e3 for name in IMPLEMENTATIONS},
        "ratio_vs_fused_lstm_pair": fused / floor,
        "ratio_reference_vs_fused": reference / fused,
        "train_sequences_per_s": train_config.batch_size / fused,
        **{f"update_memory_bytes_{name}": timed[name]["memory"] for name in IMPLEMENTATIONS},
        **sampling,
        "batch_fetch_ms": fetch * 1e3,
        "peak_memory_bytes": meter.peak if device.type == "cuda" else peak_rss_bytes(),
        "peak_memory_measure": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the process",
    }


def sampling_figures(model: ZForcing, meta: DatasetMeta, count: int, device: torch.device, meter: Meter) -> dict:
    """Free-running sampling of `count` whole sequences at once: a warm-up, then the median of
    SAMPLE_REPEATS; for audio also how many times faster than real time."""
    generator = torch.Generator(device=device).manual_seed(0)
    model.eval()
    meter(lambda: model.generate(count, meta.sequence_length, generator=generator))
    seconds = statistics.median(meter(lambda: model.generate(count, meta.sequence_length, generator=generator))[0]
                                for _ in range(SAMPLE_REPEATS))
    model.train(True)
    real_time = None
    if meta.modality == "frames":
        audio_seconds = count * meta.sequence_length * meta.audio["frame_size"] / meta.audio["sample_rate"]
        real_time = audio_seconds / seconds
    return {"sample_sequences": count, "sample_sequences_per_s": count / seconds, "sample_x_real_time": real_time}
