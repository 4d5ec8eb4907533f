"""Token budgets: what one request may make the model do, counted in tokens (vLLM's
`max_model_len` / `max_num_batched_tokens` and a `max_tokens` ceiling).

Characters (limits.py) bound the work before tokenizing; tokens bound the model's work. A
prompt's tokens are capped by `--max-prompt-tokens` (default: the model's context) and by
`--max-batch-tokens`, because the scheduler never puts more prompt tokens than that into one
batch, so a longer prompt could never run; `max_tokens` is capped by `--max-tokens` (and, with
the prompt, by the context: the engine's own check). Each refusal is a 400 naming its option.
The scheduler packs batches by the same budget (scheduler.py) and prefills in chunks of
`--prefill-chunk` positions, checking deadlines and disconnects between chunks.
"""

from __future__ import annotations

from chainlora.serve.errors import ApiError
from chainlora.serve.settings import ServeSettings


def prompt_limit(settings: ServeSettings, context: int) -> tuple[int, str]:
    """The most prompt tokens one request may send, and what sets it (an option, or the context)."""
    options = [(settings.max_prompt_tokens or context, "--max-prompt-tokens"),
               (settings.max_batch_tokens, "--max-batch-tokens")]
    return min(options, key=lambda o: o[0])  # on a tie, the per-request option names it


def check_prompt(n: int, settings: ServeSettings, context: int, field: str) -> None:
    """A 400 naming the option, for a prompt of `n` tokens over the per-request limit."""
    limit, option = prompt_limit(settings, context)
    if n > limit:
        source = " (the model's context)" if settings.max_prompt_tokens is None and limit == context else ""
        raise ApiError(400, f"{field}: {n} prompt tokens exceed the server's limit of {limit}{source} "
                            f"(chainlora serve {option})", param=field, code="context_length_exceeded")


def max_tokens(requested: int | None, param: str, settings: ServeSettings) -> int:
    """The request's max_tokens: what it asked for (a 400 naming `--max-tokens` over the
    ceiling), or the server's default, never over the ceiling."""
    if requested is None:
        return min(settings.default_max_tokens, settings.max_tokens)
    if requested > settings.max_tokens:
        raise ApiError(400, f"{param}: {requested} exceeds the server's limit of {settings.max_tokens} "
                            "(chainlora serve --max-tokens)", param=param, code="integer_above_max_value")
    return requested
