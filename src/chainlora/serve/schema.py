"""The OpenAI wire format as chainlora's server reads it: request bodies (checked by pydantic) and
the error shape (responses.py builds what it answers).

Every field OpenAI's chat and completions APIs define is known here. A field chainlora does
not implement is accepted only at its neutral value (`tools: []`, `best_of: 1`, `suffix: ""`,
...); any other value is a 400 naming the field, never a 200 that silently ignored it.
`logprobs` (both APIs), `top_logprobs` (chat) and `echo` (completions) are answered
(logprob_fields.py shapes them). Fields nobody defined are a 400 too (`extra="forbid"`), so a typo cannot pass unseen.
Sampling fields only an OpenAI-compatible backend implements (penalties, logit_bias, vLLM's
top_k / min_p / repetition_penalty) are validated here and sent on by `--backend openai`.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from chainlora.serve.errors import ApiError  # also importable from here, as before


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error response's body (documented in /openapi.json)."""

    error: ErrorDetail


# --------------------------------------------------------------------------- request bodies

STRICT = ConfigDict(extra="forbid")
Text = Field(default=None, max_length=256)


class ContentPart(BaseModel):
    """A chat content part; only `text` parts are answered (image/audio parts are a 400). Keys
    OpenAI defines for other part types are known (and refused by type below); any other key
    is a 400 naming it (`Message.known_part_keys`), as unknown fields are everywhere."""

    model_config = STRICT
    type: str = Field(max_length=64)
    text: str | None = None
    image_url: Any = None  # OpenAI's other part types: refused by type in refuse_unsupported
    input_audio: Any = None
    file: Any = None
    refusal: Any = None


PART_KEYS = frozenset(ContentPart.model_fields)


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = Text
    tool_calls: list[dict[str, Any]] | None = None  # only empty: chainlora has no tools
    tool_call_id: str | None = Text
    refusal: str | None = None
    # what an OpenAI client sends back when a reply's message is appended to the conversation
    function_call: dict[str, Any] | None = None  # only null
    audio: dict[str, Any] | None = None  # only null
    annotations: list[dict[str, Any]] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def known_part_keys(cls, content: Any) -> Any:
        """Name an unknown key of a content part (a union's own error would only say that the
        content is neither a string nor a list of parts)."""
        for j, part in enumerate(content if isinstance(content, list) else []):
            unknown = sorted(k for k in part if k not in PART_KEYS) if isinstance(part, dict) else []
            if unknown:
                raise ValueError(f"content[{j}]: unknown key {str(unknown[0])[:64]!r} (a content part has "
                                 f"{', '.join(sorted(PART_KEYS))})")
        return content

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's; no obfuscation padding is ever sent
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the token counts so far


class Sampling(BaseModel):
    model_config = STRICT
    model: str = Field(max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None  # count and length checked against the server's limits
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    user: str | None = Text
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    store: bool | None = None
    service_tier: str | None = Text
    # answered only by an OpenAI-compatible backend (--backend openai): neutral values locally
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=300)
    top_k: int | None = Field(default=None, ge=-1, le=1_000_000)  # vLLM's extension
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    ignore_eos: bool = False  # vLLM's and llama-server's: run to max_tokens (load benchmarks' fixed lengths)
    min_tokens: int | None = Field(default=None, ge=0, le=1_000_000)  # vLLM's: no end token before this many

    def stops(self) -> tuple[str, ...]:
        items = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in items if s)


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Union[str, dict[str, Any], None] = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = Text
    web_search_options: dict[str, Any] | None = None
    verbosity: str | None = Text


class CompletionBody(Sampling):
    # OpenAI's four shapes: text, [text], token ids, [token ids]; each prompt is its own choice
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(default=None, ge=0, le=1_000_000)  # 0: only with echo (score the prompt)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = None
    best_of: int | None = Field(default=None, ge=1, le=20)
    suffix: str | None = None


# A field is at its neutral value when it is absent, null, or one of these (it changes nothing).
NEUTRAL: dict[str, tuple] = {
    "tools": ([],), "functions": ([],),
    "tool_choice": ("none", "auto"), "function_call": ("none", "auto"), "parallel_tool_calls": (True, False),
    "response_format": ({"type": "text"},), "modalities": (["text"],), "best_of": (1,),
    "suffix": ("",), "presence_penalty": (0.0,), "frequency_penalty": (0.0,), "logit_bias": ({},),
    "top_k": (-1, 0), "min_p": (0.0,), "repetition_penalty": (1.0,), "tool_calls": ([],),
}
BACKEND_ONLY = ("presence_penalty", "frequency_penalty", "logit_bias", "top_k", "min_p", "repetition_penalty")


def refuse_unsupported(body: Sampling, *, forwarding: bool) -> None:
    """A 400 naming the first field set to something chainlora would otherwise ignore."""
    for name in (n for n in NEUTRAL if n in body.model_fields_set):  # in a fixed order
        value = getattr(body, name)
        if value is None or value in NEUTRAL[name] or (forwarding and name in BACKEND_ONLY):
            continue
        where = "; --backend openai forwards it to a server that does" if name in BACKEND_ONLY else ""
        raise ApiError(400, f"{name}: not supported by chainlora's engine (send it unset or "
                            f"{NEUTRAL[name][0]!r}){where}", param=name, code="unsupported_parameter")
    for i, m in enumerate(getattr(body, "messages", None) or []):
        for name in ("tool_calls", "function_call", "audio"):
            if getattr(m, name):
                raise ApiError(400, f"messages[{i}].{name}: not supported (send it empty or null)",
                               param=f"messages[{i}].{name}", code="unsupported_parameter")
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            if part.type != "text" or not isinstance(part.text, str):
                param = f"messages[{i}].content[{j}]"
                raise ApiError(400, f"{param}: only text parts ({{'type': 'text', 'text': '...'}}) are "
                                    f"supported, not {part.type!r}", param=param, code="unsupported_parameter")
