"""Stage `demo`: `chainlora demo`, the main job on the bundled default model and data.

    pipeline.py   train (configs/demo.yaml), evaluate, answer, report; the printed tables
    config.yaml   the packaged demo config
    train.jsonl.gz, test.jsonl.gz, SOURCES.md
                  the bundled ten-task data (read by chainlora.data.load_demo through
                  importlib.resources; built by scripts/build_demo_data.py)

May import: every stage but cli.
"""


def __getattr__(name: str):
    """`from chainlora.demo import run, demo_config`, loading the training stack only when used."""
    if name in ("run", "demo_config"):
        from chainlora.demo import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["demo_config", "run"]
