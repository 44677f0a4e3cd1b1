"""What the sweep tests share, imported by name (a second conftest.py would shadow tests/conftest.py):
specs of the tiny model on the tiny prepared dataset (tests/conftest.py), two updates a run, and
`zforcing sweep` worker subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
TINY_BASE = """\
data = "{data}"
embed_size = 4
hidden_size = 8
latent_size = 4
mlp_size = 8
batch_size = 4
eval_batch_size = 8
max_steps = {steps}
log_every = 1
"""


def spec_text(data: Path, space: str = "aux_weight = [0.0, 0.001]", sweep: str = "seeds = [0, 1]\nreference = { aux_weight = 0.0 }",
              steps: int = 2) -> str:
    return f"[base]\n{TINY_BASE.format(data=data, steps=steps)}\n[space]\n{space}\n\n[sweep]\n{sweep}\n"


@pytest.fixture
def write_spec(tmp_path, tiny_data):
    """write_spec(name="tiny", **spec_text's options) writes tmp_path/<name>.toml and returns its path."""

    def write(name: str = "tiny", **options) -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(spec_text(tiny_data, **options))
        return path

    return write


class Worker:
    """A `zforcing sweep` subprocess; its output goes to files (no pipe can fill up)."""

    def __init__(self, cwd: Path, *args, name: str = "worker"):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        env.pop("ZFORCING_DEBUG", None)
        index = len(list(Path(cwd).glob(f"{name}-*.stderr")))
        self.stderr_path = Path(cwd) / f"{name}-{index}.stderr"
        with open(Path(cwd) / f"{name}-{index}.stdout", "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "zforcing_cli", "sweep", *map(str, args), "--device", "cpu"],
                                            cwd=cwd, env=env, stdout=out, stderr=err)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def finish(self, timeout: float = 180.0) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"the worker did not finish within {timeout:.0f} s:\n{self.stderr()}")
