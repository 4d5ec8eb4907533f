"""Choosing the library's default selector by measurement, at the end of `chainlora train`.

Every selector the library has (score / generate over the task-selection LoRA, classifier,
encoder) routes the validation records that no selector trained on (chainlora.train.plan
.selector_split: held-out records and whole held-out instruction templates). Recorded in the
manifest's `selection`:
- per selector: top-1, top-3, top-1 on held-out templates, ms per instruction, and the
  calibrated confidence threshold (chainlora.inference.calibration) with what it does there;
- the winner: the best top-1 on held-out templates (unseen wording is what users send), then
  overall top-1, then speed — unless `selection.default` names one;
- the out-of-library detector (chainlora.inference.novelty): fitted on the selectors' training
  instructions (`novelty_method`), with the similarity threshold that accepts `novelty_recall` of
  the validation.
It has a fingerprint of its own: kept while the selectors, the validation data and these
settings are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from chainlora.inference import calibration
from chainlora.inference.accuracy import route_labelled
from chainlora.library import store
from chainlora.train.config import Config
from chainlora.train.plan import SelectorSplit

NOVELTY_PATH = "selection/novelty"
BANK_PER_TASK = 200  # training instructions a task in the out-of-library detector's bank


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def bank_records(split: SelectorSplit, seed: int) -> list:
    """The instructions the out-of-library detector compares with: selectors' training records,
    and the extra phrasings of `selection.instructions` (in-library wording too)."""
    out = []
    for t, records in split.pool.items():
        records = records + split.extra.get(t, [])
        out += records if len(records) <= BANK_PER_TASK else random.Random(seed).sample(records, BANK_PER_TASK)
    return out


def fingerprint(cfg: Config, split: SelectorSplit, selector_prints: dict[str, str]) -> str:
    """What decides the selection: the selectors (by their fingerprints), the validation and
    bank records, the settings, the system prompt the LoRA selectors read."""
    return _digest([cfg.selection.model_dump(), selector_prints, cfg.system_prompt,
                    [[r.text, r.task, r.meta.get("template")] for r in split.validation],
                    sorted(map(sorted, split.heldout.values())) if split.heldout else [],
                    [r.text for r in bank_records(split, cfg.training.seed)], cfg.training.seed])


def _measure(engine: Any, kind: str, split: SelectorSplit, precision: float) -> dict:
    """One selector on the validation records: accuracy, latency and its calibrated threshold."""
    r = route_labelled(engine, split.validation, kind, split.heldout)
    correct, conf = r.hit1, r.confidence
    threshold = calibration.confidence_threshold(conf, correct, precision)
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {"n": len(correct), "top1": mean(correct), "top3": mean(r.hit3), "heldout_n": len(r.held),
            "heldout_top1": mean([correct[i] for i in r.held]), "ms_per_instruction": round(r.ms_per_instruction, 2),
            "threshold": round(threshold, 6),
            **{k: None if v is None else round(v, 4)
               for k, v in calibration.accepted(conf, correct, threshold).items()}}


def winner(results: dict[str, dict]) -> str:
    """Best on held-out templates (else overall), then overall top-1, then the fastest."""
    def key(kind: str) -> tuple:
        r = results[kind]
        held = r["heldout_top1"] if r["heldout_top1"] is not None else r["top1"]
        return (held, r["top1"], -r["ms_per_instruction"])
    return max(results, key=key)


def detector_space(cfg: Config, lib: Any) -> str:
    """The out-of-library detector's sentence space (`selection.novelty_space`): the fine-tuned
    encoder selector's where the library has one and `auto` asks for it, else the frozen
    all-MiniLM-L6-v2, else (MiniLM not installed) the base model's last hidden state."""
    from chainlora.errors import ChainloraError
    from chainlora.inference import classifier

    if cfg.selection.novelty_space == "auto" and lib.encoder:
        return "encoder"
    try:
        return "minilm" if classifier.minilm_dir() else "base"
    except ChainloraError:
        return "base"


def _novelty(engine: Any, cfg: Config, split: SelectorSplit, root: Path) -> dict | str:
    """Fit the out-of-library detector; its manifest entry, or why it was left out."""
    from chainlora.inference import novelty

    space = detector_space(cfg, engine.lib)
    embed = lambda texts: engine.selectors.embed(space, texts)  # noqa: E731
    records = bank_records(split, cfg.training.seed)
    bank, method = embed([r.text for r in records]), cfg.selection.novelty_method
    if method == "mahalanobis":
        state = novelty.fit_mahalanobis(bank, [r.task for r in records])
        info = {"method": method, "encoder": space, "shrinkage": novelty.SHRINKAGE}
    else:
        state, info = {"embeddings": bank}, {"method": method, "encoder": space, "k": novelty.K}
    sims = novelty.score(state, info, embed([r.text for r in split.validation])).tolist()
    threshold = novelty.threshold_for(sims, cfg.selection.novelty_recall)
    info = {**info, "threshold": threshold, "n_bank": int(bank.shape[0])}
    directory = store.inside(root, NOVELTY_PATH)
    from chainlora import atomic

    with atomic.directory(directory, replace=True) as tmp:
        novelty.save(tmp, state, info)
        sha = store.adapter_sha256(tmp, novelty.FILES)
    return {**info, "path": NOVELTY_PATH, "sha256": sha,
            "validation_fallback_rate": round(sum(s < threshold for s in sims) / len(sims), 4)}


def measure(root: Path, manifest: dict, base: Any, cfg: Config, split: SelectorSplit, fp: str) -> dict | None:
    """Main process, after every selector is trained into `root`: the `selection` block (None
    when disabled or there is nothing to choose between). Leaves `base` as it found it."""
    from chainlora.inference import selectors
    from chainlora.inference.engine import Engine
    from chainlora.library.store import Library

    s = cfg.selection
    lib = Library(root, manifest)
    kinds = [k for k in selectors.available(lib) if s.selectors == "all" or k in s.selectors]
    if not s.enabled or not split.validation or not kinds:
        return None
    engine = Engine(lib, base, selector=kinds[0], threshold=0.0, novelty=False)
    try:
        results = {k: _measure(engine, k, split, s.precision) for k in kinds}
        best = winner(results) if s.default == "auto" else s.default
        if best not in results:  # named by selection.default but left out of selection.selectors
            results[best] = _measure(engine, best, split, s.precision)
        out = {"fingerprint": fp, "winner": best, "precision": s.precision, "n_validation": len(split.validation),
               "heldout_templates": {t: sorted(v, key=str) for t, v in split.heldout.items() if v},
               "selectors": results, "chosen_by": "measured" if s.default == "auto" else "selection.default"}
        if s.novelty:
            out["novelty"] = _novelty(engine, cfg, split, root)
    finally:
        engine.close()
    return out
