"""The out-of-library detector's methods side by side on one library: how many requests fall back.

Each method (chainlora.inference.novelty: `knn`, the k-th nearest training instruction; and
`mahalanobis`, the nearest task mean under a shared shrunk covariance) is fitted on the
library's detector bank (the selectors' training instructions, as `chainlora train` fits it) in
each space (`selection.novelty_space`: the frozen all-MiniLM-L6-v2, and the library's fine-tuned
`encoder` selector where it has one), its threshold set to accept `selection.novelty_recall` of
the validation split, and measured on:
- the development sets the method was chosen on (bench/data/dev_paraphrases.jsonl: 30 in-library
  rewordings, 3 a task; bench/data/dev_out_of_library.jsonl: 30 requests of no demo task);
- the check sets of bench/selection.py, not used for choosing (paraphrases.jsonl, 60;
  out_of_library.jsonl, 60).
Only the detector: the selector's low-confidence fallback is bench/selection.py S3.

    .venv/bin/python bench/novelty.py [--library runs/demo/library]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / "data" / name).read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", default="runs/demo/library")
    args = parser.parse_args()

    from chainlora.data import Record, load_demo
    from chainlora.inference import classifier, encoder, novelty
    from chainlora.train import config
    from chainlora.train.plan import selector_split, task_splits
    from chainlora.train.selection import bank_records

    manifest = json.loads((Path(args.library) / "chainlora.json").read_text())
    cfg = config.from_dict(manifest["training"])
    _, train, _ = task_splits(cfg, load_demo())
    split = selector_split(cfg, train)
    records = bank_records(split, cfg.training.seed)
    frozen = classifier.FrozenEncoder("minilm")
    spaces = {"frozen MiniLM": frozen.embed}
    if manifest.get("encoder"):
        model, tokenizer, enc_info = encoder.load(Path(args.library) / manifest["encoder"]["path"])
        spaces["fine-tuned encoder"] = lambda texts: encoder.embed(model, tokenizer, texts, enc_info["max_length"])
    sets = {"dev: rewordings (in library)": [Record(p["task"], p["instruction"], "").text for p in read("dev_paraphrases.jsonl")],
            "dev: out of library": [p["instruction"] for p in read("dev_out_of_library.jsonl")],
            "check: paraphrases (in library)": [Record(p["task"], p["instruction"], "").text for p in read("paraphrases.jsonl")],
            "check: out of library": [p["instruction"] for p in read("out_of_library.jsonl")]}
    print(f"library {args.library}: bank {len(records)} instructions, validation {len(split.validation)}, "
          f"novelty_recall {cfg.selection.novelty_recall}")
    print("\n| space | method | " + " | ".join(f"{name} ({len(sets[name])})" for name in sets) + " |")
    print("|---|---|" + "---|" * len(sets))
    for space, embed in spaces.items():
        bank, validation = embed([r.text for r in records]), embed([r.text for r in split.validation])
        queries = {name: embed(texts) for name, texts in sets.items()}
        for method in novelty.METHODS:
            if method == "mahalanobis":
                state, info = novelty.fit_mahalanobis(bank, [r.task for r in records]), {"method": method}
            else:
                state, info = {"embeddings": bank}, {"method": method, "k": novelty.K}
            limit = novelty.threshold_for(novelty.score(state, info, validation).tolist(), cfg.selection.novelty_recall)
            cells = [f"{float((novelty.score(state, info, q) < limit).float().mean()):.1%}" for q in queries.values()]
            print(f"| {space} | `{method}` | " + " | ".join(cells) + " |")
    print("\n(share of each set that the detector sends to the fallback adapter)")


if __name__ == "__main__":
    main()
