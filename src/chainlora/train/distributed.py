"""Several training processes (accelerate launch / torchrun): only the main one writes."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from chainlora.errors import ChainloraError

T = TypeVar("T")


def on_main(state: Any, fn: Callable[[], T]) -> T | None:
    """Run `fn` on the main process only, the others waiting; every process gets its result
    (so they all take the same branch after it). An error there reaches every process (one
    message; ChainloraError stays a user error), so none waits forever for a main process that
    gave up."""
    error, result = None, None
    if state.is_main_process:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001  (re-raised below, after telling the others)
            error = e
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = [None if error is None else (isinstance(error, ChainloraError), str(error)),
                   result if error is None else None]
        broadcast_object_list(message, from_process=0)
        if message[0] is not None and not state.is_main_process:
            user, text = message[0]
            raise ChainloraError(text) if user else RuntimeError(f"the main process failed: {text}")
        result = message[1]
    if error is not None:
        raise error
    return result
