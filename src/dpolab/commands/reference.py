"""The command-line reference, docs/cli.md: every command's ``--help``, generated.

The help texts come from the config dataclasses (``dpolab.config.build_parser``), so the reference
cannot say other than the commands do; ``tests/test_cli_reference.py`` fails when docs/cli.md is
behind. Regenerate with ``make docs`` (``python -m dpolab.commands.reference > docs/cli.md``).
"""

from __future__ import annotations

import contextlib
import io
import os

WIDTH = "100"  # argparse wraps help to $COLUMNS: fixed, so the file does not depend on the terminal

HEADER = """# Command-line reference

Every `dpolab` command with every option, as `dpolab COMMAND --help` prints it (each option's
default at the end of its line). Generated from the commands' configuration classes by
`make docs`; a test keeps this page current. Every option can also come from `--config FILE.yaml`
(flags override it). The guides: [README](../README.md) and the pages linked from it.
"""


def commands() -> list[list[str]]:
    """Every command as its argv words, in the order of ``dpolab --help``."""
    from dpolab.cli import COMMANDS, available_commands

    out = []
    for name, entry in available_commands(COMMANDS).items():
        out += [[name, sub] for sub in entry] if isinstance(entry, dict) else [[name]]
    return out


def help_text(words: list[str]) -> str:
    """What ``dpolab WORDS --help`` prints."""
    from dpolab.cli import main

    buf = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            main([*words, "--help"])
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return buf.getvalue().rstrip() + "\n"


def render() -> str:
    """docs/cli.md: the command list, then one section per command with its ``--help``."""
    words = commands()
    parts = [HEADER, "```text\n" + help_text([]) + "```\n"]
    parts += ["Commands: " + ", ".join(f"[`dpolab {' '.join(w)}`](#dpolab-{'-'.join(w)})" for w in words) + ".\n"]
    for w in words:
        parts.append(f"## dpolab {' '.join(w)}\n\n```text\n{help_text(w)}```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
