"""bench/RESULTS.md's sections that a benchmark writes itself: the text between its markers is
replaced (or, the first time, appended under a heading), atomically."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(tag: str, section: str, heading: str) -> None:
    """Replace the block between `<!-- TAG:begin -->` and `<!-- TAG:end -->` with `section`; a
    file without the markers gets `heading` and the block at its end."""
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    text = RESULTS.read_text()
    block = f"{begin}\n{section}\n{end}"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += f"\n{heading}\n\n{block}\n"
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(RESULTS)
