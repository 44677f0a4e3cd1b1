"""`zforcing evaluate --samples N`: how close an audio model's samples come to real audio."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from ..console import JobProgress, plural, stderr, stdout
from ..errors import ZForcingError
from .common import usage_error

if TYPE_CHECKING:  # loads torch
    from ..audioreport import SampleReport
    from ..data import PreparedDataset
    from ..model import ZForcing

# What the samples report is read against (docs/speech.md): real speech's medians on the
# asterisk prompts, and the target for samples that sound like speech.
SPEECH_FLATNESS_TARGET = 0.1
SPEECH_LOW_BAND_TARGET = 0.6


def check_samples_options(samples: int | None, seconds: float | None, output_noise: str, spectra: Path | None, iwae: int,
                          diagnostics: bool, limit: int, force: bool) -> None:
    """--samples measures generated audio instead of the bounds: its own options need it, the
    bounds' options go without it."""
    from ..fileio import check_can_write

    if samples is None:
        from .common import DEFAULT_OUTPUT_NOISE

        for option, given in (("--seconds", seconds is not None), ("--spectra", spectra is not None),
                              ("--output-noise", output_noise != DEFAULT_OUTPUT_NOISE)):
            if given:
                raise usage_error(f"{option} applies to the samples report: it needs --samples N.", "For example --samples 20.")
        return
    if iwae or diagnostics or limit:
        raise usage_error("--samples measures generated audio instead of the bounds; --iwae, --diagnostics and --limit are the bounds' options.",
                          "Run evaluate twice: once with --samples, once for the bounds.")
    if spectra is not None:
        if spectra.suffix.lower() not in (".png", ".svg"):
            raise usage_error(f"--spectra {spectra.name!r} is not a .png or .svg file.", "For example --spectra spectra.png.")
        check_can_write(spectra, force)


def check_audio_model(model: ZForcing) -> None:
    if model.config.modality != "frames":
        kind = {"binary": "a binary-image", "tokens": "a text"}[model.config.modality]
        raise ZForcingError(
            f"--samples measures generated audio against real audio; this is {kind} model.",
            "Use --samples with an audio model (trained on wav, timit or blizzard data); `zforcing sample` shows what this one generates.",
        )


def evaluate_samples(model: ZForcing, config: dict, dataset: PreparedDataset, split: str, num: int, seconds: float | None,
                     output_noise: float, seed: int, spectra: Path | None, as_json: bool) -> None:
    from ..audioreport import DEFAULT_CLIP_SECONDS, sample_report
    from ..generate import AudioFormat

    check_audio_model(model)
    seconds = seconds or DEFAULT_CLIP_SECONDS
    audio = AudioFormat.of(config["data"])
    clip = audio.seconds(audio.frames_for(seconds))  # whole frames
    with JobProgress(f"Generating {plural(num, 'clip')} of {clip:g} s", shorten="ask for fewer with --samples") as progress:
        report = sample_report(model, config["data"], dataset.split(split), num, seconds,
                               output_noise=output_noise, seed=seed,
                               progress=lambda done, total: progress(done, total, f"{done:,} of {total:,} clips"))
    if spectra is not None:
        from ..plots import write_spectra_plot

        write_spectra_plot(spectra, [(row.name, row.measures.frequencies, row.measures.spectrum) for row in report.rows],
                           f"Average spectra: {dataset.meta.kind}, {split} split against {plural(num, 'generated clip')}")
    if as_json:
        stdout.print_json(json.dumps({"split": split, "data": dataset.location, "seed": seed, **report.as_dict()}))
    else:
        stdout.print(samples_table(report, f"{dataset.meta.kind}: {split} split against samples (output noise {noise_words(output_noise)})"))
    if spectra is not None:
        stderr.print(escape(f"Wrote the average spectra to {spectra}"), soft_wrap=True)


def noise_words(scale: float) -> str:
    return {0.0: "mean", 1.0: "sample"}.get(scale, f"{scale:g}")


def samples_table(report: SampleReport, title: str) -> Table:
    """One column per row of the report (real, generated, white noise), one line per measure;
    a band above the Nyquist frequency is left out."""
    from ..audiostats import BAND_EDGES_HZ, BANDS

    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("measure")
    for row in report.rows:
        table.add_column(escape(row.name), justify="right")
    bands = BANDS if report.sample_rate / 2 > BAND_EDGES_HZ[-1] else BANDS[:-1]
    lines = [("clips", lambda row: f"{row.measures.clips:,} × {report.clip_seconds:g} s"),
             ("spectral flatness (median)", lambda row: f"{row.measures.flatness:.4f}"),
             *((f"energy {band}", lambda row, band=band: f"{100 * row.measures.band_shares[band]:.1f}%") for band in bands),
             ("RMS variation (median)", lambda row: f"{row.measures.rms_variation:.2f}"),
             ("log-spectral distance to real", lambda row: f"{row.distance:.1f} dB")]
    for name, cell in lines:
        table.add_row(name, *(cell(row) for row in report.rows))
    return table
