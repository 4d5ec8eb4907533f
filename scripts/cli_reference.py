"""Write docs/cli.md's command reference from the `chainlora` parser itself, so the docs list
every flag the CLI has and no flag it lacks (tests/test_docs.py checks both).

    .venv/bin/python scripts/cli_reference.py          # rewrites the block between the markers
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
BEGIN, END = "<!-- cli-reference:begin -->", "<!-- cli-reference:end -->"


def reference() -> str:
    """Each command's `--help`, as argparse prints it at 100 columns."""
    os.environ["COLUMNS"] = "100"
    from chainlora.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    parts = []
    for name, command in sub.choices.items():
        parts += [f"### `chainlora {name}`", "", "```text", command.format_help().rstrip(), "```", ""]
    return "\n".join(parts).rstrip()


def main() -> int:
    text = DOC.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + reference() + "\n" + text[end:])
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
