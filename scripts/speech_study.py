"""What an audio model generates, measured: the study behind docs/speech.md's "Samples".

    python scripts/speech_study.py RUN OUT_DIR [--seconds 4] [--clips 8] [--seed 0]

For a trained audio run it measures, against the test split's real audio (as `zforcing evaluate
--samples` does), clips generated from the prior with the output's full noise, half of it and
none (its mean); the frame means with z from the posterior of real utterances, reading their real
past (reconstruction), and their full-noise draw; and continuations of the first second of real
clips. It prints a Markdown table, and writes OUT_DIR/spectrograms.png: a real clip beside
generated ones, each a spectrogram over the same colour scale.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from zforcing_cli.audioreport import real_clips
from zforcing_cli.audiostats import BANDS, log_spectral_distance, measure
from zforcing_cli.checkpoint import load_model, resolve_checkpoint
from zforcing_cli.data import open_dataset
from zforcing_cli.data.prepared import SAMPLE_SCALE
from zforcing_cli.generate import AudioFormat
from zforcing_cli.plots import SPECTROGRAM_FLOOR_DB, figure_bytes, new_figure, spectrogram


def as_waveforms(audio: AudioFormat, frames: torch.Tensor) -> list[np.ndarray]:
    return list(audio.to_samples(frames.float().numpy()) / SAMPLE_SCALE)


def real_sequences(audio: AudioFormat, samples: np.ndarray, count: int, steps: int) -> torch.Tensor:
    """(count, steps + 1, F) normalised frames of consecutive stretches of the real audio."""
    size = (steps + 1) * audio.frame_size
    count = min(count, len(samples) // size)
    return torch.stack([torch.from_numpy(audio.normalise(samples[i * size : (i + 1) * size])) for i in range(count)])


def study_rows(model, audio: AudioFormat, samples: np.ndarray, seconds: float, clips: int, seed: int) -> dict[str, list[np.ndarray]]:
    steps = audio.frames_for(seconds)
    rows = {"real (test split)": list(real_clips_of(samples, steps * audio.frame_size))}
    for name, scale in (("prior z, full output noise (sample)", 1.0), ("prior z, half the output noise (0.5)", 0.5),
                        ("prior z, output mean (mean, the default)", 0.0)):
        frames = model.generate(clips, steps, temperature=scale**2, generator=torch.Generator().manual_seed(seed))
        rows[name] = as_waveforms(audio, frames)
    real = real_sequences(audio, samples, clips, steps)
    with torch.no_grad():
        noise = torch.randn(real.shape[0], steps, model.config.latent_size, generator=torch.Generator().manual_seed(seed))
        states, _, _ = model.read(real[:, 1:], noise, real[:, 0])
        params = model.output_head(states[:, 1:])
    rows["posterior z, real past: frame means"] = as_waveforms(audio, model.distribution.split(params)[0])
    rows["posterior z, real past: full noise"] = as_waveforms(audio, model.distribution.sample(params, 1.0, torch.Generator().manual_seed(seed)))
    prompt = audio.frames_for(1.0)
    for name, scale in (("continuation of 1 s of real audio, mean", 0.0), ("continuation of 1 s of real audio, sample", 1.0)):
        generator = torch.Generator().manual_seed(seed)
        state = model.encode(real[:, 1:prompt], first_input=real[:, 0], generator=generator)
        frames = model.generate(real.shape[0], steps, temperature=scale**2, generator=generator, first_input=real[:, prompt - 1], state=state)
        rows[name] = as_waveforms(audio, frames)
    return rows


def real_clips_of(samples: np.ndarray, clip: int):
    class Split:  # real_clips reads a split's "samples" array
        arrays = {"samples": samples}

    return real_clips(Split, clip)


def markdown_table(rows: dict[str, list[np.ndarray]], sample_rate: int) -> str:
    measured = {name: measure(clips, sample_rate) for name, clips in rows.items()}
    reference = next(iter(measured.values())).spectrum
    lines = ["| audio | clips | spectral flatness | energy below 1 kHz | RMS variation | log-spectral distance | RMS |",
             "|---|---|---|---|---|---|---|"]
    for name, found in measured.items():
        rms = float(np.sqrt(np.mean(np.concatenate(rows[name]) ** 2)))
        lines.append(f"| {name} | {found.clips} | {found.flatness:.3f} | {100 * found.band_shares[BANDS[0]]:.1f}% | "
                     f"{found.rms_variation:.2f} | {log_spectral_distance(reference, found.spectrum):.1f} dB | {rms:.3f} |")
    return "\n".join(lines)


def write_spectrograms(path: Path, clips: list[tuple[str, np.ndarray]], sample_rate: int) -> None:
    """One spectrogram per clip, side by side, on one colour scale (dB relative to a full-scale sine)."""
    figure = new_figure(4.2 * len(clips), 3.6)
    axes = figure.subplots(1, len(clips), sharey=True)
    for axis, (title, waveform) in zip(axes, clips):
        db, (start, stop) = spectrogram(waveform, sample_rate)
        image = axis.imshow(db, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
                            extent=(start, stop, 0, sample_rate / 2), vmin=SPECTROGRAM_FLOOR_DB, vmax=0.0)
        axis.set(title=title, xlabel="time (s)")
    axes[0].set(ylabel="frequency (Hz)")
    figure.colorbar(image, ax=list(axes), label="power (dB)", shrink=0.8)
    path.write_bytes(figure_bytes(figure, "png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, config = load_model(resolve_checkpoint(args.run, Path("runs")), "cpu")
    model.train(False)
    audio = AudioFormat.of(config["data"])
    samples = np.asarray(open_dataset(config["data"]["location"]).split("test").arrays["samples"])
    rows = study_rows(model, audio, samples, args.seconds, args.clips, args.seed)
    print(markdown_table(rows, audio.sample_rate))
    args.out.mkdir(parents=True, exist_ok=True)
    shown = [("real (test split)", rows["real (test split)"][0]), ("generated: mean", rows["prior z, output mean (mean, the default)"][0]),
             ("generated: sample", rows["prior z, full output noise (sample)"][0])]
    write_spectrograms(args.out / "spectrograms.png", shown, audio.sample_rate)


if __name__ == "__main__":
    main()
