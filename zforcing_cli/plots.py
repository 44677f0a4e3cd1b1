"""Pictures: PNG image grids and SVG training curves without a plotting library; waveform and
spectrogram PNGs of audio with matplotlib (its Agg canvas, no pyplot, imported only when used)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np

from .fileio import write_bytes

CURVE_PANELS = (  # (title, metric key)
    ("ELBO (nats / sequence)", "elbo"),
    ("KL (nats / sequence)", "kl"),
    ("auxiliary cost −log p(b|z)", "aux"),
)
PANEL_WIDTH, PANEL_HEIGHT, MARGIN = 360, 240, 72
SPECTROGRAM_WINDOW = 0.025  # seconds per analysis window (a quarter of it between windows)
SPECTROGRAM_FLOOR_DB = -100.0  # dB below full scale shown as the quietest colour


# -- PNG -------------------------------------------------------------------------------------------


def image_grid(images: np.ndarray, columns: int, border: int = 2) -> np.ndarray:
    """(N, H, W) values in [0, 1] -> one (rows·(H+b)+b, columns·(W+b)+b) uint8 picture."""
    count, height, width = images.shape
    rows = -(-count // columns)
    grid = np.full((rows * (height + border) + border, columns * (width + border) + border), 128, np.uint8)
    for index, image in enumerate(images):
        top = border + (index // columns) * (height + border)
        left = border + (index % columns) * (width + border)
        grid[top : top + height, left : left + width] = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    return grid


def write_png(path: Path, grey: np.ndarray, scale: int = 1) -> None:
    """Write an 8-bit greyscale PNG (each pixel repeated scale × scale)."""
    grey = np.repeat(np.repeat(np.asarray(grey, np.uint8), scale, axis=0), scale, axis=1)
    height, width = grey.shape
    raw = b"".join(b"\x00" + grey[row].tobytes() for row in range(height))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    write_bytes(path, png)


# -- SVG curves -------------------------------------------------------------------------------------


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


def write_training_curves(metrics_path: Path, out: Path) -> None:
    """ELBO, KL and auxiliary cost against updates, training (line) and validation (dots)."""
    records = read_metrics(metrics_path)
    panels = []
    for index, (title, key) in enumerate(CURVE_PANELS):
        train = [(r["step"], r[key]) for r in records if r["type"] == "train" and r.get(key) is not None]
        valid = [(r["step"], r[key]) for r in records if r["type"] == "valid" and r.get(key) is not None]
        panels.append(svg_panel(index * (PANEL_WIDTH + MARGIN), title, train, valid))
    width = len(CURVE_PANELS) * (PANEL_WIDTH + MARGIN) + MARGIN
    height = PANEL_HEIGHT + 84
    legend = (
        f'<text x="{MARGIN}" y="{height - 8}" fill="#555">line: training batches · '
        'dots: validation · x: updates</text>'
    )
    write_bytes(out, (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">\n<rect width="100%" height="100%" fill="white"/>\n'
        + "\n".join(panels + [legend]) + "\n</svg>\n"
    ).encode())


def svg_panel(offset: int, title: str, train: list[tuple[float, float]], valid: list[tuple[float, float]]) -> str:
    left, top = offset + MARGIN, MARGIN // 2 + 12
    points = train + valid
    parts = [
        f'<text x="{left + PANEL_WIDTH / 2}" y="{top - 6}" text-anchor="middle" font-weight="bold">{title}</text>',
        f'<rect x="{left}" y="{top}" width="{PANEL_WIDTH}" height="{PANEL_HEIGHT}" fill="none" stroke="#888"/>',
    ]
    if not points:
        return "\n".join(parts)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def to_svg(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * PANEL_WIDTH, top + PANEL_HEIGHT - (y - y0) / (y1 - y0) * PANEL_HEIGHT

    if train:
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in (to_svg(x, y) for x, y in train))
        parts.append(f'<polyline points="{path}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
    for x, y in valid:
        a, b = to_svg(x, y)
        parts.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="#d62728"/>')
    parts += [
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{axis_label(y1)}</text>',
        f'<text x="{left - 4}" y="{top + PANEL_HEIGHT}" text-anchor="end">{axis_label(y0)}</text>',
        f'<text x="{left}" y="{top + PANEL_HEIGHT + 14}">{x0:g}</text>',
        f'<text x="{left + PANEL_WIDTH}" y="{top + PANEL_HEIGHT + 14}" text-anchor="end">{x1:g} updates</text>',
    ]
    return "\n".join(parts)


def axis_label(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


# -- audio: waveform and spectrogram ----------------------------------------------------------------


def spectrogram(waveform: np.ndarray, sample_rate: int) -> tuple[np.ndarray, tuple[float, float]]:
    """(frequencies, windows) power in dB relative to a full-scale sine (0 dB), floored at
    SPECTROGRAM_FLOOR_DB, from Hann-windowed frames of SPECTROGRAM_WINDOW seconds; and the time
    span (s) its columns cover, each column centred on its window."""
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
    # Imported here, not at the top: matplotlib takes a good part of a second to import.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    duration = max(len(waveform), 1) / sample_rate
    figure = Figure(figsize=(9, 5.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
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
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes(path, buffer.getvalue())
