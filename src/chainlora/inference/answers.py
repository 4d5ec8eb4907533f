"""What the engine gives back for an instruction: its Route (which adapter answers, and why)
and its Answer. Plain data, shared by the engine, eval, the CLI and the server."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chainlora.inference.logprobs import TokenLogprob

BASE = "__base__"  # PEFT's adapter name for "no adapter" rows in a mixed batch


@dataclass
class Route:
    """Where an instruction goes: the chosen task, its score, the ranking, and what answers."""

    task: str | None  # the selector's best task (None: no label found)
    probability: float
    top_k: list[tuple[str, float]] = field(default_factory=list)
    fallback: bool = False  # True: `adapter` is the fallback (see `reason`)
    adapter: str = BASE  # the adapter that answers: a task, "mixed" or "__base__"
    selector: str = "score"
    # why it fell back: "no label", "low confidence" or "out of library"; or, not a fallback, "gated":
    # the task is the selector's, but the mixed adapter answers it (chainlora.train.gate)
    reason: str | None = None
    novelty: float | None = None  # similarity to the library's tasks (the out-of-library detector)

    def as_dict(self) -> dict:
        """The route as users see it (`--json`, the server's "chainlora" field): probabilities
        rounded, the base model as adapter null."""
        return {"task": self.task, "probability": round(self.probability, 6),
                "top_k": [[t, round(p, 6)] for t, p in self.top_k], "fallback": self.fallback,
                "adapter": None if self.adapter == BASE else self.adapter, "selector": self.selector,
                "reason": self.reason, "similarity": None if self.novelty is None else round(self.novelty, 4)}


@dataclass
class Answer:
    text: str
    route: Route
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of answer or a stop string) or "length"
    # the generated tokens the answer is made of: through the end token or the token that
    # completed a stop string (both were generated and have a log-probability)
    token_ids: list[int] = field(default_factory=list)
    ended: bool = False  # token_ids ends with an end-of-answer token (not part of the text)
    logprobs: list[TokenLogprob] | None = None  # one per token_ids, when asked (logprobs.Recorder)
    prompt_ids: list[int] | None = None  # the model's input, when its scores were asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt_ids; the first None
