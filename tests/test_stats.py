"""stats.py against values computed by hand."""

from __future__ import annotations

import math

import pytest

from zforcing_cli.stats import difference_sentence, paired_difference, summarize

T_975 = {1: 12.706204736, 3: 3.182446305, 7: 2.364624252}  # Student's t quantiles (tables)


def test_summary_is_the_mean_the_sample_sd_and_the_t_interval():
    summary = summarize([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(5 / 3)  # squares of (-1.5, -0.5, 0.5, 1.5) sum to 5, over n - 1 = 3
    assert summary.n == 4 and summary.mean == pytest.approx(2.5)
    assert summary.sd == pytest.approx(sd)
    half = T_975[3] * sd / 2  # t(0.975, 3)·SD/√4
    assert (summary.ci_low, summary.ci_high) == pytest.approx((2.5 - half, 2.5 + half))


def test_one_seed_has_a_mean_and_no_spread():
    summary = summarize([7.0])
    assert summary.mean == 7.0 and math.isnan(summary.sd) and math.isnan(summary.ci_low)
    assert summary.to_dict()["sd"] is None  # JSON-ready


def test_paired_difference_tests_the_seedwise_differences():
    reference = [10.0, 20.0, 30.0, 40.0]
    values = [11.0, 22.0, 33.0, 44.0]  # differences 1, 2, 3, 4: what the seeds share cancels
    difference = paired_difference(values, reference)
    assert difference.summary.mean == pytest.approx(2.5)
    assert difference.summary.sd == pytest.approx(math.sqrt(5 / 3))
    # t = 2.5 / (SD/2) = √15 on 3 degrees of freedom; the t(3) CDF has a closed form:
    # p = 1 - (2/π)(u/(1 + u²) + atan u) with u = t/√3 = √5
    u = math.sqrt(5)
    assert difference.t_p == pytest.approx(1 - 2 / math.pi * (u / (1 + u * u) + math.atan(u)), rel=1e-9)
    # Wilcoxon, exact: all 4 differences positive, so the rank sum is the extreme of 2^4 signs
    assert difference.wilcoxon_p == pytest.approx(2 / 2**4)


def test_wilcoxon_with_eight_seeds_all_one_way():
    difference = paired_difference([float(i) for i in range(8)], [float(i) + 0.5 + 0.1 * i for i in range(8)])
    assert difference.summary.mean < 0
    assert difference.wilcoxon_p == pytest.approx(2 / 2**8)


def test_equal_numbers_give_p_one_and_say_unchanged():
    difference = paired_difference([1.0, 2.0], [1.0, 2.0])
    assert (difference.t_p, difference.wilcoxon_p) == (1.0, 1.0)
    assert difference_sentence("α = 0", "the validation bound", "nats", difference) == "α = 0 leaves the validation bound unchanged on 2 seeds."


def test_the_sentence_gives_the_change_its_spread_interval_and_tests():
    reference = [100.0, 101.0, 102.0, 103.0]
    values = [99.0, 99.0, 99.0, 99.0]  # differences -1, -2, -3, -4: lower by 2.5
    sentence = difference_sentence("α = 0.001", "the validation bound", "nats", paired_difference(values, reference))
    half = T_975[3] * math.sqrt(5 / 3) / 2
    assert sentence.startswith("α = 0.001 lowers the validation bound by 2.50 ± 1.29 nats, ")
    assert f"95% CI [{2.5 - half:.2f}, {2.5 + half:.2f}]" in sentence
    assert sentence.endswith(", 4 seeds, p = 0.03 (t), 0.12 (Wilcoxon).")


def test_a_rise_with_one_seed_says_no_test():
    sentence = difference_sentence("β = 1", "the validation KL", "nats", paired_difference([3.0], [1.0]))
    assert sentence == "β = 1 raises the validation KL by 2.00 nats on 1 seed (a test needs two or more)."


def test_a_tiny_p_reads_p_below_not_p_equals():
    reference = [10.0, 20.0, 30.0, 40.0, 50.0]
    sentence = difference_sentence("no z", "the validation bound", "nats", paired_difference([r + 100.0 + 0.01 * i for i, r in enumerate(reference)], reference))
    assert ", 5 seeds, p < 0.001 (t), 0.06 (Wilcoxon)." in sentence and "p = <" not in sentence
