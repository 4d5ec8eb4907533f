"""/openapi.json that documents what the server really takes and answers.

The completion routes read their body themselves (off the event loop, see prepare.py), so
FastAPI cannot see its model; `documented.body` puts the pydantic schema back, and
`documented(*codes)` lists the error responses with their OpenAI shape. Fuzzers and client
generators read this schema.
"""

from __future__ import annotations

import functools
from typing import Any

from chainlora.serve.errors import CODES
from chainlora.serve.schema import BACKEND_ONLY, NEUTRAL, ChatBody, CompletionBody, ErrorBody, Message

MODELS = (ChatBody, CompletionBody, ErrorBody, Message)
REF = "#/components/schemas/{model}"


class _Documented:
    def __call__(self, *codes: int, streams: bool = False) -> dict[int | str, Any]:
        """Error responses for a route, each with the error shape; `streams`: its 200 is JSON, or
        server-sent events when the body asks `stream: true`."""
        out: dict[int | str, Any] = {code: {"model": ErrorBody, "description": CODES.get(code, "error").replace("_", " ")}
                                     for code in codes}
        if streams:
            out[200] = {"description": "the completion; with `stream: true`, server-sent events (chunks, then "
                                       "`data: [DONE]`)",
                        "content": {"application/json": {}, "text/event-stream": {}}}
        return out

    @staticmethod
    def body(model: type) -> dict:
        """openapi_extra: the route's JSON request body is `model`."""
        return {"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}}}


documented = _Documented()


def openapi_schema(app: Any) -> dict:
    """The app's OpenAPI schema with the request-body models (and their sub-models) added; `model`
    lists the served models (any other name is a documented 404), and a field chainlora does not
    implement is documented as what it accepts: its neutral values (schema.NEUTRAL). Built per
    call: a reload changes the models."""
    from fastapi.openapi.utils import get_openapi

    server = app.state.server
    out = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = out.setdefault("components", {}).setdefault("schemas", {})
    for model in MODELS:
        components.update(_component(model, components, server.models(), server.forwarder is not None))
    components["ContentPart"]["properties"].update(type={"enum": ["text"]}, text={"type": "string"})
    components["ContentPart"]["required"] = ["type", "text"]  # what is answered (others: a 400)
    return out


def _component(model: type, components: dict, models: list[str], forwarding: bool) -> dict:
    """{name: JSON schema} for `model`, its sub-models put in `components`."""
    js = model.model_json_schema(ref_template=REF)
    components.update(js.pop("$defs", {}))
    for name, values in NEUTRAL.items():
        if name in js.get("properties", {}) and not (forwarding and name in BACKEND_ONLY):
            js["properties"][name] = {"anyOf": [{"enum": list(values)}, {"type": "null"}],
                                      "description": "not supported: only these values"}
    if "model" in js.get("properties", {}):
        js["properties"]["model"] = {"anyOf": [{"enum": models}, js["properties"]["model"]],
                                     "title": "Model", "description": "chain, mixed or a task adapter"}
    return {model.__name__: js}


def install_openapi(app: Any) -> None:
    """Serve `openapi_schema(app)` at /openapi.json (FastAPI's documented way: replace `app.openapi`)."""
    app.openapi = functools.partial(openapi_schema, app)
