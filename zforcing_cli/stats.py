"""Numbers with their uncertainty, over seeds: a configuration's mean ± SD and its t-based 95%
confidence interval, and paired differences against a reference over the same seeds (mean, 95%
CI, a paired t-test and a Wilcoxon signed-rank test), said in words. No plotting here.

Seeds are paired: every configuration runs with the same list of seeds, so seed s of two
configurations shares its initial weights' seed, data order and noise, and the difference of
the two removes what the seed alone does (Colas et al. 2018, "How many random seeds?").
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """A metric over n seeds: mean, sample standard deviation (n - 1) and the t-based 95% CI of
    the mean (nan where n < 2)."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict:
        return {key: (None if isinstance(value, float) and not math.isfinite(value) else value) for key, value in asdict(self).items()}


@dataclass(frozen=True)
class Difference:
    """Paired differences (configuration - reference) over the seeds both ran: their Summary and
    the two-sided p-values of the paired t-test and of the Wilcoxon signed-rank test."""

    summary: Summary
    t_p: float
    wilcoxon_p: float

    def to_dict(self) -> dict:
        p_values = {"t_p": self.t_p, "wilcoxon_p": self.wilcoxon_p}
        return {**self.summary.to_dict(), **{key: value if math.isfinite(value) else None for key, value in p_values.items()}}


def summarize(values) -> Summary:
    """Mean ± SD over seeds and the 95% CI mean ± t(0.975, n-1)·SD/√n."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(values.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    sd = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


def paired_difference(values, reference) -> Difference:
    """values[i] - reference[i], seed by seed (the same seeds in the same order)."""
    from scipy import stats

    differences = np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    summary = summarize(differences)
    if summary.n < 2:
        return Difference(summary, math.nan, math.nan)
    if not differences.any():  # the same numbers: nothing to test
        return Difference(summary, 1.0, 1.0)
    with warnings.catch_warnings():  # scipy warns on exact ties and on tiny samples; the p-values stand
        warnings.simplefilter("ignore")
        t_p = float(stats.ttest_rel(values, reference).pvalue)
        wilcoxon_p = float(stats.wilcoxon(differences).pvalue)
    return Difference(summary, t_p, wilcoxon_p)


def number(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def p_value(value: float) -> str:
    """'p = 0.01', 'p < 0.001'."""
    if not math.isfinite(value):
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.2g}" if value < 0.01 else f"{value:.2f}"


def p_relation(value: float) -> str:
    """'= 0.01' or '< 0.001': what follows a sentence's 'p'."""
    text = p_value(value)
    return text if text.startswith("<") else f"= {text}"


def difference_sentence(subject: str, quantity: str, unit: str, difference: Difference) -> str:
    """'α = 0.001 lowers the validation bound by 0.80 ± 0.40 nats, 95% CI [0.30, 1.30], 8 seeds,
    p = 0.01 (t), 0.02 (Wilcoxon)': the CI and the SD are of the change, in its direction."""
    summary = difference.summary
    seeds = f"{summary.n} seed{'' if summary.n == 1 else 's'}"
    if summary.n == 0:
        return f"{subject}: no seed in common with the reference, so no paired difference."
    if summary.mean == 0 and not (summary.sd > 0):
        return f"{subject} leaves {quantity} unchanged on {seeds}."
    verb, sign = ("lowers", -1.0) if summary.mean < 0 else ("raises", 1.0)
    change = number(sign * summary.mean)
    if summary.n < 2:
        return f"{subject} {verb} {quantity} by {change} {unit} on {seeds} (a test needs two or more)."
    low, high = sorted((sign * summary.ci_low, sign * summary.ci_high))
    return (f"{subject} {verb} {quantity} by {change} ± {number(summary.sd)} {unit}, 95% CI [{number(low)}, {number(high)}], "
            f"{seeds}, p {p_relation(difference.t_p)} (t), {p_value(difference.wilcoxon_p)} (Wilcoxon).")
