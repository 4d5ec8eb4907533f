"""Clustering the template groups into tasks, and choosing how many.

k-means (scikit-learn) over the groups' pooled vectors, each group weighted by its records.
k-means and not HDBSCAN: every record must land in some task, and HDBSCAN by design labels
records in low-density regions as noise; its density scale is one more knob a user cannot judge.

How many tasks: an internal index does not tell — the silhouette on the same partitions would
choose 2-4 tasks on the demo data, whose true k is 10 (bench/discover.py). What does
separate a real task from a spurious split is the answer: two halves of one task answer alike,
two tasks do not. Over the answer vectors, each pair of clusters a, b gets two scores:

    significance(a, b) = |mean_a - mean_b|^2 / (var_a / n_a + var_b / n_b)
    effect(a, b)       = (|mean_a - mean_b|^2 - var_a / n_a - var_b / n_b) / (var_a + var_b)

significance is the squared distance of the two mean answers over what sampling noise alone
gives it (about 1 for two samples of one distribution, at any size); effect is that distance,
less its noise, relative to the answers' spread, so it does not grow with the data (with
10,000 records a task any two templates differ significantly, and not by much). k is the
largest k in the range whose every pair of clusters passes both: significance >= SIGNIFICANCE
and effect >= EFFECT. Measured on the demo data (bench/discover.py): at the true k the closest
pair scores 1.27-8.6 and 0.006-0.010 from 40 to 800 records a task; at the k after it
(a task split) significance is at most 1.27 and effect at most 0.0051, never both passing.
Below about 40 records a task nothing is significant and k comes out low: give --k there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from chainlora.discover.features import sum_by

SIGNIFICANCE = 1.25  # the closest pair's mean answers this many times further apart than noise explains
EFFECT = 0.005  # ... and apart by this fraction of the answers' spread (squared)
FIT_LIMIT = 4000  # groups k-means fits on; more are assigned to the nearest centroid


@dataclass
class Partition:
    k: int
    group_labels: np.ndarray  # each group's cluster
    centroids: np.ndarray
    significance: float  # of the least significant pair of clusters (inf for k = 1)
    effect: float  # of the pair with the smallest effect (inf for k = 1)

    @property
    def separated(self) -> bool:
        return self.significance >= SIGNIFICANCE and self.effect >= EFFECT


@dataclass
class Choice:
    partition: Partition
    scanned: dict[int, tuple[float, float]] = field(default_factory=dict)  # k -> (significance, effect)


def kmeans(points: np.ndarray, weights: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, centroids) of weighted k-means; on a seeded sample of FIT_LIMIT points when there
    are more (the rest go to their nearest centroid)."""
    from sklearn.cluster import KMeans

    n_init = 50 if len(points) <= 1000 else 8
    fit = np.arange(len(points))
    if len(points) > FIT_LIMIT:
        fit = np.sort(np.random.default_rng(seed).choice(len(points), FIT_LIMIT, replace=False))
    model = KMeans(k, n_init=n_init, random_state=seed).fit(points[fit], sample_weight=weights[fit])
    labels = model.predict(points) if len(fit) < len(points) else model.labels_
    return labels.astype(np.int64), model.cluster_centers_


def separation(answers: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, float]:
    """(smallest significance, smallest effect) over all pairs of clusters (module docstring)."""
    if k < 2:
        return float("inf"), float("inf")
    n = np.bincount(labels, minlength=k).astype(np.float64)
    if (n < 2).any():
        return 0.0, 0.0  # a cluster of one record is not a task
    sums = sum_by(labels, k, answers)
    sq = np.bincount(labels, weights=np.einsum("ij,ij->i", answers, answers, dtype=np.float64), minlength=k)
    means = sums / n[:, None]
    var = np.maximum(sq / n - (means ** 2).sum(1), 0.0) * n / (n - 1)  # unbiased, summed over dimensions
    noise = var / n
    d2 = ((means[:, None, :] - means[None, :, :]) ** 2).sum(-1)
    pair_noise = noise[:, None] + noise[None, :]
    significance = d2 / np.maximum(pair_noise, 1e-12)
    effect = (d2 - pair_noise) / np.maximum(var[:, None] + var[None, :], 1e-12)
    upper = np.triu_indices(k, 1)
    return float(significance[upper].min()), float(effect[upper].min())


def partition(points: np.ndarray, weights: np.ndarray, answers: np.ndarray, group: np.ndarray,
              k: int, seed: int) -> Partition:
    if k == 1:
        return Partition(1, np.zeros(len(points), np.int64), points.mean(0, keepdims=True), float("inf"), float("inf"))
    labels, centroids = kmeans(points, weights, k, seed)
    return Partition(k, labels, centroids, *separation(answers, labels[group], k))


def choose_k(points: np.ndarray, weights: np.ndarray, answers: np.ndarray, group: np.ndarray,
             k_max: int, seed: int, progress: bool = True) -> Choice:
    """The largest k in 2..k_max whose clusters all separate (else k = 1). Every k is scanned:
    on small data a k can fail between two that pass (k-means splits a task before it
    separates two close ones)."""
    from chainlora.console import bar

    best, scanned = partition(points, weights, answers, group, 1, seed), {}
    ks = bar(total=k_max - 1, desc="choosing k", unit="k", disable=not progress)
    for k in range(2, k_max + 1):
        p = partition(points, weights, answers, group, k, seed)
        scanned[k] = (p.significance, p.effect)
        if p.separated:
            best = p
        ks.update()
    ks.close()
    return Choice(best, scanned)


def merge_small(p: Partition, points: np.ndarray, weights: np.ndarray, min_size: int) -> tuple[Partition, int]:
    """Clusters of fewer than `min_size` records joined to the nearest kept one (by centroid);
    returns the new partition (clusters renumbered by size, largest first) and how many records moved."""
    sizes = np.bincount(p.group_labels, weights=weights, minlength=p.k)
    keep = np.flatnonzero(sizes >= min_size)
    if len(keep) == 0:
        keep = np.array([int(np.argmax(sizes))])
    labels = p.group_labels.copy()
    moved = 0
    small = ~np.isin(labels, keep)
    if small.any():
        d = ((points[small][:, None, :] - p.centroids[keep][None, :, :]) ** 2).sum(-1)
        labels[small] = keep[np.argmin(d, 1)]
        moved = int(weights[small].sum())
    new_sizes = np.bincount(labels, weights=weights, minlength=p.k)
    order = [int(c) for c in np.argsort(-new_sizes, kind="stable") if new_sizes[c] > 0]
    renumber = {c: i for i, c in enumerate(order)}
    labels = np.fromiter((renumber[int(c)] for c in labels), dtype=np.int64, count=len(labels))
    centroids = np.stack([np.average(points[labels == i], axis=0, weights=weights[labels == i])
                          for i in range(len(order))])
    return Partition(len(order), labels, centroids, p.significance, p.effect), moved
