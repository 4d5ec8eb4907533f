"""The confidence threshold below which a route is not trusted (the request falls back).

Chosen at train time on validation routes no selector trained on: the lowest threshold whose
accepted routes are at least `precision` right. Lowest, because every request under it loses its
task adapter; the precision target bounds what a wrong adapter costs the rest.
"""

from __future__ import annotations

from typing import Sequence


def confidence_threshold(confidence: Sequence[float], correct: Sequence[bool], precision: float) -> float:
    """The lowest t such that the routes with confidence >= t are >= `precision` right. Where no
    t reaches it (even the single most confident route is wrong), a t above every confidence:
    every request falls back, which the selection table shows."""
    pairs = sorted(zip(confidence, correct), key=lambda p: p[0])
    n = len(pairs)
    right = sum(c for _, c in pairs)
    for i, (t, _) in enumerate(pairs):
        if i and pairs[i - 1][0] == t:  # accepts the same routes as the previous candidate
            continue
        if right / (n - i) >= precision:
            return float(t) if i else 0.0
        right -= sum(c for p, c in pairs[i:] if p == t)
    return float(pairs[-1][0]) + 1e-6 if pairs else 0.0


def accepted(confidence: Sequence[float], correct: Sequence[bool], threshold: float) -> dict:
    """What a threshold does on labelled routes: the share that falls back, the accuracy of the rest."""
    kept = [c for p, c in zip(confidence, correct) if p >= threshold]
    n = len(confidence)
    return {"fallback_rate": (n - len(kept)) / n if n else None,
            "accepted_accuracy": sum(kept) / len(kept) if kept else None}  # None: nothing accepted


MOSTLY_FALLS_BACK = 0.5  # a default selector that sends at least this share to the fallback is a warning


def fallback_warning(selection: dict | None, fallback: str = "the mixed adapter") -> str | None:
    """One line when the library's measured default routing would send most requests to the
    fallback (its calibrated threshold trusts almost no route): such a "chain" is in effect
    `fallback`, and a user must hear it at the end of `train` and in `route`, not find it later."""
    if not selection or selection.get("winner") not in (selection.get("selectors") or {}):
        return None
    name = selection["winner"]
    result = selection["selectors"][name]
    rate = result.get("fallback_rate")
    if rate is None or rate < MOSTLY_FALLS_BACK:
        return None
    return (f"warning: the default selector {name} sends {rate:.0%} of validation requests to {fallback} "
            f"(no route is trusted below its calibrated threshold {result.get('threshold', 0):.3f}): the chain "
            "rarely routes. Train the selectors longer, enable the encoder or classifier selector "
            "(encoder.enabled / classifier.enabled: true), or lower selection.precision")
