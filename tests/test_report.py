"""The HTML report: built from a real (tiny) trained library with COLA adapters and its
evaluation, rendered in headless Chromium, and the screenshot is not blank."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import HANG_S

from chainlora.train import config, train_library

REPO = Path(__file__).resolve().parents[1]


def chromium() -> str:
    """Chromium's path; installed with apt-get where missing (root), else the test is skipped."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    why = "apt-get not available or not root"
    if shutil.which("apt-get") and os.geteuid() == 0:
        try:
            r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                               capture_output=True, text=True, timeout=HANG_S,
                               env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if shutil.which("chromium"):
                return shutil.which("chromium")
            why = (r.stderr.strip().splitlines() or ["no output"])[-1]
        except subprocess.TimeoutExpired:
            why = "apt-get install chromium timed out"
    pytest.skip(f"Chromium is not installed and could not be installed here ({why})")


@pytest.fixture(scope="module")
def reported(tiny_model_dir, tmp_path_factory) -> Path:
    from chainlora.cli import main

    cfg = config.load(REPO / "configs/tiny.yaml", overrides=[f"base_model={tiny_model_dir}",
                                                             "training.method=cola", "training.max_steps=6",
                                                             "training.logging_steps=1", "training.cola.links=2",
                                                             "mixed.training={method: lora}"])
    lib = train_library(cfg, tmp_path_factory.mktemp("rep") / "lib")
    assert main(["eval", str(lib), "--data", "demo", "--per-task", "3", "--max-new-tokens", "3"]) == 0
    assert main(["report", str(lib)]) == 0
    return lib


def test_report_files_hold_every_table_and_plot(reported):
    page = (reported / "report.html").read_text()
    for title in ("Table I", "Chain vs mixed, paired by task", "Tables II / III", "Task metrics", "Adapters",
                  "Provenance", "Training config"):
        assert title in page, title
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    assert images == ["Perplexity per task", "Confusion matrix", "Selector confidence", "Training loss",
                      "COLA vs LoRA"]
    assert "src=\"http" not in page and "<script" not in page  # self-contained, nothing fetched
    md = (reported / "report.md").read_text()
    assert "| task |" in md and all((reported / "report" / f"{k}.png").is_file()
                                     for k in ("perplexity", "confusion", "confidence", "losses", "cola"))


def test_report_renders_in_headless_chromium(reported, tmp_path):
    exe = chromium()
    shot = tmp_path / "report.png"
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1200,3200", f"--screenshot={shot}", (reported / "report.html").as_uri()],
                       capture_output=True, text=True, timeout=180)
    assert shot.is_file(), r.stderr[-1000:]
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)[..., :3]
    ink = (pixels.sum(axis=-1) < 2.9).mean()  # share of pixels that are not (near) white
    colours = len({tuple(p) for p in (pixels[::7, ::7] * 255).astype(int).reshape(-1, 3).tolist()})
    assert ink > 0.03 and colours > 40, (ink, colours)  # text, tables and coloured plots drawn


def test_user_text_in_the_page_is_escaped():
    """Task names, the system prompt, the library's path and the config are user text: a
    `<script>` in any of them comes out as text, never as markup (jinja2 autoescaping)."""
    from types import SimpleNamespace

    from chainlora.eval import report

    evil = "<script>alert('x')</script>"
    lib = SimpleNamespace(root=Path("/runs/lib<script>"), tasks=["t"], router=True, mixed=True, classifier=False)
    tabs = [(f"Table I {evil}", ["task", "chain"], [[evil, "1.00"], ['a & "b"', "—"]])]
    plots = [("losses", f"Training loss {evil}", b"\x89PNG")]
    page = report._html(lib, tabs, plots, {"system prompt": evil, "judge": None}, f'{{"prompt": "{evil}"}}')
    assert "<script" not in page and page.count("&lt;script&gt;") == 8
    assert "<td>a &amp; &#34;b&#34;</td>" in page and "<td>None</td>" in page  # as str() wrote them
    assert " task adapters, router, mixed</p>" in page


def test_the_template_ships_in_the_wheel():
    """pyproject.toml's package data covers every template, so an installed chainlora finds them."""
    from fnmatch import fnmatch

    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = REPO / "src/chainlora/eval"
    templates = [p.relative_to(package).as_posix() for p in (package / "templates").iterdir()]
    assert templates and all(any(fnmatch(t, g) for g in data["chainlora.eval"]) for t in templates)
