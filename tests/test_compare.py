"""`zforcing compare`: labels from what differs between runs, the figure, the table of bounds."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from conftest import PNG_SIGNATURE, assert_clean_error, invoke, plain, tiny_run_config
from zforcing_cli.compare import label_runs, load_run


def write_run(folder, dataset, valid_nll=(110.0, 100.0), kl=2.0, model=None, **train):
    """A run folder as `zforcing train` leaves it: config.json and metrics.jsonl."""
    config = tiny_run_config(dataset, **train)
    if model:
        config.model = replace(config.model, **model)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**config.to_dict(), "preset": "small"}))
    records = [{"type": "train", "step": step, "elbo": -120.0 + step, "kl": kl, "aux": 5.0, "lr": 1e-3} for step in (1, 2, 3, 4)]
    records += [{"type": "valid", "step": 2 * (i + 1), "elbo": -v, "nll_bound": v, "kl": kl, "lr": 1e-3} for i, v in enumerate(valid_nll)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"type": "tra')  # a cut line
    return folder


def test_labels_name_what_differs(tmp_path, tiny_dataset):
    runs = [load_run(write_run(tmp_path / "a", tiny_dataset, aux_weight=0.0, bwd_weight=0.0)),
            load_run(write_run(tmp_path / "b", tiny_dataset, aux_weight=0.0025, bwd_weight=0.0025)),
            load_run(write_run(tmp_path / "c", tiny_dataset, aux_weight=0.0025, bwd_weight=0.0025, kl_anneal=True))]
    differing = label_runs(runs)
    assert differing == ["train.aux_weight", "train.bwd_weight", "train.kl_anneal"]
    assert [run.label for run in runs] == ["α=β=0, no KL anneal", "α=β=0.0025, no KL anneal", "α=β=0.0025, KL anneal"]


def test_labels_of_model_sizes_and_identical_runs(tmp_path, tiny_dataset):
    runs = [load_run(write_run(tmp_path / "a", tiny_dataset)), load_run(write_run(tmp_path / "b", tiny_dataset, model={"hidden_size": 16}))]
    label_runs(runs)
    assert [run.label for run in runs] == ["units=8", "units=16"]
    same = [load_run(write_run(tmp_path / "c", tiny_dataset)), load_run(write_run(tmp_path / "d", tiny_dataset))]
    assert label_runs(same) == [] and [run.label for run in same] == ["c", "d"]


def test_a_field_newer_than_a_run_is_its_default_not_a_difference(tmp_path, tiny_dataset):
    old = write_run(tmp_path / "old", tiny_dataset)
    config = json.loads((old / "config.json").read_text())
    for section, name in (("model", "latent"), ("model", "output_head"), ("train", "skip_rule")):
        del config[section][name]  # written before these fields existed
    (old / "config.json").write_text(json.dumps(config))
    runs = [load_run(old), load_run(write_run(tmp_path / "new", tiny_dataset))]
    assert label_runs(runs) == []
    runs.append(load_run(write_run(tmp_path / "rnn", tiny_dataset, model={"latent": False})))
    assert label_runs(runs) == ["model.latent"] and runs[2].label.endswith("no latent") and runs[0].label.endswith(": latent")


def test_cli_figure_and_json(cwd, tiny_dataset):
    write_run(cwd / "a", tiny_dataset, aux_weight=0.0, bwd_weight=0.0, valid_nll=(120.0, 105.0, 107.0), kl=0.1)
    write_run(cwd / "b", tiny_dataset, aux_weight=0.01, bwd_weight=0.01, kl=3.0)
    result = invoke("compare", "a", "b", "--out", "kl.png", "--json")
    assert result.exit_code == 0, plain(result.output)
    rows = json.loads(result.stdout)
    assert [row["label"] for row in rows] == ["α=β=0", "α=β=0.01"]
    assert rows[0]["final_valid_nll"] == 107.0 and rows[0]["best_valid_nll"] == 105.0 and rows[0]["final_valid_kl"] == 0.1
    assert rows[1]["settings"] == {"aux_weight": 0.01, "bwd_weight": 0.01} and rows[1]["steps"] == 4
    assert (cwd / "kl.png").read_bytes().startswith(PNG_SIGNATURE)
    result = invoke("compare", "a", "b", "--out", "elbo.svg", "--metric", "elbo")
    assert result.exit_code == 0 and "α=β=0.01" in (cwd / "elbo.svg").read_text()
    assert "final KL" in plain(result.stdout) and "105.00" in plain(result.stdout)
    assert "validation bounds, NLL ≤ (nats per image)" in plain(result.stdout)


@pytest.mark.parametrize("args, code, fragment", [
    (["--metric", "lr"], 2, "--metric"), (["--out", "x.jpg"], 2, ".png or .svg"), (["--out", "taken.png"], 1, "exists"),
])
def test_cli_option_errors(cwd, tiny_dataset, args, code, fragment):
    write_run(cwd / "a", tiny_dataset)
    (cwd / "taken.png").write_bytes(b"x")
    assert_clean_error(invoke("compare", "a", *args), code, fragment)


def test_cli_refuses_what_is_not_a_run(cwd, tiny_dataset):
    write_run(cwd / "a", tiny_dataset)
    (cwd / "empty").mkdir()
    assert_clean_error(invoke("compare", "a", "empty"), 1, "not a run folder")
    assert not (cwd / "compare.png").exists()


def test_cli_refuses_runs_on_different_data(cwd, tiny_dataset):
    write_run(cwd / "a", tiny_dataset)
    write_run(cwd / "b", tiny_dataset)
    config = json.loads((cwd / "b" / "config.json").read_text())
    config["data"]["modality"] = "frames"
    (cwd / "b" / "config.json").write_text(json.dumps(config))
    assert_clean_error(invoke("compare", "a", "b"), 1, "different kinds of data")


def test_cli_checks_the_runs_before_the_figure(cwd, tiny_dataset):
    write_run(cwd / "a", tiny_dataset)
    (cwd / "compare.png").write_bytes(b"an older figure")
    assert_clean_error(invoke("compare", "a", "MISSING"), 1, "MISSING is not a run folder")


def test_the_table_gives_each_part_of_a_label_its_own_line(cwd, tiny_dataset):
    """At 80 columns a label of several parts wraps: never after a comma, as if one were missing."""
    write_run(cwd / "a", tiny_dataset, aux_weight=0.0, bwd_weight=0.0, lr=0.001, batch_size=4, kl_anneal=True)
    write_run(cwd / "b", tiny_dataset, aux_weight=0.0025, bwd_weight=0.0025, lr=0.0003, batch_size=8)
    table = plain(invoke("compare", "a", "b").stdout)
    assert "α=β=0 " in table and "no KL anneal" in table and "lr=0.0003" in table
    assert "," not in table.split("\n", 1)[1]  # below the title


def audio_data(frame_size: int, sequence_frames: int) -> dict:
    return {"modality": "frames", "sequence_length": sequence_frames,
            "audio": {"sample_rate": 16000, "frame_size": frame_size, "sequence_frames": sequence_frames}}


def test_runs_with_sequences_of_other_lengths_are_compared_with_a_warning(cwd, tiny_dataset):
    for name, framing in (("a", (200, 40)), ("b", (160, 20)), ("c", (200, 40))):
        write_run(cwd / name, tiny_dataset)
        config = json.loads((cwd / name / "config.json").read_text())
        config["data"].update(audio_data(*framing))
        (cwd / name / "config.json").write_text(json.dumps(config))
    result = invoke("compare", "a", "b")
    assert result.exit_code == 0, plain(result.output)
    warning = " ".join(plain(result.stderr).split())
    assert "Warning: The runs' sequences differ (a: 8,000 samples (40 frames of 200); b: 3,200 samples (20 frames of 160))" in warning
    assert "per sample" in warning
    assert "Warning" not in plain(invoke("compare", "a", "c", "--out", "same.png").stderr)


def test_cli_names_what_it_wrote(cwd, tiny_dataset):
    write_run(cwd / "a", tiny_dataset)
    assert "Wrote the kl curves of 1 run to compare.png" in plain(invoke("compare", "a").stderr)


def test_audio_runs_bounds_are_log_likelihoods_as_train_and_evaluate_state_them(cwd, tiny_dataset):
    for name in ("a", "b"):
        write_run(cwd / name, tiny_dataset, valid_nll=(120.0, 105.0, 107.0))
        config = json.loads((cwd / name / "config.json").read_text())
        config["data"].update(audio_data(200, 40))
        (cwd / name / "config.json").write_text(json.dumps(config))
    table = plain(invoke("compare", "a", "b").stdout)
    assert "validation bounds, log-likelihood ≥ (nats per sequence)" in table
    assert "-107.00" in table and "-105.00" in table and "NLL" not in table
