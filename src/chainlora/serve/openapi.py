"""/openapi.json that documents what the server really takes and answers.

The completion routes read their body themselves (off the event loop, see prepare.py), so
FastAPI cannot see its model; `documented.body` puts the pydantic schema back, and
`documented(*codes)` lists the error responses with their OpenAI shape. Fuzzers and client
generators read this schema.
"""

from __future__ import annotations

from typing import Any, Callable

from chainlora.serve.errors import CODES
from chainlora.serve.schema import BACKEND_ONLY, NEUTRAL, ChatBody, CompletionBody, ErrorBody, Message

MODELS = (ChatBody, CompletionBody, ErrorBody, Message)
REF = "#/components/schemas/{model}"


class _Documented:
    def __call__(self, *codes: int) -> dict[int | str, Any]:
        """Error responses for a route, each with the error shape."""
        return {code: {"model": ErrorBody, "description": CODES.get(code, "error").replace("_", " ")}
                for code in codes}

    @staticmethod
    def body(model: type) -> dict:
        """openapi_extra: the route's JSON request body is `model`."""
        return {"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}}}


documented = _Documented()


def install_openapi(app: Any, models: Callable[[], list[str]], forwarding: bool = False) -> None:
    """Add the request-body models (and their sub-models) to the app's components; `model`
    lists the served models (any other name is a documented 404), and a field chainlora does
    not implement is documented as what it accepts: its neutral values (schema.NEUTRAL)."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in MODELS:
            js = model.model_json_schema(ref_template=REF)
            components.update(js.pop("$defs", {}))
            for name, values in NEUTRAL.items():
                if name in js.get("properties", {}) and not (forwarding and name in BACKEND_ONLY):
                    js["properties"][name] = {"anyOf": [{"enum": list(values)}, {"type": "null"}],
                                              "description": "not supported: only these values"}
            if "model" in js.get("properties", {}):
                js["properties"]["model"] = {"anyOf": [{"enum": models()}, js["properties"]["model"]],
                                             "title": "Model", "description": "chain, mixed or a task adapter"}
            components[model.__name__] = js
        components["ContentPart"]["properties"].update(type={"enum": ["text"]}, text={"type": "string"})
        components["ContentPart"]["required"] = ["type", "text"]  # what is answered (others: a 400)
        return schema  # built per call: a reload changes the models

    app.openapi = openapi
