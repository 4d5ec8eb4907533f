"""How many rooms a value walks through: trace chainlora's own calls while (1) a config trains a
tiny library and (2) one chat request goes through the server, and count module entries.

A "room" is a chainlora module; an entry is a call from one chainlora module into another. The
numbers are what issue 39 asked to compare before and after a refactor, e.g.

    .venv/bin/python scripts/rooms.py                 # this checkout
    git worktree add /tmp/old REV && (cd /tmp/old && PYTHONPATH=src ../main/.venv/bin/python \\
        /work/main/scripts/rooms.py)                  # another revision, same script

Offline, on a tiny random model built here (tests/conftest.py's make_tiny_model).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
TESTS = Path(__file__).resolve().parents[1] / "tests"


class Rooms:
    """sys.setprofile hook: counts calls that cross from one chainlora module into another."""

    def __init__(self) -> None:
        self.entries: collections.Counter[str] = collections.Counter()
        self.back: collections.Counter[tuple[str, str]] = collections.Counter()

    def __call__(self, frame, event, arg) -> None:  # noqa: ANN001
        if event != "call":
            return
        callee = frame.f_globals.get("__name__", "")
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
        if callee.startswith("chainlora") and caller.startswith("chainlora") and callee != caller:
            self.entries[callee] += 1
            self.back[(caller, callee)] += 1

    def summary(self) -> dict:
        pairs = set(self.back)
        mutual = sorted({tuple(sorted(p)) for p in pairs if (p[1], p[0]) in pairs})
        return {"rooms": len(self.entries), "doors": len(pairs), "entries": sum(self.entries.values()),
                "most_entered": self.entries.most_common(), "back_and_forth": [list(p) for p in mutual]}

    def reset(self) -> None:
        self.entries.clear()
        self.back.clear()


def traced(fn) -> dict:  # noqa: ANN001
    rooms = Rooms()
    sys.setprofile(rooms)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return rooms.summary()


def main() -> None:
    sys.path.insert(0, str(TESTS))
    from conftest import make_tiny_model

    from chainlora.train import config, train_library

    work = Path(tempfile.mkdtemp(prefix="rooms-"))
    model = make_tiny_model(work / "model")
    cfg = config.load(TESTS.parent / "configs" / "tiny.yaml", overrides=[
        f"base_model={model}", "classifier.enabled=false", "training.max_steps=1", "router.training.max_steps=1"])
    train = traced(lambda: train_library(cfg, work / "lib"))

    import threading

    from fastapi.testclient import TestClient

    from chainlora.inference.engine import Engine
    from chainlora.serve import Server, create_app

    rooms = Rooms()  # on every thread from here (the server's worker and preparer threads too)
    threading.setprofile(rooms)
    sys.setprofile(rooms)
    app = create_app(Server(Engine.load(work / "lib", device="cpu")))
    body = {"model": "chain", "messages": [{"role": "user", "content": "Give the antonym of hot."}],
            "max_tokens": 4}
    with TestClient(app, base_url="http://127.0.0.1") as client:  # a loopback Host, as a local client sends
        client.post("/v1/chat/completions", json=body).raise_for_status()  # first use: loading, warm-up
        rooms.reset()
        client.post("/v1/chat/completions", json=body).raise_for_status()
        request = rooms.summary()
    sys.setprofile(None)
    threading.setprofile(None)
    print(json.dumps({"train": train, "request": request}))  # the last line (training prints above it)


if __name__ == "__main__":
    main()
