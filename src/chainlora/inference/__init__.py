"""Stage `inference`: answering with a library.

    engine.py         `Engine`: one base model, route each instruction, answer a batch in ONE generate
    adapter_cache.py  which adapters are resident: an LRU over a CPU and a device tier
    adapter_pool.py   every resident LoRA in preallocated slots: one batched matmul a layer
    adapter_file.py   an adapter's safetensors read for a cold load (views, straight into the slots)
    router.py         the `score` and `generate` selectors over the task-selection LoRA
    classifier.py     the `classifier` selector: a frozen encoder and a linear head (and its training step)
    stops.py          where an answer ends (end-of-answer tokens, stop strings), for engine and streamer
    scoring.py        answer perplexity under an adapter (Table I, the train-time gate)

A new selector goes here (a module with its rank function, registered in chainlora.library.kinds).
May import: core, data, library.
"""

from chainlora.inference.engine import BASE, Answer, Engine, Route

__all__ = ["BASE", "Answer", "Engine", "Route"]
