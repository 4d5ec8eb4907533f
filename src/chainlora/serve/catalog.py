"""The model names a client may send: `chain` (route with the library's selector), `mixed` (the
mixed adapter, where the library has one), every task adapter by name, and `base` (the base
model with no adapter: the baseline every adapter is measured against; a task of an older
library named `base` keeps the name, and the base model is not served then).

Read from the engine on every call, so a reload (`POST /v1/adapters/reload`) changes them.
Both the routes (`/v1/models`) and the preparer (which adapter a body pins) ask here.
"""

from __future__ import annotations

from chainlora.inference import selectors
from chainlora.inference.answers import BASE
from chainlora.inference.engine import Engine
from chainlora.serve.errors import ApiError

CHAIN, MIXED, BASE_MODEL = "chain", "mixed", "base"


def names(engine: Engine) -> list[str]:
    """Every model the server answers, `chain` first and `base` last."""
    lib = engine.lib
    tasks = lib.task_names
    return [CHAIN] + ([MIXED] if lib.mixed else []) + tasks + ([BASE_MODEL] if BASE_MODEL not in tasks else [])


def pin(engine: Engine, model: str) -> str | None:
    """The adapter a `model` names (None: route), or a 404 naming the models there are."""
    if model == CHAIN:
        if len(engine.tasks) != 1 and engine.selector not in selectors.available(engine.lib):
            raise ApiError(404, f"model 'chain' needs a task selector; this library has none "
                                f"(use one of: {', '.join(names(engine)[1:])})", param="model",
                           code="model_not_found")
        return None
    served = names(engine)
    if model == BASE_MODEL and BASE_MODEL not in engine.tasks:
        return BASE
    if model in served:
        return model
    raise ApiError(404, f"The model '{model[:100]}' does not exist (models: {', '.join(served)})",
                   param="model", code="model_not_found")
