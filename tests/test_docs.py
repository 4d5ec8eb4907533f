"""The docs and the CLI agree: every flag of every command is in docs/cli.md under that command,
and every flag docs/cli.md names for a command exists; every config key is in a docs table and
every key a table names exists; the README stays a front door whose links resolve."""

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


def schema_keys(model=None, prefix: str = "") -> set[str]:
    """Every leaf key of the config schema, dotted (`training.early_stopping.patience`)."""
    import typing

    from pydantic import BaseModel

    from chainlora.train.config import Config

    out: set[str] = set()
    for name, field in (model or Config).model_fields.items():
        inner = [a for a in (field.annotation, *typing.get_args(field.annotation))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        out |= schema_keys(inner[0], f"{prefix}{name}.") if inner else {prefix + name}
    return out


def documented_keys() -> set[str]:
    """The keys the first column of every table in docs/ names; `.sub` after a key is its sibling
    (`training.cola.links` / `.knots`)."""
    keys: set[str] = set()
    for doc in sorted((REPO / "docs").glob("*.md")):
        for line in doc.read_text().splitlines():
            if not line.startswith("| `"):
                continue
            last = ""
            for token in re.findall(r"`([a-z_.]+)`", line.split(" | ")[0]):
                last = last.rsplit(".", 1)[0] + token if token.startswith(".") else token
                keys.add(last)
    return keys


def test_every_config_key_is_documented_and_every_documented_key_exists():
    real, docs = schema_keys(), documented_keys()
    assert real - docs == set(), f"config keys missing from the docs' tables: {sorted(real - docs)}"
    sections = {k.split(".")[0] for k in real}
    stale = {k for k in docs if k.split(".")[0] in sections and k not in real
             and not any(r.startswith(k + ".") for r in real)}
    assert stale == set(), f"documented keys the config does not have: {sorted(stale)}"
