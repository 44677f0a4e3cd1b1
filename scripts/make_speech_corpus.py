"""Synthesise a small speech corpus with espeak-ng, for trying the speech pipeline without TIMIT.

    python scripts/make_speech_corpus.py OUT_DIR [--utterances 600] [--seed 0]

Each utterance is a random sentence from a fixed vocabulary, spoken by one of espeak-ng's English
voices at a random speed and pitch, written as a 22.05 kHz WAV (`zforcing prepare wav` resamples
it). Needs the `espeak-ng` program (Debian: apt-get install espeak-ng). The figures of
docs/speech.md come from `--utterances 600 --seed 0`.
"""

from __future__ import annotations

import argparse
import random
import subprocess
from pathlib import Path

VOICES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en+f3", "en+m3", "en-us+f2", "en-us+m7")
WORDS = (
    "the a one two three red green blue small large quiet loud river mountain city window garden "
    "teacher doctor child friend walks runs sings reads writes opens closes finds brings takes "
    "slowly quickly today tomorrow under over near behind before after because although morning "
    "evening winter summer water bread music letter story machine number question answer light"
).split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) + "."


def synthesise(text: str, voice: str, speed: int, pitch: int, out: Path) -> None:
    command = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(out), text]
    subprocess.run(command, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--utterances", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for index in range(args.utterances):
        voice = rng.choice(VOICES)
        synthesise(sentence(rng), voice, rng.randint(130, 200), rng.randint(30, 70), args.out / f"utt{index:05d}.wav")
    print(f"wrote {args.utterances} utterances to {args.out}")


if __name__ == "__main__":
    main()
