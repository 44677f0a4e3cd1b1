"""`zforcing bench`'s options (cli/bench.py): a wrong one gives one error line, before any work."""

from __future__ import annotations

import pytest
from conftest import assert_clean_error, invoke


@pytest.mark.parametrize("args, fragment", [
    (["--preset", "cifar"], "Unknown benchmark preset"),
    (["--size", "huge"], "Unknown size"),
    (["--updates", "0"], "--updates"),
    (["--hours", "5"], "--hours applies only with --memory"),
    (["--batches", "5"], "--batches applies only with --memory"),
    (["--seconds", "5"], "--seconds applies only with --processes"),
    (["--memory", "--updates", "3"], "--updates"),
    (["--memory", "--preset", "mnist"], "audio dataset"),
    (["--memory", "--hours", "0"], "--hours"),
    (["--memory", "--hours", "nan"], "--hours"),
    (["--memory", "--processes", "2"], "two different benchmarks"),
    (["--processes", "2", "--device", "cuda"], "CPU"),
    (["--tf32", "--device", "cpu"], "--tf32 needs a CUDA device"),
    (["--memory", "--tf32"], "--tf32 sets the speed benchmark's GPU products"),
    (["--processes", "2", "--hidden-size", "8"], "--hidden-size resizes the speed benchmark's model"),
    (["--memory", "--batch-size", "8"], "--batch-size resizes"),
    (["--batch-size", "1025"], "--batch-size"),
    (["--mlp-size", "0"], "--mlp-size"),
    (["--memory", "--size", "tiny", "--hours", "0.0005"], "fewer than a batch"),
])
def test_bad_options_give_one_error_line(args, fragment, tmp_path):
    result = invoke("bench", *args, "--dir", tmp_path)
    assert_clean_error(result, 2, fragment)
    assert list(tmp_path.iterdir()) == []


def test_a_dir_that_is_not_a_folder_is_refused(tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    assert_clean_error(invoke("bench", "--memory", "--dir", file), 2, "not a folder")
