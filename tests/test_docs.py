"""docs/cli.md is generated from the app; it must be regenerated whenever the CLI changes."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_cli_docs.py"


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
