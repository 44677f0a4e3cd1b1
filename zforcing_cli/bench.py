"""Benchmarks anyone can run: `zforcing bench` (cli/bench.py prints; this module measures and
never touches the terminal). docs/performance.md says what each figure means and records them.

Speed (`run`), for a preset's model and data shape (BENCH_PRESETS), in one process:
- a training update (forward, backward, clipping, Adam; median of N after a warm-up) of this
  implementation (`model.fused_recurrence = True`), of the plain-autograd reference recurrence
  (`False`) and of a FusedLSTMPair, the floor a stochastic RNN cannot beat. The three take
  turns round by round, each round in a rotated order, so that the machine's drift reaches
  them alike;
- free-running sampling, in sequences per second (and times real time for audio);
- fetching a random batch from a memory-mapped prepared dataset;
- peak memory.
The data are synthetic prepared datasets written to a temporary folder (random audio or word
ids of the preset's shape), except MNIST's, the embedded set. Training batches come from them.

Sharing (`bench_shared`): training speed of one process alone, then of N processes training
at once (each under the thread policy of threads.py, or a fixed --threads), and each one's
share of the solo speed. Host memory on a Blizzard-sized dataset: membench.py.

`python -m zforcing_cli.bench ARGS` is `zforcing bench ARGS`.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__
from .allocator import keep_freed_memory
from .data import EMBEDDED, Batch, PreparedDataset, open_dataset, prepare
from .data.audio import Framing
from .data.prepared import META_FILE, SAMPLE_SCALE, SPECIALS, DatasetMeta
from .data.text import IMDB_PROTOCOL
from .device import resolve_device, tensor_float32
from .errors import UsageError
from .fileio import write_json
from .model import (
    MLP,
    AuxHead,
    GaussianMLP,
    StepTerms,
    ZForcing,
    ZForcingConfig,
    ZForcingOutput,
    count_parameters,
    gaussian_kl,
    gaussian_log_prob,
    make_embedding,
    make_output_distribution,
    reverse_index,
)
from .presets import preset_configs
from .threads import TORCH_DEFAULT_THREADS, ThreadPolicy, available_cores
from .train import TrainConfig, make_optimizer, objective, step_generator

BENCH_PRESETS = ("mnist", "timit", "blizzard", "imdb")
AUDIO_PRESETS = ("timit", "blizzard")
SIZES = ("small", "paper", "tiny")
# The size measured unless --size says otherwise: the paper's for speech and text, where the
# speed targets are set (TIMIT: within 1.25x of the fused LSTM pair); for MNIST the small
# preset, what a bare `zforcing train` runs (at the paper's 1024 units, 784 steps take minutes
# per update on a CPU).
DEFAULT_SIZES = {"mnist": "small", "timit": "paper", "blizzard": "paper", "imdb": "paper"}
# tiny: a smoke test of the benchmark itself (the tests use it); its figures mean nothing.
TINY_MODEL = {"embed_size": 8, "hidden_size": 16, "latent_size": 4, "mlp_size": 16}
TINY_BATCH = 4
# α and β where the preset leaves them at 0 (the speech presets): every head then trains, so
# that each side runs the whole of Eq. 10 backward.
AUX_WEIGHT = 0.0025
DEFAULT_UPDATES = 10
IMPLEMENTATIONS = ("fused", "reference", "fused_lstm_pair")
SYNTHETIC_SEQUENCES = 1024  # sequences in a synthetic set: batches are drawn from these
SYNTHETIC_STD = 0.1  # the synthetic waveform's standard deviation (full scale is 1)
WRITE_CHUNK = 1 << 20  # samples generated and written at a time
SAMPLE_REPEATS = 3  # timed sampling calls after a warm-up one
FETCH_SECONDS = {"tiny": 0.1}  # time spent fetching batches; 2 s for real sizes
WORKER_FLAG = "--worker"  # bench_shared's worker processes: python -m zforcing_cli.bench --worker SPEC

Progress = Callable[[str], None]


# -- the floor: two fused LSTMs with Z-Forcing's heads ----------------------------------------------


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
            backward=b,
            aux_at_floor=torch.zeros_like(mask),
            mask=mask,
            bwd_mask=bwd_mask,
        ).summed()


def update(module: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, config: TrainConfig,
           generator: torch.Generator) -> Tensor:
    """One training update of a ZForcing or a FusedLSTMPair, the same for both: fresh noise,
    forward, the objective, backward, clipping, Adam. Training's checks that the loss and the
    gradient are finite are left out: they wait for the device. Returns the loss."""
    targets = batch.targets
    noise = torch.randn(*targets.shape[:2], module.config.latent_size, generator=generator, device=targets.device)
    loss = objective(module(targets, batch.mask, noise=noise, first_input=batch.first_input), 1.0, config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), config.clip_norm)
    optimizer.step()
    return loss


# -- the data and the model of a preset ------------------------------------------------------------


def check_preset(preset: str, size: str | None) -> str:
    """The size to measure (the preset's default when None); UsageError for unknown names."""
    if preset not in BENCH_PRESETS:
        raise UsageError(f"Unknown benchmark preset {preset!r}.", f"Choose one of: {', '.join(BENCH_PRESETS)}.")
    size = size or DEFAULT_SIZES[preset]
    if size not in SIZES:
        raise UsageError(f"Unknown size {size!r}.", f"Choose one of: {', '.join(SIZES)}.")
    return size


def write_samples(path: Path, samples: int, rng: np.random.Generator | None) -> None:
    """A 1-D int16 .npy file of `samples` samples: Gaussian noise of SYNTHETIC_STD drawn from rng,
    or, without one, a hole (a sparse file: only the header is written, the samples read as zeros)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<i2")), "fortran_order": False, "shape": (samples,)}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        if rng is None:
            handle.truncate(handle.tell() + 2 * samples)
            return
        for start in range(0, samples, WRITE_CHUNK):
            count = min(WRITE_CHUNK, samples - start)
            noise = rng.normal(0.0, SYNTHETIC_STD * SAMPLE_SCALE, count)
            handle.write(np.clip(np.rint(noise), -32768, 32767).astype("<i2").tobytes())


def write_synthetic_audio(folder: Path, kind: str, sequences: int, rng: np.random.Generator | None) -> PreparedDataset:
    """A prepared audio dataset of `kind` (timit or blizzard: 16 kHz, frames of 200 samples,
    sequences of 40 frames, one "stream" train split) holding `sequences` sequences, written as
    write_samples does (rng None: a sparse file). Returns it opened, memory-mapped."""
    framing = Framing()  # TIMIT's and Blizzard's
    samples = framing.stream_range(0, sequences)[1]
    folder.mkdir(parents=True)
    files = {"samples": "train.samples.npy", "offsets": "train.offsets.npy"}
    write_samples(folder / files["samples"], samples, rng)
    np.save(folder / files["offsets"], np.asarray([0, samples], dtype=np.int64))
    audio = {
        "sample_rate": framing.sample_rate, "frame_size": framing.frame_size, "sequence_frames": framing.sequence_frames,
        "mean": 0.0, "std": SYNTHETIC_STD, "layout": {"train": "stream"}, "seconds": {"train": samples / framing.sample_rate},
        "skipped_files": 0,
    }
    meta = DatasetMeta(kind=kind, protocol=f"synthetic-{kind}", modality="frames", sequence_length=framing.sequence_frames,
                       counts={"train": sequences}, files={"train": files}, source="synthetic", audio=audio)
    write_json(folder / META_FILE, asdict(meta))
    return open_dataset(folder)


def write_synthetic_text(folder: Path, sequences: int, rng: np.random.Generator) -> PreparedDataset:
    """A prepared text dataset of IMDB's shape: a vocabulary of 16,000 words and the four
    specials, `sequences` sentences of the longest kept length (15 words, 16 steps with </s>),
    random word ids; one train split."""
    protocol = IMDB_PROTOCOL
    vocabulary = [*SPECIALS, *(f"word{index}" for index in range(protocol.vocabulary_size))]
    folder.mkdir(parents=True)
    files = {"tokens": "train.tokens.npy", "offsets": "train.offsets.npy"}
    tokens = rng.integers(len(SPECIALS), len(vocabulary), sequences * protocol.max_tokens).astype(np.uint16)
    np.save(folder / files["tokens"], tokens)
    np.save(folder / files["offsets"], np.arange(0, len(tokens) + 1, protocol.max_tokens, dtype=np.int64))
    text = {"vocabulary": vocabulary, "min_tokens": protocol.min_tokens, "max_tokens": protocol.max_tokens}
    meta = DatasetMeta(kind="imdb", protocol="synthetic-imdb", modality="tokens", sequence_length=protocol.max_tokens + 1,
                       counts={"train": sequences}, files={"train": files}, source="synthetic", text=text)
    write_json(folder / META_FILE, asdict(meta))
    return open_dataset(folder)


def bench_dataset(preset: str, folder: Path) -> PreparedDataset:
    """The prepared dataset a preset is measured on, written under folder."""
    rng = np.random.default_rng(0)
    if preset == "mnist":
        return prepare("mnist", EMBEDDED, folder / "mnist")
    if preset == "imdb":
        return write_synthetic_text(folder / preset, SYNTHETIC_SEQUENCES, rng)
    return write_synthetic_audio(folder / preset, preset, SYNTHETIC_SEQUENCES, rng)


@dataclass(frozen=True)
class Resize:
    """Widths and batch in place of the size's, where given (None: the size's own)."""

    hidden_size: int | None = None  # units of both LSTMs
    mlp_size: int | None = None  # hidden units of every MLP head
    batch_size: int | None = None  # sequences per update, at most SYNTHETIC_SEQUENCES


def bench_configs(size: str, meta: DatasetMeta, resize: Resize = Resize()) -> tuple[ZForcingConfig, TrainConfig]:
    """The preset's model and training configs at `size` for the dataset, as measured: α and β
    at least AUX_WEIGHT; tiny: TINY_MODEL widths and a batch of TINY_BATCH; then `resize`."""
    model_config, train_config = preset_configs("small" if size == "tiny" else size, meta)
    if size == "tiny":
        model_config = replace(model_config, **TINY_MODEL)
        train_config.batch_size = TINY_BATCH
    model_config = replace(model_config, hidden_size=resize.hidden_size or model_config.hidden_size,
                           mlp_size=resize.mlp_size or model_config.mlp_size)
    train_config.batch_size = resize.batch_size or train_config.batch_size
    train_config.aux_weight = train_config.aux_weight or AUX_WEIGHT
    train_config.bwd_weight = train_config.bwd_weight or AUX_WEIGHT
    return model_config, train_config


def training_setup(dataset: PreparedDataset, size: str, device: torch.device, resize: Resize = Resize()):
    """(model, train config, the first training batch on device) for a dataset."""
    model_config, train_config = bench_configs(size, dataset.meta, resize)
    torch.manual_seed(0)
    model = ZForcing(model_config).to(device)
    batch = dataset.split("train").batch(np.arange(train_config.batch_size)).to(device)
    return model, train_config, batch


# -- timing ----------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Meter:
    """Times calls, synchronising a GPU before and after, and on CUDA records the allocator's
    peaks: `peak` over every measured call, and per call the most memory it allocated above
    what was held before it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __call__(self, function: Callable[[], object]) -> tuple[float, int | None]:
        cuda = self.device.type == "cuda"
        synchronize(self.device)
        if cuda:
            held = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        began = time.perf_counter()
        function()
        synchronize(self.device)
        seconds = time.perf_counter() - began
        if not cuda:
            return seconds, None
        peak = torch.cuda.max_memory_allocated(self.device)
        self.peak = max(self.peak, peak)
        return seconds, peak - held


def interleaved_updates(updates: dict[str, Callable[[], object]], rounds: int, meter: Meter) -> dict[str, dict]:
    """Each update once as a warm-up, then `rounds` rounds of one update each, the order rotated
    every round. Per name: the median seconds and, on CUDA, the largest memory above the held."""
    names = list(updates)
    for name in names:
        meter(updates[name])
    seconds: dict[str, list[float]] = {name: [] for name in names}
    extra: dict[str, list[int]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed, memory = meter(updates[name])
            seconds[name].append(elapsed)
            if memory is not None:
                extra[name].append(memory)
    return {name: {"seconds": statistics.median(seconds[name]), "memory": max(extra[name], default=None)} for name in names}


def median_fetch_seconds(split, batch_size: int, budget: float) -> float:
    """Median seconds to fetch one random batch, fetching for about `budget` seconds (5 to 2000 times)."""
    rng = np.random.default_rng(0)
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < 5 or (len(times) < 2000 and time.perf_counter() - began < budget):
        start = time.perf_counter()
        split.batch(rng.integers(0, len(split), batch_size))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def process_memory() -> dict[str, int]:
    """This process's memory figures from /proc/self/status ("VmHWM", "RssAnon", ...), in
    bytes; empty where the system has no such file."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    return {name: int(value.split()[0]) * 1024 for name, _, value in (line.partition(":") for line in lines)
            if value.strip().endswith("kB")}


def peak_rss_bytes() -> int:
    """The process's peak resident memory: VmHWM where /proc tells, else getrusage."""
    if "VmHWM" in (status := process_memory()):
        return status["VmHWM"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def run(preset: str = "mnist", size: str | None = None, device_spec: str = "auto", updates: int = DEFAULT_UPDATES,
        folder: Path | None = None, progress: Progress | None = None, tf32: bool = False,
        resize: Resize = Resize()) -> dict:
    """The speed benchmark of one preset (see the module's docstring); a record of numbers.
    Temporary datasets go under folder (default: the temporary folder). tf32: on a GPU, every
    float32 product on TensorFloat-32 tensor cores (as `train --precision tf32`). resize: other
    widths or batch than the size's."""
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
                                     "fused_lstm_pair": pair_update}, updates, meter)
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


def machine_description(device: torch.device) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model_name(),
        "cores": cores,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def cpu_model_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# -- sharing the machine ---------------------------------------------------------------------------

READY, GO = "ready", "go"  # the start barrier between bench_shared and its workers


def shared_worker(seconds: float, threads: int | None, preset: str, size: str, folder: str | None) -> None:
    """One process of bench_shared: set up, wait for GO on stdin, train for `seconds`, print one
    JSON line. Every worker trains through the same window, so their timings overlap fully.

    It calls policy.refresh() before each update, as the trainer does, so the timing includes
    the policy's cost and its reaction to the other processes.
    """
    device = torch.device("cpu")
    with ThreadPolicy(threads) as policy, tempfile.TemporaryDirectory(prefix="zforcing-bench-", dir=folder) as temporary:
        model, train_config, batch = training_setup(bench_dataset(preset, Path(temporary)), size, device)
        optimizer = make_optimizer(model, train_config, fused=False)
        model.train(True)
        steps = itertools.count()
        update(model, optimizer, batch, train_config, step_generator(0, next(steps), device))  # warm-up
        print(READY, flush=True)
        sys.stdin.readline()  # GO: every worker is set up
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            policy.refresh()
            update(model, optimizer, batch, train_config, step_generator(0, next(steps), device))
        elapsed, updates = time.perf_counter() - began, next(steps) - 1
        result = {
            "ms_per_update": elapsed / updates * 1e3,
            "updates": updates,
            "batch_size": train_config.batch_size,
            "threads": policy.threads,
            "thread_changes": len(policy.changes),
        }
    print(json.dumps(result), flush=True)


def run_workers(count: int, seconds: float, threads: int | None, preset: str, size: str, folder: Path | None) -> list[dict]:
    """Start `count` shared_worker processes, release them together, return their results."""
    spec = json.dumps({"seconds": seconds, "threads": threads, "preset": preset, "size": size,
                       "folder": None if folder is None else str(folder)})
    command = [sys.executable, "-m", "zforcing_cli.bench", WORKER_FLAG, spec]
    workers = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(count)]
    try:
        for worker in workers:
            if worker.stdout.readline().strip() != READY:
                raise RuntimeError(f"benchmark worker exited early (status {worker.wait()})")
        for worker in workers:
            worker.stdin.write(GO + "\n")
            worker.stdin.close()
        return [worker_result(worker) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:  # only after a failure: do not leave the others training
                worker.kill()
                worker.wait()


def worker_result(worker: subprocess.Popen) -> dict:
    output = worker.stdout.read()
    if worker.wait() != 0:
        raise RuntimeError(f"benchmark worker failed (status {worker.returncode})")
    return json.loads(output.splitlines()[-1])


def bench_shared(processes: int, seconds: float, threads: int | None, preset: str = "mnist", size: str | None = None,
                 folder: Path | None = None) -> dict:
    """CPU training speed alone and shared, each measured over the same `seconds` window.

    - policy_cost_alone: how much slower one training is under the thread policy than with
      torch's own thread count (TORCH_DEFAULT_THREADS, as without the policy);
    - share_of_solo_speed: for each of `processes` trainings started together, solo ms per
      update / its ms per update (0.5: half the speed it has alone).
    """
    size = check_preset(preset, size)
    unmanaged = run_workers(1, seconds, TORCH_DEFAULT_THREADS, preset, size, folder)[0]
    solo = run_workers(1, seconds, threads, preset, size, folder)[0]
    concurrent = run_workers(processes, seconds, threads, preset, size, folder)
    shares = [solo["ms_per_update"] / result["ms_per_update"] for result in concurrent]
    return {
        "zforcing": __version__,
        "torch": torch.__version__,
        "machine": f"{cpu_model_name()}, {available_cores()} cores",
        "preset": preset,
        "size": size,
        "batch_size": solo["batch_size"],
        "processes": processes,
        "seconds": seconds,
        "thread_policy": "automatic" if threads is None else f"--threads {threads}",
        "torch_default_ms_per_update": unmanaged["ms_per_update"],
        "solo_ms_per_update": solo["ms_per_update"],
        "solo_threads": solo["threads"],
        "policy_cost_alone": solo["ms_per_update"] / unmanaged["ms_per_update"] - 1.0,
        "concurrent_ms_per_update": [result["ms_per_update"] for result in concurrent],
        "concurrent_threads": [result["threads"] for result in concurrent],
        "concurrent_thread_changes": [result["thread_changes"] for result in concurrent],
        "share_of_solo_speed": shares,
        "min_share_of_solo_speed": min(shares),
    }


def main(argv: list[str] | None = None) -> None:
    """`python -m zforcing_cli.bench ARGS` runs `zforcing bench ARGS`; bench_shared's workers
    start here too."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER_FLAG]:
        keep_freed_memory()  # as the command line does for the trainings it measures against
        shared_worker(**json.loads(argv[1]))
        return
    from .cli import (
        main as cli_main,  # the command line; the measuring above never needs it
    )

    sys.argv = ["zforcing", "bench", *argv]
    cli_main()


if __name__ == "__main__":
    main()
