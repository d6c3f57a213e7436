"""docs/cli.md is every command's current ``--help`` (regenerate with ``make docs``)."""

from __future__ import annotations

from pathlib import Path

from dpolab.commands.reference import commands, render

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def _words(text: str) -> list[str]:
    return text.split()  # argparse's line wrapping varies with the Python version; the words do not


def test_cli_reference_is_current():
    text = render()
    assert _words(DOC.read_text(encoding="utf-8")) == _words(text), "docs/cli.md is out of date: run `make docs`"
    for words in commands():  # every command has its section and every section lists options
        section = text.split(f"## dpolab {' '.join(words)}\n", 1)[1].split("\n## ", 1)[0]
        assert "usage: dpolab " + " ".join(words) in section and "--help" in section, words
    assert "## dpolab grpo" in text and "--num-generations" in text and "--report-to" in text
