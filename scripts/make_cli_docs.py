"""Regenerate docs/cli.md from the Typer app: python scripts/make_cli_docs.py"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CLI_DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
TITLE = "zforcing command-line reference"


def render_cli_docs() -> str:
    """The Markdown reference that typer's docs generator writes for zforcing_cli.cli."""
    command = [sys.executable, "-m", "typer", "zforcing_cli.cli", "utils", "docs", "--name", "zforcing", "--title", TITLE]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


if __name__ == "__main__":
    CLI_DOCS.write_text(render_cli_docs())
    print(f"wrote {CLI_DOCS}")
