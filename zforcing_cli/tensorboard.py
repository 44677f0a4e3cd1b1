"""TensorBoard logging for `zforcing train --tensorboard` (the optional extra `zforcing[tensorboard]`).

Every record that goes to metrics.jsonl also goes to the run's `tensorboard/` folder as scalars
(`train/elbo`, `valid/kl`, ...), and each validation adds what the model generates: a grid of
images, two seconds of audio, or a few sentences. Samples use their own random generator,
seeded by the run's seed and the update, so logging them never changes the training itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .errors import ZForcingError
from .model import ZForcing

FOLDER = "tensorboard"
IMAGES, AUDIO_SECONDS, SENTENCES = 16, 2.0, 5
NOT_SCALARS = {"type", "step", "epoch"}


def require_tensorboard() -> None:
    """A clear error, before any work, when the extra is not installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ZForcingError(
            "--tensorboard needs the tensorboard package, which is not installed.",
            "Install it with: pip install 'zforcing[tensorboard]' (or pip install tensorboard).",
        ) from None


class TensorBoardLog:
    """Scalars and samples of one run, in run_dir/tensorboard."""

    def __init__(self, run_dir: Path, data: dict, seed: int, resumed_at: int | None = None):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides what a killed run logged after its checkpoint, which the resumed run redoes.
        self.writer = SummaryWriter(str(Path(run_dir) / FOLDER), purge_step=resumed_at)
        self.data = data
        self.seed = seed

    def sample_seed(self, step: int) -> int:
        return (self.seed * 1_000_003 + step) % 2**63

    def record(self, record: dict) -> None:
        """One metrics.jsonl record as scalars named type/key at its step (non-finite values and
        flags left out, as they are null or true/false in the JSON)."""
        for key, value in record.items():
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"{record['type']}/{key}", value, record["step"])
        self.writer.flush()

    @torch.no_grad()
    def samples(self, model: ZForcing, step: int) -> None:
        """What the model generates now, from the prior."""
        from .generate import generator_for

        was_training = model.training
        model.train(False)
        generator = generator_for(model, self.sample_seed(step))
        modality = self.data["modality"]
        if modality == "binary":
            self.add_images(model, generator, step)
        elif modality == "frames":
            self.add_audio(model, generator, step)
        else:
            self.add_sentences(model, step)
        model.train(was_training)
        self.writer.flush()

    def add_images(self, model: ZForcing, generator: torch.Generator, step: int) -> None:
        from .plots import image_grid

        height, width = self.data["image_shape"]
        pixels = model.generate(IMAGES, height * width, generator=generator).view(IMAGES, height, width)
        grid = image_grid(pixels.float().cpu().numpy(), columns=int(math.sqrt(IMAGES)))
        self.writer.add_image("samples", grid[None], step, dataformats="CHW")

    def add_audio(self, model: ZForcing, generator: torch.Generator, step: int) -> None:
        from .generate import AudioFormat

        audio = AudioFormat.of(self.data)
        frames = model.generate(1, audio.frames_for(AUDIO_SECONDS), generator=generator)
        samples = audio.to_samples(frames.cpu().numpy()).astype(np.float32) / 32768.0
        self.writer.add_audio("samples", torch.from_numpy(samples), step, sample_rate=audio.sample_rate)

    def add_sentences(self, model: ZForcing, step: int) -> None:
        from .sentences import Decoding, TextVocabulary, sample_sentences

        vocabulary = TextVocabulary.of(self.data)
        decoding = Decoding(top_p=0.9, min_tokens=vocabulary.min_tokens)
        sentences = sample_sentences(model, vocabulary, SENTENCES, decoding, seed=self.sample_seed(step))
        self.writer.add_text("samples", "\n\n".join(f"{index}. {text}" for index, text in enumerate(sentences, 1)), step)

    def close(self) -> None:
        self.writer.close()
