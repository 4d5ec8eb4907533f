"""Stage `inference`: answering with a library.

    engine.py         `Chain`: one base model, route each instruction, answer a batch in ONE generate
    adapter_cache.py  which adapters are resident: an LRU over a CPU and a device tier
    router.py         the `score` and `generate` selectors over the task-selection LoRA
    classifier.py     the `classifier` selector: a frozen encoder and a linear head (and its training step)

A new selector goes here (router.py or a module beside it, named in router.SELECTORS).
May import: core, data, library.
"""

from chainlora.inference.engine import BASE, Answer, Chain, Route

__all__ = ["BASE", "Answer", "Chain", "Route"]
