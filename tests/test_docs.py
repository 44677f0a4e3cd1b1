"""docs/cli.md is generated from the app; it must be regenerated whenever the CLI changes. The
README's commands come in the order a reader types them."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_cli_docs.py"
CPU_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
SET_UP = ['pip install . && zforcing train          # trains on the embedded data, writes runs/latest',
          'pip install ".[test]" && pytest          # the whole test suite']


def load_generator():
    spec = importlib.util.spec_from_file_location("make_cli_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_current():
    generator = load_generator()
    assert generator.CLI_DOCS.read_text() == generator.render_cli_docs(), (
        "docs/cli.md is out of date: run `python scripts/make_cli_docs.py`"
    )


def test_cli_reference_documents_every_command():
    text = load_generator().CLI_DOCS.read_text()
    for command in ("prepare", "train", "evaluate", "sample", "interpolate"):
        assert f"## `zforcing {command}`" in text


def test_the_readme_gives_the_cpu_build_before_anything_that_installs_torch():
    """A literal reader runs the first command they meet: on a machine without a GPU, that must
    not be one that pulls several gigabytes of CUDA packages."""
    blocks = re.findall(r"```\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    lines = [line for block in blocks for line in block.splitlines()]
    assert lines[0] == CPU_TORCH
    assert lines[1:3] == SET_UP  # the two set-up lines, exactly as ever
