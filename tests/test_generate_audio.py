"""`zforcing sample` for audio models: WAV files with a plot beside each, numbered outputs, seeds,
prompts and the errors. The checkpoints are untrained tiny models, written without training."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile
import torch
from conftest import PNG_SIGNATURE, assert_clean_error, invoke, plain

from zforcing_cli.checkpoint import save_checkpoint
from zforcing_cli.data.audio import decode_file
import zforcing_cli.fileio as fileio
import zforcing_cli.generate as generate_module
from zforcing_cli.checkpoint import load_model
from zforcing_cli.generate import AudioFormat, audio_pieces, audio_steps, numbered_paths
from zforcing_cli.model import ZForcing, ZForcingConfig
from zforcing_cli.runconfig import TrainConfig

RATE, FRAME = 16000, 200
AUDIO = {"sample_rate": RATE, "frame_size": FRAME, "sequence_frames": 40, "mean": 0.0, "std": 0.1}


def data_block(modality: str, **fields) -> dict:
    return {
        "location": "x", "kind": "wav", "protocol": "p", "modality": modality, "sequence_length": 40,
        "image_shape": None, "counts": {}, "fingerprint": "", "audio": None, **fields,
    }


def write_checkpoint(folder: Path, model_config: ZForcingConfig, data: dict) -> Path:
    torch.manual_seed(0)
    model = ZForcing(model_config)
    config = {"model": model.config.to_dict(), "train": dataclasses.asdict(TrainConfig()), "data": data}
    return save_checkpoint(folder, model, config, {"step": 0})


@pytest.fixture(scope="module")
def audio_checkpoint(tmp_path_factory) -> Path:
    model = ZForcingConfig(modality="frames", input_size=FRAME, embed_size=8, hidden_size=8, latent_size=4, mlp_size=8)
    return write_checkpoint(tmp_path_factory.mktemp("audio") / "ckpt", model, data_block("frames", audio=AUDIO))


@pytest.fixture(scope="module")
def image_checkpoint(tmp_path_factory) -> Path:
    model = ZForcingConfig(modality="binary", input_size=2, embed_size=4, hidden_size=8, latent_size=4, mlp_size=8)
    data = data_block("binary", kind="mnist", sequence_length=784, image_shape=[28, 28])
    return write_checkpoint(tmp_path_factory.mktemp("image") / "ckpt", model, data)


def sample(checkpoint: Path, *args):
    return invoke("sample", checkpoint, *args, "--device", "cpu")


def write_sine(path: Path, seconds: float, rate: int = 22050) -> np.ndarray:
    waveform = 0.5 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate)
    soundfile.write(path, waveform, rate, subtype="PCM_16")
    return waveform


def read_wav(path: Path) -> np.ndarray:
    info = soundfile.info(str(path))
    assert (info.samplerate, info.subtype, info.channels) == (RATE, "PCM_16", 1)
    samples, _ = soundfile.read(str(path), dtype="int16")
    return samples


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE


# -- helpers --------------------------------------------------------------------------------------


def test_numbered_paths_pad_to_the_width_of_the_count():
    assert numbered_paths(Path("out/a.wav"), 1) == [Path("out/a.wav")]
    assert numbered_paths(Path("out/a.wav"), 3) == [Path(f"out/a-{n}.wav") for n in (1, 2, 3)]
    twelve = numbered_paths(Path("a.wav"), 12)
    assert (twelve[0], twelve[8], twelve[-1]) == (Path("a-01.wav"), Path("a-09.wav"), Path("a-12.wav"))
    assert numbered_paths(Path("a.wav"), 100)[0] == Path("a-001.wav")


def test_steps_are_whole_frames_that_hold_the_seconds():
    audio = AudioFormat.of(data_block("frames", audio=AUDIO))
    assert audio_steps(audio) == 160  # 2 s by default
    assert audio_steps(audio, seconds=0.3) == 24  # 0.3 * 16000 / 200, despite float rounding
    assert audio_steps(audio, seconds=0.301) == 25
    assert audio_steps(audio, length=7) == 7


def test_normalising_and_back_keeps_int16_samples():
    audio = AudioFormat(RATE, FRAME, mean=0.01, std=0.2)
    samples = np.random.default_rng(0).integers(-20000, 20000, 4 * FRAME).astype(np.int16)
    frames = audio.normalise(samples)
    assert frames.shape == (4, FRAME)
    assert np.abs(audio.to_samples(frames).astype(int) - samples).max() <= 1


# -- free-running ----------------------------------------------------------------------------------


def test_writes_a_16_bit_wav_and_its_plot(audio_checkpoint, cwd):
    result = sample(audio_checkpoint, "--out", "a.wav", "--seconds", 0.5)
    assert result.exit_code == 0, plain(result.output)
    samples = read_wav(cwd / "a.wav")
    assert len(samples) == 40 * FRAME
    assert np.isfinite(samples).all() and samples.any()
    assert_png(cwd / "a.png")
    assert "Wrote 1 sample (0.5 s each) to a.wav" in plain(result.stdout)
    assert "× real time" in plain(result.stderr)


def test_default_is_one_2_s_clip_in_samples_wav(audio_checkpoint, cwd):
    result = sample(audio_checkpoint)
    assert result.exit_code == 0, plain(result.output)
    assert len(read_wav(cwd / "samples.wav")) == 160 * FRAME
    assert sorted(path.name for path in cwd.iterdir()) == ["samples.png", "samples.wav"]


def test_several_samples_are_numbered(audio_checkpoint, cwd):
    result = sample(audio_checkpoint, "--out", "a.wav", "--num", 3, "--length", 5)
    assert result.exit_code == 0, plain(result.output)
    clips = [read_wav(cwd / f"a-{n}.wav") for n in (1, 2, 3)]
    assert all(len(clip) == 5 * FRAME for clip in clips)
    assert not np.array_equal(clips[0], clips[1])
    for n in (1, 2, 3):
        assert_png(cwd / f"a-{n}.png")
    assert not (cwd / "a.wav").exists()
    assert "Wrote 3 samples" in plain(result.stdout) and "a-1.wav, a-2.wav, a-3.wav" in plain(result.stdout)


def test_same_seed_same_audio(audio_checkpoint, cwd):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        result = sample(audio_checkpoint, "--out", f"{name}.wav", "--length", 4, "--seed", seed)
        assert result.exit_code == 0, plain(result.output)
    a, b, c = (read_wav(cwd / f"{name}.wav") for name in "abc")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_prompt_is_kept_and_continued(audio_checkpoint, cwd):
    write_sine(cwd / "p.wav", 0.3)  # 22.05 kHz: resampled to 4800 samples, 24 whole frames
    expected = decode_file(cwd / "p.wav", RATE)
    assert len(expected) == 24 * FRAME
    result = sample(audio_checkpoint, "--out", "a.wav", "--prompt", "p.wav", "--seconds", 0.5, "--num", 2)
    assert result.exit_code == 0, plain(result.output)
    for n in (1, 2):
        samples = read_wav(cwd / f"a-{n}.wav")
        assert len(samples) == (24 + 40) * FRAME
        assert np.abs(samples[: len(expected)].astype(int) - expected).max() <= 1
        assert_png(cwd / f"a-{n}.png")
    assert "0.8 s each, the first 0.3 s the prompt" in plain(result.stdout)


# -- bounded: pieces, chunks, limits --------------------------------------------------------------


def test_pieces_give_the_numbers_of_one_call(audio_checkpoint, monkeypatch):
    """A long clip is generated PIECE_SECONDS at a time, carrying the state from piece to piece:
    the same frames as one call to generate, with and without a prompt."""
    model, _ = load_model(audio_checkpoint)
    audio = AudioFormat.of({"audio": AUDIO})
    monkeypatch.setattr(generate_module, "PIECE_SECONDS", 3 * FRAME / RATE)  # 3 frames a piece
    pieces = list(audio_pieces(model, audio, 2, 10, 1.0, torch.Generator().manual_seed(4), np.zeros(0, np.int16)))
    assert [piece.shape[1] for piece in pieces] == [3, 3, 3, 1]
    whole = model.generate(2, 10, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=0)

    prompt = (np.random.default_rng(0).standard_normal(4 * FRAME) * 3000).astype(np.int16)
    pieces = list(audio_pieces(model, audio, 2, 7, 1.0, torch.Generator().manual_seed(5), prompt))
    generator = torch.Generator().manual_seed(5)
    frames = torch.from_numpy(audio.normalise(prompt))
    state = model.encode(frames[1:].expand(2, -1, -1), first_input=frames[0].expand(2, -1), generator=generator)
    whole = model.generate(2, 7, generator=generator, first_input=frames[-1].expand(2, -1), state=state)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=0)


def test_clips_are_generated_a_chunk_at_a_time_and_streamed(audio_checkpoint, cwd, monkeypatch):
    from zforcing_cli.console import JobProgress

    monkeypatch.setattr(generate_module, "rows_per_chunk", lambda bytes_per_row: 2)
    monkeypatch.setattr(generate_module, "PIECE_SECONDS", 4 * FRAME / RATE)
    monkeypatch.setattr(JobProgress, "LOG_SECONDS", 0.0)
    rows, real = [], ZForcing.generate
    monkeypatch.setattr(ZForcing, "generate", lambda self, num, steps, **kwargs: rows.append((num, steps)) or real(self, num, steps, **kwargs))
    result = sample(audio_checkpoint, "--out", "a.wav", "--num", 3, "--length", 10)
    assert result.exit_code == 0, plain(result.output)
    assert rows == [(1, 4), (1, 4), (1, 2), (2, 4), (2, 4), (2, 2)]  # the first chunk a single clip (ClipWork)
    assert all(len(read_wav(cwd / f"a-{n}.wav")) == 10 * FRAME for n in (1, 2, 3))
    assert sorted(path.name for path in cwd.iterdir()) == ["a-1.png", "a-1.wav", "a-2.png", "a-2.wav", "a-3.png", "a-3.wav"]
    assert "Generating 3 clips of 0.125 s: 100%, 3 of 3 clips written" in plain(result.stderr)


def test_an_interrupted_clip_leaves_no_file(audio_checkpoint, cwd, monkeypatch):
    monkeypatch.setattr(generate_module, "PIECE_SECONDS", 4 * FRAME / RATE)
    calls, real = [], ZForcing.generate

    def interrupt_the_second_piece(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ZForcing, "generate", interrupt_the_second_piece)
    result = sample(audio_checkpoint, "--out", "a.wav", "--length", 10)
    assert result.exit_code == 130 and "Interrupted" in plain(result.stderr)
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("option", [("--seconds", "1e9"), ("--length", "100000000")])
def test_a_clip_longer_than_a_wav_file_holds_is_refused_up_front(audio_checkpoint, cwd, option):
    line = assert_clean_error(sample(audio_checkpoint, "--out", "a.wav", *option), 2, "4 GiB")
    assert "h at 16000 Hz" in line
    assert list(cwd.iterdir()) == []


def test_clips_that_do_not_fit_the_disk_are_refused_up_front(audio_checkpoint, cwd, monkeypatch):
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: SimpleNamespace(free=10**6))
    line = assert_clean_error(sample(audio_checkpoint, "--out", "a.wav", "--seconds", 60), 1, "976.6 KiB free", str(cwd))
    assert "1 WAV file and their plots would take about 2.1 MiB" in line
    assert list(cwd.iterdir()) == []


def test_their_plots_count_in_the_room_clips_need(audio_checkpoint, cwd, monkeypatch):
    """100 clips of 0.0125 s are 43 KiB of WAV; with their pictures they need more than 1 MiB."""
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: SimpleNamespace(free=2**20))
    assert_clean_error(sample(audio_checkpoint, "--out", "a.wav", "--length", 1, "--num", 100), 1, "1.0 MiB free")
    assert list(cwd.iterdir()) == []


def test_a_folder_that_cannot_be_written_is_refused_before_sampling(audio_checkpoint, cwd, monkeypatch):
    access = fileio.os.access
    monkeypatch.setattr(fileio.os, "access", lambda path, mode, **kwargs: Path(path) != cwd and access(path, mode, **kwargs))
    monkeypatch.setattr(ZForcing, "generate", lambda *args, **kwargs: pytest.fail("sampled before checking the folder"))
    assert_clean_error(sample(audio_checkpoint, "--out", "a.wav"), 1, f"The folder {cwd} cannot be written")


def test_a_million_clips_start_at_once_with_a_warning_of_a_long_job(audio_checkpoint, cwd, monkeypatch):
    """--num 1,000,000: no list of a million names (nor a look at each), at most MAX_OPEN_CLIPS
    clips at a time, and as soon as the speed is measured, the warning of a long job (JobProgress's,
    for a day and more) with the advice."""
    from zforcing_cli.console import JobProgress

    listed, rows = [], []
    real_paths, real_generate = generate_module.numbered_paths, ZForcing.generate

    def generate_twice(self, num, steps, **kwargs):
        rows.append(num)
        if len(rows) == 2:
            raise KeyboardInterrupt
        return real_generate(self, num, steps, **kwargs)

    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: SimpleNamespace(free=2**50))
    monkeypatch.setattr(JobProgress, "MEASURE_SECONDS", 0.0)
    monkeypatch.setattr(JobProgress, "LONG_JOB_SECONDS", 60.0)  # the tiny model's clips of one frame take minutes, not days
    monkeypatch.setattr(generate_module, "numbered_paths", lambda *args: listed.append(len(real_paths(*args))) or listed[-1] and real_paths(*args))
    monkeypatch.setattr(ZForcing, "generate", generate_twice)
    result = sample(audio_checkpoint, "--out", "a.wav", "--num", 10**6, "--length", 1)
    assert result.exit_code == 130, plain(result.output)
    warning = next(line for line in plain(result.stderr).splitlines() if line.startswith("Warning:"))
    assert "Generating 1,000,000 clips" in warning and "will take about" in warning and "--num" in warning, warning
    assert max(listed) <= generate_module.MAX_CHUNK_ROWS and rows == [1, generate_module.MAX_OPEN_CLIPS]
    assert sorted(path.name for path in cwd.iterdir()) == ["a-0000001.png", "a-0000001.wav"]  # the rest: nothing half-written


def test_a_long_clip_is_plotted_for_its_first_seconds(audio_checkpoint, cwd, monkeypatch):
    plotted = []
    monkeypatch.setattr(generate_module, "PLOT_SECONDS", 0.05)
    monkeypatch.setattr(generate_module, "write_audio_plot", lambda path, waveform, rate, title, boundary=None: plotted.append((len(waveform), title)))
    assert sample(audio_checkpoint, "--out", "a.wav", "--seconds", 0.5).exit_code == 0
    assert plotted == [(800, "a.wav: the first 0.05 s of 0.5 s")]


def test_images_are_generated_a_chunk_at_a_time(image_checkpoint, cwd, monkeypatch):
    monkeypatch.setattr(generate_module, "rows_per_chunk", lambda bytes_per_row: 4)
    rows, real = [], ZForcing.generate
    monkeypatch.setattr(ZForcing, "generate", lambda self, num, steps, **kwargs: rows.append(num) or real(self, num, steps, **kwargs))
    result = sample(image_checkpoint, "--out", "s.png", "--num", 10)
    assert result.exit_code == 0, plain(result.output)
    assert rows == [4, 4, 2]
    assert_png(cwd / "s.png")


def test_more_images_than_a_grid_shows_are_refused(image_checkpoint, cwd):
    assert_clean_error(sample(image_checkpoint, "--out", "s.png", "--num", 20_000), 2, "--num 20,000", "10,000")
    assert list(cwd.iterdir()) == []


def test_words_are_not_an_audio_prompt(audio_checkpoint, cwd):
    line = assert_clean_error(sample(audio_checkpoint, "--out", "a.wav", "--prompt", "this movie"), 2, "'this movie'")
    assert "not an audio file" in line and "audio model" in line
    assert list(cwd.iterdir()) == []


# -- errors ---------------------------------------------------------------------------------------


def test_an_audio_model_refuses_a_png_output(audio_checkpoint, cwd):
    line = assert_clean_error(sample(audio_checkpoint, "--out", "a.png"), 1, "a.png")
    assert "audio" in line.lower()
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("existing", ["a.wav", "a.png"])
def test_existing_outputs_need_force(audio_checkpoint, cwd, existing):
    (cwd / existing).write_bytes(b"mine")
    assert_clean_error(sample(audio_checkpoint, "--out", "a.wav", "--length", 2), 1, "already exists", existing)
    assert (cwd / existing).read_bytes() == b"mine"
    assert sorted(path.name for path in cwd.iterdir()) == [existing]
    result = sample(audio_checkpoint, "--out", "a.wav", "--length", 2, "--force")
    assert result.exit_code == 0, plain(result.output)
    assert len(read_wav(cwd / "a.wav")) == 2 * FRAME


def test_a_numbered_output_that_exists_stops_before_generating(audio_checkpoint, cwd):
    (cwd / "a-2.wav").write_bytes(b"mine")
    assert_clean_error(sample(audio_checkpoint, "--out", "a.wav", "--num", 2), 1, "a-2.wav", "already exists")
    assert sorted(path.name for path in cwd.iterdir()) == ["a-2.wav"]


def test_a_missing_prompt_is_named(audio_checkpoint, cwd):
    assert_clean_error(sample(audio_checkpoint, "--out", "a.wav", "--prompt", "gone.wav"), 1, "gone.wav", "does not exist")
    assert list(cwd.iterdir()) == []


def test_an_unreadable_prompt_is_named(audio_checkpoint, cwd):
    (cwd / "p.wav").write_text("not audio")
    line = assert_clean_error(sample(audio_checkpoint, "--out", "a.wav", "--prompt", "p.wav"), 1, "p.wav")
    assert "Cannot read" in line
    assert not (cwd / "a.wav").exists()


def test_a_prompt_shorter_than_two_frames_is_refused(audio_checkpoint, cwd):
    write_sine(cwd / "p.wav", 0.02)  # 320 samples at 16 kHz: one frame
    assert_clean_error(sample(audio_checkpoint, "--out", "a.wav", "--prompt", "p.wav"), 1, "p.wav", "too short")
    assert not (cwd / "a.wav").exists()


def test_seconds_and_length_together_are_a_usage_error(audio_checkpoint, cwd):
    assert_clean_error(sample(audio_checkpoint, "--out", "a.wav", "--seconds", 1, "--length", 5), 2, "--seconds", "--length")
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("option", [["--prompt", "p.wav"], ["--seconds", "1"]])
def test_audio_options_on_an_image_model_are_usage_errors(image_checkpoint, cwd, option):
    write_sine(cwd / "p.wav", 0.3)
    assert_clean_error(sample(image_checkpoint, "--out", "s.png", *option), 2, option[0])
    assert not (cwd / "s.png").exists()


@pytest.mark.parametrize("existing", ["a-02.wav", "a-10.png"])
def test_an_existing_clip_of_many_is_found_before_sampling(audio_checkpoint, cwd, existing):
    (cwd / existing).write_bytes(b"mine")
    (cwd / "a-11.wav").write_bytes(b"not one of the ten")
    assert_clean_error(sample(audio_checkpoint, "--out", "a.wav", "--num", 10, "--length", 1), 1, f"{existing} already exists")
    assert sorted(path.name for path in cwd.iterdir()) == sorted([existing, "a-11.wav"])


def test_a_grid_that_does_not_fit_the_disk_is_refused_before_sampling(image_checkpoint, cwd, monkeypatch):
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: SimpleNamespace(free=50_000))
    monkeypatch.setattr(ZForcing, "generate", lambda *args, **kwargs: pytest.fail("sampled before checking the room"))
    line = assert_clean_error(sample(image_checkpoint, "--out", "s.png", "--num", 10_000), 1, "48.8 KiB free", str(cwd))
    assert "A PNG grid of 10,000 images would take about" in line
    assert list(cwd.iterdir()) == []


def test_clip_progress_moves_at_the_measured_pace_of_the_work(audio_checkpoint, cwd, monkeypatch):
    """Generating a clip counts for the share of the time generation has taken so far (half until
    measured), its picture for the rest: progress in clips, never backwards, ending at --num."""
    work = generate_module.ClipWork()
    assert work.generating_share == 0.5
    work.add(1.0, 3.0)
    assert work.generating_share == 0.25
    model, config = load_model(audio_checkpoint)
    monkeypatch.setattr(generate_module, "write_audio_plot", lambda *args, **kwargs: None)
    reports = []
    generate_module.sample_audio(model, config["data"], cwd / "a.wav", num=5, steps=3,
                                 progress=lambda done, total: reports.append((done, total)))
    done = [report[0] for report in reports]
    assert done == sorted(done) and reports[-1] == (5, 5) and {total for _, total in reports} == {5}
    assert 1 in done  # the first chunk, one clip, complete before the others start


# -- output noise ----------------------------------------------------------------------------------


def expected_clip(checkpoint: Path, steps: int, seed: int, output_noise: float) -> np.ndarray:
    """The int16 samples of one clip generated from the prior with output_noise scaling the output std."""
    model, config = load_model(checkpoint)
    model.train(False)
    frames = model.generate(1, steps, temperature=output_noise**2, generator=torch.Generator().manual_seed(seed))
    return AudioFormat.of(config["data"]).to_samples(frames.numpy())[0]


@pytest.mark.parametrize(("option", "scale"), [((), 0.0), (("--output-noise", "mean"), 0.0),
                                               (("--output-noise", "sample"), 1.0), (("--output-noise", "0.3"), 0.3)])
def test_output_noise_scales_the_output_std_and_defaults_to_the_mean(audio_checkpoint, cwd, option, scale):
    result = sample(audio_checkpoint, "--out", "a.wav", "--length", 6, "--seed", 3, *option)
    assert result.exit_code == 0, plain(result.output)
    assert np.array_equal(read_wav(cwd / "a.wav"), expected_clip(audio_checkpoint, 6, 3, scale))


def test_the_mean_and_the_full_draw_differ(audio_checkpoint, cwd):
    assert not np.array_equal(expected_clip(audio_checkpoint, 6, 3, 0.0), expected_clip(audio_checkpoint, 6, 3, 1.0))


@pytest.mark.parametrize(("value", "fragment"), [("loud", "not 'loud'"), ("-1", "not '-1'"), ("nan", "not 'nan'")])
def test_a_bad_output_noise_is_a_usage_error(audio_checkpoint, cwd, value, fragment):
    line = assert_clean_error(sample(audio_checkpoint, "--out", "a.wav", "--output-noise", value), 2)
    assert "--output-noise must be mean, sample or a number 0 or more" in line and fragment in line


def test_temperature_on_an_audio_model_names_the_output_noise_that_replaces_it(audio_checkpoint, cwd):
    result = sample(audio_checkpoint, "--out", "a.wav", "--temperature", 0.25)
    assert_clean_error(result, 2, "--temperature does not apply to an audio model")
    assert "--output-noise 0.5" in plain(result.stderr)
    assert not (cwd / "a.wav").exists()


def test_output_noise_on_an_image_model_is_a_usage_error(image_checkpoint, cwd):
    assert_clean_error(sample(image_checkpoint, "--output-noise", "sample"), 2, "--output-noise applies to audio models")
