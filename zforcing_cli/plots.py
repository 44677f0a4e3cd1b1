"""Pictures, drawn by matplotlib (its Agg canvas, no pyplot; imported only when a picture is
drawn, as it takes a good part of a second) and Pillow: training curves as PNG and SVG, grids
of sampled images, and waveform-and-spectrogram PNGs of audio. numpy too is imported by the
functions that take arrays: `zforcing compare` reads the curves' names from here for its help."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from .fileio import write_bytes

if TYPE_CHECKING:
    import numpy as np

CURVE_PANELS = (  # (title, metric key, y label)
    ("ELBO", "elbo", "nats"),
    ("KL(q ‖ p)", "kl", "nats"),
    ("auxiliary cost −log p(b_t | z_t)", "aux", "nats"),
    ("learning rate", "lr", "Adam step size"),
)
CURVE_FORMATS = ("png", "svg")
TRAIN_COLOUR, VALID_COLOUR = "#1f77b4", "#d62728"
SPECTROGRAM_WINDOW = 0.025  # seconds per analysis window (a quarter of it between windows)
SPECTROGRAM_FLOOR_DB = -100.0  # dB below full scale shown as the quietest colour


def new_figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas (no pyplot, so no global state and no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def figure_bytes(figure, fmt: str) -> bytes:
    """The figure as PNG or SVG; SVG keeps its text as text, so it can be searched and edited."""
    from matplotlib import rc_context

    buffer = io.BytesIO()
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "zforcing"}):
        figure.savefig(buffer, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    return buffer.getvalue()


# -- images ----------------------------------------------------------------------------------------


def image_grid(images: np.ndarray, columns: int, border: int = 2) -> np.ndarray:
    """(N, H, W) values in [0, 1] -> one (rows·(H+b)+b, columns·(W+b)+b) uint8 picture."""
    import numpy as np

    count, height, width = images.shape
    rows = -(-count // columns)
    grid = np.full((rows * (height + border) + border, columns * (width + border) + border), 128, np.uint8)
    for index, image in enumerate(images):
        top = border + (index // columns) * (height + border)
        left = border + (index % columns) * (width + border)
        grid[top : top + height, left : left + width] = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    return grid


def write_png(path: Path, grey: np.ndarray, scale: int = 1) -> None:
    """Write an 8-bit greyscale PNG through Pillow, each pixel a scale × scale square."""
    import numpy as np
    from PIL import Image

    picture = Image.fromarray(np.asarray(grey, np.uint8))  # 2-D uint8: greyscale ("L")
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    write_bytes(path, buffer.getvalue())


# -- training curves ----------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut short by a kill
            continue
    return records


def metric_points(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(updates, values) of one metric in the records of one type (train or valid), finite only."""
    points = [(r["step"], r[key]) for r in records
              if r.get("type") == kind and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [step for step, _ in points], [value for _, value in points]


def draw_metric(axes, records: list[dict], key: str, label: str = "", colour: str = TRAIN_COLOUR) -> None:
    """One run's metric on axes: training batches as a line, validations as dots."""
    steps, values = metric_points(records, "train", key)
    if steps:
        axes.plot(steps, values, color=colour, linewidth=1.2, alpha=0.85, label=f"{label} training".strip())
    steps, values = metric_points(records, "valid", key)
    if steps:
        axes.plot(steps, values, "o", color=colour if label else VALID_COLOUR, markersize=4,
                  label=f"{label} validation".strip())


def curves_figure(records: list[dict], unit: str):
    """ELBO, KL, auxiliary cost and learning rate against updates (the paper's Figure 2 and more)."""
    figure = new_figure(13, 7.5)
    for axes, (title, key, ylabel) in zip(figure.subplots(2, 2).flat, CURVE_PANELS):
        draw_metric(axes, records, key)
        axes.set(title=title, xlabel="updates", ylabel=ylabel if key == "lr" else f"{ylabel} ({unit.removeprefix('nats ')})")
        axes.grid(True, alpha=0.3)
        if key == "lr":
            axes.set_yscale("log")
        if axes.has_data():
            axes.legend(loc="best", fontsize=8)
    return figure


def write_training_curves(metrics_path: Path, out_stem: Path, unit: str = "nats per sequence") -> list[Path]:
    """out_stem.png and out_stem.svg: the run's curves; returns their paths."""
    figure = curves_figure(read_metrics(metrics_path), unit)
    paths = [Path(f"{out_stem}.{fmt}") for fmt in CURVE_FORMATS]
    for path, fmt in zip(paths, CURVE_FORMATS):
        write_bytes(path, figure_bytes(figure, fmt))
    return paths


# -- audio: waveform and spectrogram ----------------------------------------------------------------


def spectrogram(waveform: np.ndarray, sample_rate: int) -> tuple[np.ndarray, tuple[float, float]]:
    """(frequencies, windows) power in dB relative to a full-scale sine (0 dB), floored at
    SPECTROGRAM_FLOOR_DB, from Hann-windowed frames of SPECTROGRAM_WINDOW seconds; and the time
    span (s) its columns cover, each column centred on its window."""
    import numpy as np

    size = max(2, int(sample_rate * SPECTROGRAM_WINDOW))
    hop = max(1, size // 4)
    waveform = np.asarray(waveform, dtype=np.float64)
    if len(waveform) < size:
        waveform = np.pad(waveform, (0, size - len(waveform)))
    window = np.hanning(size)
    frames = np.lib.stride_tricks.sliding_window_view(waveform, size)[::hop] * window
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2 / (window.sum() / 2) ** 2
    db = 10.0 * np.log10(np.maximum(power, 10.0 ** (SPECTROGRAM_FLOOR_DB / 10.0))).T
    start = (size - hop) / 2 / sample_rate
    return db, (start, start + db.shape[1] * hop / sample_rate)


def write_audio_plot(path: Path, waveform: np.ndarray, sample_rate: int, title: str, boundary: float | None = None) -> None:
    """A PNG of a waveform (values in [-1, 1]): the signal on top, its spectrogram below, a
    dashed line at `boundary` seconds (where a prompt ends) when given."""
    import numpy as np

    duration = max(len(waveform), 1) / sample_rate
    figure = new_figure(9, 5.5)
    wave_axes, spectrum_axes = figure.subplots(2, 1, sharex=True)
    wave_axes.plot(np.arange(len(waveform)) / sample_rate, waveform, linewidth=0.4, color="#1f77b4")
    wave_axes.set(title=title, ylabel="amplitude", ylim=(-1.05, 1.05), xlim=(0, duration))
    db, (start, stop) = spectrogram(waveform, sample_rate)
    image = spectrum_axes.imshow(
        db, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
        extent=(start, stop, 0, sample_rate / 2), vmin=SPECTROGRAM_FLOOR_DB, vmax=0.0,
    )
    spectrum_axes.set(xlabel="time (s)", ylabel="frequency (Hz)")
    figure.colorbar(image, ax=[wave_axes, spectrum_axes], label="power (dB)", shrink=0.5, anchor=(0.0, 0.0))
    if boundary is not None:
        for axes in (wave_axes, spectrum_axes):
            axes.axvline(boundary, color="#2ca02c", linestyle="--", linewidth=1.2)
        wave_axes.text(boundary, 1.0, " prompt | generated", color="#2ca02c", va="top", fontsize=8)
    write_bytes(path, figure_bytes(figure, "png"))


SPECTRA_COLOURS = {"real": "#2ca02c", "generated": "#1f77b4", "white noise": "#7f7f7f"}


def write_spectra_plot(path: Path, spectra: list[tuple[str, np.ndarray, np.ndarray]], title: str) -> None:
    """Average power spectra overlaid, in dB: (name, frequencies in Hz, spectrum scaled to unit
    power) each, DC left out; .png or .svg by the path's suffix."""
    import numpy as np

    figure = new_figure(8, 4.5)
    axes = figure.subplots()
    for name, frequencies, spectrum in spectra:
        axes.plot(frequencies[1:], 10 * np.log10(np.maximum(spectrum[1:], 1e-20)), label=name,
                  color=SPECTRA_COLOURS.get(name), linewidth=1.2)
    axes.set(title=title, xlabel="frequency (Hz)", ylabel="share of the power (dB)")
    axes.grid(True, alpha=0.3)
    axes.legend()
    write_bytes(path, figure_bytes(figure, Path(path).suffix.lower().lstrip(".")))
