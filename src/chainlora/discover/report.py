"""DIR/clusters.html: what `chainlora discover` found, to check before training on it.

One self-contained page: the settings and how k was chosen, per cluster its name, size,
distinctive words and five example instructions, the separation of every k scanned, and a
2-D map (PCA of a sample of records' vectors) coloured by cluster, as an embedded PNG.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

MAP_SAMPLE = 5000  # records drawn on the map


def _map_png(points: np.ndarray, labels: np.ndarray, names: list[str]) -> str:
    """Base64 PNG of a 2-D PCA projection of `points`, coloured by label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    xy = PCA(2, random_state=0).fit_transform(points) if len(points) > 2 else np.zeros((len(points), 2))
    fig, ax = plt.subplots(figsize=(8, 6), dpi=90)
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        m = labels == i
        ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.6, color=cmap(i % 20), label=f"{name} ({int(m.sum())})")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("records by discovered task (PCA of the embedding)")
    ax.legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def record_sample(n: int, seed: int) -> np.ndarray:
    """Which records the map draws: all, or a seeded sample of MAP_SAMPLE."""
    if n <= MAP_SAMPLE:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, MAP_SAMPLE, replace=False))


def render(summary: dict[str, Any], clusters: list[dict[str, Any]], points: np.ndarray, labels: np.ndarray) -> str:
    """The page. `clusters`: name, size, words, examples; `points`/`labels`: the map's records."""
    e = html.escape
    rows = "".join(
        f"<tr><td><b>{e(c['name'])}</b></td><td>{c['size']}</td><td>{e(', '.join(c['words']))}</td>"
        f"<td><ul>{''.join(f'<li>{e(x)}</li>' for x in c['examples'])}</ul></td></tr>" for c in clusters)
    t = summary["thresholds"]
    scan = "".join(f"<tr><td>{k}</td><td>{a:.2f}</td><td>{b:.4f}</td>"
                   f"<td>{'yes' if a >= t['significance'] and b >= t['effect'] else 'no'}</td></tr>"
                   for k, (a, b) in summary["separation_by_k"].items())
    settings = "".join(f"<li>{e(str(k))}: {e(str(v))}</li>" for k, v in summary.items()
                       if k not in ("separation_by_k", "tasks"))
    png = _map_png(points, labels, [c["name"] for c in clusters]) if len(points) else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>chainlora discover</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{border:1px solid #ccc;
padding:4px;vertical-align:top}}table{{border-collapse:collapse}}li{{font-size:90%}}</style></head><body>
<h1>Discovered tasks: {len(clusters)} from {summary['records']} records</h1>
<ul>{settings}</ul>
<h2>Tasks</h2><table><tr><th>name</th><th>records</th><th>distinctive words</th><th>examples</th></tr>{rows}</table>
<h2>How k was chosen</h2><p>k is the largest k whose every pair of clusters answers differently: the
least significant pair at least {t['significance']} (two halves of one task score about 1) and the
smallest effect at least {t['effect']} (chainlora.discover.cluster).</p>
<table><tr><th>k</th><th>significance</th><th>effect</th><th>separated</th></tr>{scan}</table>
<h2>Map</h2>{f'<img alt="2-D map of the records" src="data:image/png;base64,{png}">' if png else ''}
</body></html>
"""
