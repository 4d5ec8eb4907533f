"""/openapi.json that documents what the server really takes and answers.

The completion routes read their body themselves (off the event loop, see prepare.py), so
FastAPI cannot see its model; `documented.body` puts the pydantic schema back, and
`documented(*codes)` lists the error responses with their OpenAI shape. Fuzzers and client
generators read this schema.
"""

from __future__ import annotations

from typing import Any

from chainlora.serve.errors import CODES
from chainlora.serve.schema import ChatBody, CompletionBody, ErrorBody

MODELS = (ChatBody, CompletionBody, ErrorBody)
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


def install_openapi(app: Any) -> None:
    """Add the request-body models (and their sub-models) to the app's components."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in MODELS:
                js = model.model_json_schema(ref_template=REF)
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
