"""`zforcing evaluate`: the paper's bounds on a split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape

from ..checkpoint import load_model, resolve_checkpoint
from ..console import JobProgress, plural, results_table, stderr, stdout
from ..data import EMBEDDED, check_prepared_folder, open_dataset
from ..errors import DataError, ZForcingError
from ..fileio import check_can_write, json_record
from .common import (
    DEFAULT_OUTPUT_NOISE,
    MAX_SEED,
    RUNS_ROOT,
    CheckpointArgument,
    DeviceOption,
    OutputNoiseOption,
    ThreadsOption,
    announce_loop_builds,
    check_real,
    output_noise_scale,
    usage_error,
)
from .evaluate_samples import check_samples_options, evaluate_samples

if TYPE_CHECKING:  # the core is imported once the options and paths are checked: it loads torch
    from ..data import PreparedDataset
    from ..diagnostics import Diagnostics
    from ..evaluate import EvalResult
    from ..model import ZForcing

EPILOG = ("**Examples:** `zforcing evaluate runs/latest --iwae 50`; `zforcing evaluate --split valid --json`; "
          "on a text model `zforcing evaluate --iwae 25` gives the word perplexities of the paper's Table 2; "
          "on an audio model `zforcing evaluate --samples 20 --spectra spectra.png` measures how close its samples come to real audio.")


def evaluate_cli(
    checkpoint: CheckpointArgument = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Prepared dataset; default: the one the model was trained on.")] = None,
    split: Annotated[str, typer.Option("--split", help="test or valid.")] = "test",
    iwae: Annotated[int, typer.Option("--iwae", min=0, help="Also report the importance-weighted bound with K samples (K times the work of the ELBO).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequence copies (sequences times IWAE samples) per forward pass: bounds the memory.")] = 500,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Evaluate only the first N sequences (0: all).")] = 0,
    diagnostics: Annotated[bool, typer.Option("--diagnostics", help="Also measure whether the latents are in use: the KL rate per step and per sequence, the latent dimensions in use (KL > 0.01 nats at a step), AU-Δ (Var of μ_q − μ_p > 0.01), KL per step and per dimension, auxiliary cost per step (one more pass over the data).")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="With --diagnostics: write a heat map of KL over time × latent dimension, and the KL and the dimensions in use per step (.png or .svg).", show_default=False)] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", min=1, help="Audio models: instead of the bounds, generate N clips from the prior and measure them against the split's real audio and white noise: spectral flatness, energy by band, RMS variation, log-spectral distance.", show_default=False)] = None,
    seconds: Annotated[Optional[float], typer.Option("--seconds", help="With --samples: seconds per clip, generated and real.", show_default="4")] = None,
    output_noise: OutputNoiseOption = DEFAULT_OUTPUT_NOISE,
    spectra: Annotated[Optional[Path], typer.Option("--spectra", help="With --samples: write the average spectra of the real audio, the samples and white noise, overlaid (.png or .svg).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --plot or --spectra file.")] = False,
    device: DeviceOption = "auto",
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, max=MAX_SEED, help="Seeds the posterior samples; with the run's seed, --split valid gives training's validation figure.", show_default="the run's training seed")] = None,
    threads: ThreadsOption = None,
) -> None:
    """Report the paper's bounds on a split: ELBO, KL and (with --iwae K) the IWAE bound, in nats; or (with --samples N) how close an audio model's samples come to the split's real audio."""
    check_options(split, diagnostics, plot, force)
    check_real("--seconds", seconds, example="4", above=True)
    noise = output_noise_scale(output_noise)
    check_samples_options(samples, seconds, output_noise, spectra, iwae, diagnostics, limit, force)
    folder = resolve_checkpoint(checkpoint, RUNS_ROOT).resolve()
    if data is not None and data != EMBEDDED:
        check_prepared_folder(data)
    announce_loop_builds()
    from ..device import resolve_device
    from ..diagnostics import diagnose_split, write_diagnostics_plot
    from ..evaluate import sequence_count
    from ..threads import ThreadPolicy

    torch_device = resolve_device(device)
    model, config = load_model(folder, torch_device)
    if not model.config.latent:
        iwae, diagnostics, plot = latent_free_options(iwae, diagnostics, plot)
    dataset = model_dataset(model, config, data)
    sequences = sequence_count(dataset.split(split), limit or None)
    seed = config["train"]["seed"] if seed is None else seed
    if samples is not None:
        with ThreadPolicy(threads):
            evaluate_samples(model, config, dataset, split, samples, seconds, noise, seed, spectra, as_json)
        return
    with ThreadPolicy(threads) as policy, JobProgress(f"Evaluating {split}", shorten=SHORTEN) as progress:
        if split == "valid":
            note = validation_difference(config, dataset, sequences, seed, policy.threads)
            if note:
                stderr.print(escape(note), soft_wrap=True)
        result = evaluate_split(
            model, dataset.split(split), batch_size=batch_size, device=torch_device, seed=seed,
            limit=limit or None, iwae_samples=iwae, progress=evaluation_progress(progress, sequences, iwae),
        )
    found = None
    if diagnostics:
        with ThreadPolicy(threads), JobProgress(f"Diagnosing {split}", shorten="evaluate fewer sequences with --limit") as progress:
            found = diagnose_split(model, dataset.split(split), batch_size=batch_size, device=torch_device, seed=seed,
                                   limit=limit or None, progress=evaluation_progress(progress, sequences, 0))
        if plot is not None:
            write_diagnostics_plot(found, plot, f"KL(q ‖ p) per step and latent dimension: {dataset.meta.kind}, {split} split")
    text = text_figures(result, dataset, split, limit) if dataset.meta.modality == "tokens" else {}
    report = evaluation_report(folder, dataset, split, limit, seed, policy.threads, result, text, found, model.config.latent)
    print_report(report, as_json, folder, dataset, split, result, text, found)
    if plot is not None:
        stderr.print(escape(f"Wrote the KL heat map to {plot}"), soft_wrap=True)
    if report["status"] != "ok":
        raise ZForcingError(
            f"The bounds came out non-finite ({report['status'].split(': ')[1]}): they are not results.",
            "The model overflows on this data; check the checkpoint with another split, or train again with a lower --lr.",
        )


def latent_free_options(iwae: int, diagnostics: bool, plot: Path | None) -> tuple[int, bool, Path | None]:
    """What evaluates a model without latent (trained with --no-latent): its ELBO is its exact
    NLL, so there is no IWAE bound to tighten it and no latent to diagnose; a note says which
    option is skipped (a script that evaluates several runs keeps working)."""
    skipped = [option for option, given in (("--iwae", iwae), ("--diagnostics", diagnostics)) if given]
    if skipped:
        stderr.print(f"Note: the model has no latent (trained with --no-latent): its NLL is exact, so {' and '.join(skipped)} "
                     f"{'is' if len(skipped) == 1 else 'are'} skipped.", soft_wrap=True)
    return 0, False, None


def evaluate_split(*args, **kwargs) -> EvalResult:
    """The core's evaluate_split, imported when first called (it loads torch)."""
    from ..evaluate import evaluate_split as evaluate

    return evaluate(*args, **kwargs)


def check_options(split: str, diagnostics: bool, plot: Path | None, force: bool) -> None:
    if split not in ("test", "valid"):
        raise usage_error(f"--split must be test or valid, not {split!r}.", "Use --split test (the default) or --split valid.")
    if plot is not None:
        if not diagnostics:
            raise usage_error("--plot draws the diagnostics: it needs --diagnostics.", "Add --diagnostics.")
        if plot.suffix.lower() not in (".png", ".svg"):
            raise usage_error(f"--plot {plot.name!r} is not a .png or .svg file.", "For example --plot kl.png.")
        check_can_write(plot, force)


def model_dataset(model: ZForcing, config: dict, data: str | None) -> PreparedDataset:
    """The dataset to evaluate on (--data, else the one the model was trained on), refused when
    its data are not what the model models."""
    from ..runconfig import audio_format_differences

    dataset = open_training_data(config) if data is None else open_dataset(data)
    if dataset.meta.modality != model.config.modality:
        raise ZForcingError(
            f"The dataset holds {dataset.meta.modality} data but the model models {model.config.modality} data.",
            "Pass the --data the model was trained on.",
        )
    differences = audio_format_differences(config["data"], dataset)
    if differences:
        audio = config["data"]["audio"]
        raise ZForcingError(
            f"The dataset at {dataset.location} is not audio as the model reads it: {'; '.join(differences)}.",
            f"Prepare the audio at the model's framing (zforcing prepare wav SOURCE --sample-rate {audio['sample_rate']} "
            f"--frame-size {audio['frame_size']}) and pass that with --data.",
        )
    if dataset.meta.text and dataset.meta.text["vocabulary"] != (config["data"].get("text") or {}).get("vocabulary"):
        raise ZForcingError(
            f"The dataset at {dataset.location} has another vocabulary than the model's: its word ids mean other words.",
            "Evaluate on the dataset the model was trained on, or one prepared from the same corpus with the same options.",
        )
    return dataset


def validation_difference(config: dict, dataset: PreparedDataset, sequences: int, seed: int, threads: int) -> str:
    """Why this evaluation of the valid split cannot give training's validation figure (its
    sequences, its seed or its data differ), or "" when it does the same. Another thread count
    than training's may change the last digits only (the order of the sums), and is said too."""
    from ..evaluate import sequence_count
    from ..runconfig import dataset_differences

    trained = config["train"]
    validated = sequence_count(dataset.split("valid"), trained.get("valid_limit") or None)
    reasons = []
    if validated != sequences:
        whole = len(dataset.split("valid"))
        taken = f"all {whole:,}" if sequences == whole else f"the first {sequences:,}"
        reasons.append(f"training validated on the first {validated:,} valid sequences; this is {taken} "
                       f"(--limit {validated} takes the same)")
    if seed != trained["seed"]:
        reasons.append(f"training drew its samples with --seed {trained['seed']}, this with --seed {seed}")
    if dataset_differences(config["data"], dataset):
        reasons.append("training validated on other data")
    recorded = config.get("threads")
    if recorded is not None and recorded != threads:
        reasons.append(f"training ran on {plural(recorded, 'thread')}, this on {threads:,}, which may change the last digits "
                       f"(--threads {recorded} takes the same)")
    if not reasons:
        return ""
    return f"Note: not training's validation figure: {'; '.join(reasons)}."


def evaluation_report(folder: Path, dataset: PreparedDataset, split: str, limit: int, seed: int, threads: int,
                      result: EvalResult, text: dict, found: Diagnostics | None, latent: bool = True) -> dict:
    """Every figure of the evaluation, as --json prints it; text: text_figures' (empty unless text).
    latent False (a model without latent): `exact` is true, and the ELBO is minus the NLL itself."""
    from ..evaluate import BASELINES, baseline_nll, bound_unit

    per_sample = samples_per_sequence(result, dataset.meta)
    baseline = {"baseline": BASELINES[dataset.meta.modality], "baseline_nll": baseline_nll(dataset, split, limit or None)}
    return json_record({
        "checkpoint": str(folder), "split": split, "data": dataset.location, "seed": seed, "threads": threads, "unit": bound_unit(dataset.meta.modality),
        "exact": not latent, **result.to_dict(), "nll_elbo": -result.elbo,
        "nll_iwae": None if result.iwae is None else -result.iwae, **baseline,
        **({} if per_sample is None else per_sample_figures(result, per_sample, baseline["baseline_nll"])),
        **text,
        **({} if found is None else {"diagnostics": found.to_dict()}),
    })


def print_report(report: dict, as_json: bool, folder: Path, dataset: PreparedDataset, split: str, result: EvalResult,
                 text: dict, found: Diagnostics | None) -> None:
    """The report as JSON on stdout, or as a table (and the checkpoint's name on stderr)."""
    if as_json:
        stdout.print_json(json.dumps(report, allow_nan=False))
        return
    stderr.print(escape(f"checkpoint {folder}"), soft_wrap=True)
    if text:
        rows = text_rows(result, text, report)
    elif dataset.meta.modality == "frames":
        rows = audio_rows(result, report)
    else:
        rows = result_rows(result, report["unit"], report)
    if report["exact"]:
        rows = exact_rows(rows)
    stdout.print(results_table(f"{dataset.meta.kind}, {split} split", rows + ([] if found is None else diagnostic_rows(found))))


def exact_rows(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The rows of a model without latent: its "bound by the ELBO" is the exact figure, and it has
    no KL."""
    return [(label.replace("≤ (ELBO)", "(exact)").replace("≥ (ELBO)", "(exact)"), value)
            for label, value in rows if not label.startswith("KL")]


def samples_per_sequence(result: EvalResult, meta) -> float | None:
    """Audio: the waveform samples one average sequence's bound covers (its target frames)."""
    if meta.modality != "frames":
        return None
    return result.steps * meta.input_size / result.sequences


def per_sample_figures(result: EvalResult, per_sample: float, baseline: float) -> dict:
    """Audio's bounds and baseline per waveform sample, which compare across sequence lengths."""
    return {
        "samples_per_sequence": per_sample, "nll_elbo_per_sample": -result.elbo / per_sample,
        "nll_iwae_per_sample": None if result.iwae is None else -result.iwae / per_sample,
        "baseline_nll_per_sample": baseline / per_sample,
    }


def count(value: float) -> str:
    """'8,000' for a whole number, '8,123.4' for an average that is not one."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def audio_rows(result: EvalResult, report: dict) -> list[tuple[str, str]]:
    """The paper's Table 1 sign and unit (average log-likelihood ≥ bound, per sequence), and the
    bounds per waveform sample, which compare across sequence lengths, beside the baseline's:
    every figure a log-likelihood, higher is better (bound_sign)."""
    rows = [("sequences", count(result.sequences)), ("waveform samples per sequence", count(report["samples_per_sequence"])),
            ("log-likelihood ≥ (ELBO), nats per sequence", f"{result.elbo:,.2f}")]
    if result.iwae is not None:
        rows.append((f"log-likelihood ≥ (IWAE, K={result.iwae_samples}), nats per sequence", f"{result.iwae:,.2f}"))
    rows.append(("log-likelihood ≥ (ELBO), nats per sample", f"{-report['nll_elbo_per_sample']:.4f}"))
    if result.iwae is not None:
        rows.append((f"log-likelihood ≥ (IWAE, K={result.iwae_samples}), nats per sample", f"{-report['nll_iwae_per_sample']:.4f}"))
    return rows + [("KL, nats per sequence", f"{result.kl:.2f}"),
                   ("baseline log-likelihood (global Gaussian), nats per sample", f"{-report['baseline_nll_per_sample']:.4f}")]


def diagnostic_rows(found: Diagnostics) -> list[tuple[str, str]]:
    """What the diagnostics say in a few figures, the KL-based ones first; --json has the arrays."""
    import numpy as np

    peak = int(np.argmax(found.kl_per_step)) if found.kl_per_step else 0
    of_all = f"of {found.latent_size}"
    in_use = f"dimensions in use (KL > {found.in_use_threshold:g} nats)"
    au_delta = f"AU-Δ (Var(μ_q − μ_p) > {found.active_threshold:g})"
    return [
        ("KL rate, nats per step", f"{found.kl_per_valid_step:.4g}"),
        (f"{in_use}, at some step", f"{found.in_use_dimensions} {of_all}"),
        (f"{in_use}, per step", f"{found.mean_in_use_per_step:.2f} {of_all} on average"),
        ("(step, dimension) pairs in use", f"{found.in_use_units:,} of {len(found.kl_per_step) * found.latent_size:,}"),
        (f"{au_delta}, at some step", f"{found.au_delta_dimensions} {of_all}"),
        (f"{au_delta}, per step", f"{found.mean_au_delta_per_step:.2f} {of_all} on average"),
        ("KL per step: largest", f"{max(found.kl_per_step, default=0.0):.3f} at step {peak + 1}"),
        ("KL per dimension: largest", f"{max(found.kl_per_dimension, default=0.0):.2f}"),
        ("auxiliary cost per sequence", f"{sum(found.aux_per_step):.2f}"),
        ("aux log-variances at the clamp's floor", f"{100 * found.aux_floor_fraction:.1f}%"),
        ("Var over the data of b_t: median", f"{found.backward_variance_median:.2e}"),
        (f"Var over the data of b_t: below the floor's e^{-np.log(found.floor_variance):g}",
         f"{100 * found.backward_quiet_fraction:.1f}% of (step, unit)"),
    ]


def text_figures(result: EvalResult, dataset: PreparedDataset, split: str, limit: int) -> dict:
    """Word perplexities by the ELBO and IWAE bounds (the paper's Table 2), and a unigram model's."""
    from ..evaluate import perplexity, unigram_perplexity

    return {
        "perplexity_elbo": perplexity(result.elbo, result.sequences, result.steps),
        "perplexity_iwae": None if result.iwae is None else perplexity(result.iwae, result.sequences, result.steps),
        "unigram_perplexity": unigram_perplexity(dataset.split("train"), dataset.split(split), limit or None),
    }


def text_rows(result: EvalResult, text: dict, report: dict) -> list[tuple[str, str]]:
    """Table 2's columns: perplexity by the ELBO, by IWAE, and the KL per sentence; and the
    unigram model's figures beside them."""
    rows = [("sentences", count(result.sequences)), ("target tokens (words and </s>)", count(result.steps)),
            ("perplexity ≤ (ELBO)", f"{text['perplexity_elbo']:.2f}")]
    if result.iwae is not None:
        rows.append((f"perplexity ≤ (IWAE, K={result.iwae_samples})", f"{text['perplexity_iwae']:.2f}"))
    return rows + [("NLL ≤ (ELBO), nats per sentence", f"{-result.elbo:.2f}"), ("KL, nats per sentence", f"{result.kl:.2f}"),
                   ("unigram model's perplexity (train counts)", f"{text['unigram_perplexity']:.2f}"),
                   ("baseline NLL (unigram model), nats per sentence", f"{report['baseline_nll']:.2f}")]


def result_rows(result: EvalResult, unit: str, report: dict) -> list[tuple[str, str]]:
    rows = [("sequences", count(result.sequences)), (f"NLL ≤ (ELBO), {unit}", f"{-result.elbo:.2f}")]
    if result.iwae is not None:
        rows.append((f"NLL ≤ (IWAE, K={result.iwae_samples}), {unit}", f"{-result.iwae:.2f}"))
    return rows + [(f"KL, {unit}", f"{result.kl:.2f}"),
                   (f"baseline NLL (uniform Bernoulli), {unit}", f"{report['baseline_nll']:.2f}")]


SHORTEN = "evaluate fewer sequences with --limit N, or take fewer IWAE samples with a smaller --iwae"


def evaluation_progress(progress: JobProgress, sequences: int, iwae: int):
    """progress(done, total) in evaluate_split's (sequence, sample) pairs, or in sequences
    (diagnose_split, iwae 0), shown as what they mean."""
    what = plural(sequences, "sequence") + (f" × {plural(iwae, 'IWAE sample')}" if iwae > 1 else "")

    def update(done: int, total: int) -> None:
        progress(done, total, f"{done:,} of {total:,} ({what})" if iwae > 1 else f"{done:,} of {what}")

    return update


def open_training_data(config: dict) -> PreparedDataset:
    """The dataset a checkpoint was trained on, with a hint when it has moved."""
    location = config["data"]["location"]
    try:
        return open_dataset(location)
    except DataError as error:
        raise DataError(
            f"The model was trained on {location}, which cannot be opened: {error.message}",
            "Pass the prepared dataset with --data DIR.",
        ) from None
