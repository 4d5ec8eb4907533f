"""How selectors carry to wording they never saw: leave one instruction template out.

The bundled demo data has five instruction templates a task. For each fold k, every selector
recipe trains on the train split's records of the other four templates (`--per-task` a task)
and is scored on records of template k (`--eval-per-task` a task), for every seed. This is the
development measurement for selector recipes: it uses neither the test split nor the
hand-written paraphrases of bench/selection.py, which stay for the final check.

Recipes: `classifier` (frozen MiniLM + linear head) and the `encoder` (MiniLM fine-tuned, LP-FT,
one epoch as in the demo) with each `--encoder` set of `encoder.*` settings, e.g.
`swap_content=0.5` (chainlora.data.content) or `learning_rate=2e-5,epochs=2`. With
`--instructions FILE` (`demo`: the bundled one) every recipe also trains a twin on the same
records plus that file's phrasings (`selection.instructions`, slots filled with the fold's
words). Every fit is also scored on the development rewordings (bench/data/dev_paraphrases.jsonl).

    .venv/bin/python bench/selector_cv.py [--encoder swap_content=0 swap_content=0.5] [--seeds 0 1]
    .venv/bin/python bench/selector_cv.py --encoder epochs=1 --instructions demo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path


def fold(demo: dict, k: int, per_task: int, eval_per_task: int, seed: int) -> tuple[list, list]:
    """(train records without template k, records of template k), sampled per task."""
    train, held = [], []
    for t, d in demo.items():
        rng = random.Random(f"{seed}:{t}:{k}")
        seen = [r for r in d.train if r.meta.get("template") != k]
        unseen = [r for r in d.train if r.meta.get("template") == k]
        train += rng.sample(seen, min(per_task, len(seen)))
        held += rng.sample(unseen, min(eval_per_task, len(unseen)))
    return train, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", nargs="+", default=["swap_content=0", "swap_content=0.5"],
                        help="encoder recipes: comma lists of encoder.KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--per-task", type=int, default=200, help="training records a task (the demo's 200)")
    parser.add_argument("--eval-per-task", type=int, default=30)
    parser.add_argument("--no-classifier", action="store_true")
    parser.add_argument("--instructions", help="also train each recipe with these selection.instructions")
    parser.add_argument("--per-template", type=int, default=25, help="selection.instructions_per_template")
    args = parser.parse_args()

    import torch

    from chainlora.data import load_demo, read_instructions, selector_instructions
    from chainlora.inference import classifier, encoder
    from chainlora.train import config
    from chainlora.train.config import TrainingSettings
    from chainlora.train.plan import steps_for
    from chainlora.train.selector_models import fit_encoder

    demo = load_demo()
    tasks = list(demo)
    templates = sorted({r.meta.get("template") for d in demo.values() for r in d.train})
    frozen = classifier.FrozenEncoder("minilm")
    dev_path = Path(__file__).parent / "data" / "dev_paraphrases.jsonl"
    dev_texts = read_instructions(dev_path)
    dev_y = torch.tensor([tasks.index(json.loads(line)["task"]) for line in dev_path.read_text().splitlines() if line.strip()])
    phrasings = selector_instructions.read(args.instructions) if args.instructions else None
    recipes = ([] if args.no_classifier else ["classifier"]) + [f"encoder {r}" for r in args.encoder]
    recipes = [r + suffix for r in recipes for suffix in (("", " +instructions") if phrasings else ("",))]

    def fit(recipe: str, texts: list[str], y: list[int], seed: int):
        """The recipe trained on (texts, y); a function from instructions to probabilities."""
        if recipe.startswith("classifier"):
            cfg = config.from_dict({"training": {"seed": seed}})
            head, _ = classifier.train_head(frozen.embed(texts), torch.tensor(y), len(tasks),
                                            epochs=cfg.classifier.epochs, lr=cfg.classifier.learning_rate, seed=seed)
            return lambda xs: torch.softmax(head(frozen.embed(xs)), -1)
        settings = dict(kv.split("=", 1) for kv in recipe.split()[1].split(","))
        cfg = config.from_dict({"training": {"seed": seed}, "encoder": {"enabled": True, "epochs": 1, **settings}})
        e = cfg.encoder
        steps = steps_for(TrainingSettings(max_steps=None, epochs=e.epochs, batch_size=e.batch_size), len(texts))
        with tempfile.TemporaryDirectory() as work:
            model, tok, _ = fit_encoder(texts, y, len(tasks), steps, cfg, Path(work))
        return lambda xs: torch.softmax(encoder.logits(model, tok, xs, e.max_length), -1)

    scores: dict[str, list[float]] = {r: [] for r in recipes}
    dev: dict[str, list[float]] = {r: [] for r in recipes}
    confidence: dict[str, list[float]] = {r: [] for r in recipes}
    seconds: dict[str, float] = {r: 0.0 for r in recipes}
    for seed in args.seeds:
        for k in templates:
            train, held = fold(demo, k, args.per_task, args.eval_per_task, seed)
            yt = torch.tensor([tasks.index(r.task) for r in held])
            extra = []
            if phrasings:
                by_task = {t: [r for r in train if r.task == t] for t in tasks}
                extra = [r for rs in selector_instructions.expand(phrasings, by_task, args.per_template, seed).values()
                         for r in rs]
            for recipe in recipes:
                records = train + (extra if recipe.endswith("+instructions") else [])
                t0 = time.perf_counter()
                predict = fit(recipe, [r.text for r in records], [tasks.index(r.task) for r in records], seed)
                with torch.no_grad():
                    probs, dev_probs = predict([r.text for r in held]), predict(dev_texts)
                seconds[recipe] += time.perf_counter() - t0
                scores[recipe].append(float((probs.argmax(-1) == yt).float().mean()))
                dev[recipe].append(float((dev_probs.argmax(-1) == dev_y).float().mean()))
                confidence[recipe].append(float(probs.max(-1).values.mean()))
                print(f"seed {seed} held-out template {k} {recipe}: top-1 {scores[recipe][-1]:.3f}, "
                      f"dev rewordings {dev[recipe][-1]:.3f}", flush=True)

    n = len(args.seeds) * len(templates)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{args.per_task} training records a task, {args.eval_per_task} held-out records a task; "
          f"{len(templates)} folds x seeds {args.seeds}; {len(dev_texts)} development rewordings")
    print("\n| recipe | top-1 on the held-out template (mean of folds x seeds) | worst fold | "
          "dev rewordings top-1 | mean confidence | s a fit |")
    print("|---|---|---|---|---|---|")
    for r in recipes:
        print(f"| {r} | {statistics.mean(scores[r]):.1%} ± {statistics.stdev(scores[r]) / n ** 0.5:.1%} | "
              f"{min(scores[r]):.1%} | {statistics.mean(dev[r]):.1%} ± {statistics.stdev(dev[r]) / n ** 0.5:.1%} | "
              f"{statistics.mean(confidence[r]):.3f} | {seconds[r] / n:.0f} |")


if __name__ == "__main__":
    main()
