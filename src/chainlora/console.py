"""The one place chainlora makes a rich Console: tables in logs are never cropped.

rich sizes a console that is not a terminal (a pipe, a CI log, a file) at 80 columns and crops
what does not fit with an ellipsis, so `translate_en_fr` and `translate_en_es` both printed as
`translat…`. Here a console that is not a terminal is wide (200 columns, or a wider $COLUMNS), and every
table cell folds onto a second line rather than losing characters, terminal or not.
"""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console as _RichConsole
from rich.table import Table
from tqdm import tqdm
from tqdm.auto import tqdm as auto_tqdm

LOG_WIDTH = 200  # columns, at least, for a console that is not a terminal (a wider $COLUMNS wins)


class Console(_RichConsole):
    """rich's Console, but a table never crops a cell (names, headers, numbers fold instead)."""

    def print(self, *objects, **kwargs) -> None:  # type: ignore[override]
        for o in objects:
            if isinstance(o, Table):
                for column in o.columns:
                    column.overflow = "fold"
        super().print(*objects, **kwargs)


def console(stderr: bool = False) -> Console:
    """A Console on stdout (or stderr), as wide as a log needs when the stream is not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    width = None if tty else max(int(os.environ.get("COLUMNS") or 0), LOG_WIDTH)  # a log is never narrower
    return Console(stderr=stderr, width=width)


# --------------------------------------------------------------------------- progress

PROGRESS_MODES = ("auto", "bar", "plain", "none")
_mode = {"progress": "auto"}


def set_progress(mode: str) -> None:
    """`--progress`: bar (redrawn in place), plain (one line per update, for logs) or none;
    auto is bar on a terminal and plain otherwise."""
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress mode {mode!r}: use one of {', '.join(PROGRESS_MODES)}")
    _mode["progress"] = mode


def progress_mode() -> str:
    """The mode in effect: bar, plain or none (auto resolved against stderr)."""
    mode = _mode["progress"]
    if mode == "auto":
        return "bar" if hasattr(sys.stderr, "isatty") and sys.stderr.isatty() else "plain"
    return mode


def bar(*, disable: bool = False, **kwargs):
    """A tqdm progress bar on stderr in the mode in effect: in plain mode each refresh is one
    whole line (at most one every `PLAIN_INTERVAL_S` seconds, and the last), never a carriage
    return or a cursor movement in a log file."""
    mode = progress_mode()
    if mode == "bar":
        return auto_tqdm(disable=disable, **kwargs)
    kwargs.pop("position", None)
    kwargs.pop("dynamic_ncols", None)
    return PlainBar(disable=disable or mode == "none", mininterval=PLAIN_INTERVAL_S, file=sys.stderr, **kwargs)


PLAIN_INTERVAL_S = 10.0
PLAIN_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class PlainBar(tqdm):
    """tqdm that prints a new whole line per update (at most one every `mininterval` seconds,
    and the last one on close) instead of redrawing one line with \\r and cursor movements."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("bar_format", PLAIN_FORMAT)
        self._last_line, self._last_t = None, 0.0
        super().__init__(*args, **kwargs)
        self.sp = None  # tqdm's own close() then writes nothing (no blank line, no \\r)

    def display(self, msg: str | None = None, pos: int | None = None, force: bool = False) -> bool:
        line = (msg if msg is not None else str(self)).strip()
        now = time.monotonic()
        if line and line != self._last_line and (force or now - self._last_t >= self.mininterval):
            self._last_line, self._last_t = line, now
            self.fp.write(line + "\n")
            self.fp.flush()
        return True

    def close(self) -> None:
        if not self.disable:
            self.display(force=True)
        super().close()
