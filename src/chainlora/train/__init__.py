"""Stage `train`: building a library from a config.

    config.py    the YAML training config, checked on load
    plan.py      which adapters, on which examples, for how many steps (Job)
    run.py       `chainlora train` / `finetune`: train_library, one Trainer run per adapter
    cola.py      COLA, the residual chain, as a Trainer callback
    progress.py  the run's progress bars and summary
    changes.py   per-adapter fingerprints: the keep / train / retrain / remove plan
    staging.py   the library is rebuilt beside the old one and swapped in whole
    selection.py the default selector, its threshold and the out-of-library detector, measured
    gate.py      chain.gate: which tasks the mixed adapter answers better, measured

May import: core, data, library, inference, discover (tasks: auto).
"""


def __getattr__(name: str):
    """`from chainlora.train import train_library`, without loading transformers for `train.config`."""
    if name == "train_library":
        from chainlora.train.recipe import train_library

        return train_library
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["train_library"]
