"""The docs and the CLI agree: every flag of every command is in docs/cli.md under that command,
and every flag docs/cli.md names for a command exists; the README stays a front door whose
links resolve."""

from __future__ import annotations

import re
from pathlib import Path

from chainlora.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def parser_flags() -> dict[str, set[str]]:
    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    return {name: {s for a in p._actions for s in a.option_strings if s.startswith("--")}
            for name, p in sub.choices.items()}


def documented_flags() -> dict[str, set[str]]:
    text = (REPO / "docs" / "cli.md").read_text()
    sections = re.split(r"^### `chainlora ([a-z]+)`$", text, flags=re.M)
    return {name: set(FLAG.findall(body)) for name, body in zip(sections[1::2], sections[2::2])}


def test_every_flag_is_documented_and_every_documented_flag_exists():
    real, docs = parser_flags(), documented_flags()
    assert set(docs) == set(real), set(docs) ^ set(real)
    for command in real:
        assert real[command] - docs[command] == set(), f"{command}: undocumented {real[command] - docs[command]}"
        assert docs[command] - real[command] == set(), f"{command}: documented but missing {docs[command] - real[command]}"


def test_the_readme_is_a_front_door_and_its_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert readme.splitlines()[2:6] and "make demo" in readme[:400] and "make test" in readme[:400]
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"
