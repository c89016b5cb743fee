"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every failure.

OpenAI's client libraries read that shape to build their exceptions, so every path that can fail
(a bad field, an unknown route, a crash) answers with it. Invalid bodies are 400, never FastAPI's
422: OpenAI's own API answers 400, and clients map 400 to BadRequestError.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger("wren.serve")

# The `type` OpenAI gives each status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """A request the server refuses or cannot finish, with the HTTP status to answer."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def payload(self) -> dict[str, Any]:
        return error_payload(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        # The OpenAI client waits `Retry-After` seconds before retrying a 429.
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(self.payload(), status_code=self.status, headers=headers)


def error_payload(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    # A message may quote the client's input, lone surrogates included: keep it encodable.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error(exc: RequestValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field."""
    problems = exc.errors()
    if not problems:
        return APIError(400, "invalid request body")
    # The deepest problem is the most specific: for `str | list[part]`, a bad part beats "not a string".
    first = max(problems, key=lambda problem: len(problem.get("loc", ())))
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    # loc is ("body", "messages", 0, "role"); union branches add their type names, which only
    # confuse a reader ("messages.0.content.str").
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(part for part in location if _is_field_or_index(part)) or None
    message = first.get("msg", "invalid value")
    if param is None and first.get("type") in ("missing", "model_attributes_type"):
        message = "the request body must be a JSON object, sent with Content-Type: application/json"
    elif first.get("type") == "missing":
        message = "field required"
    elif "input" in first and first.get("type") != "model_attributes_type":
        message += f", got {_short(first['input'])}"
    if param:
        message = f"{param}: {message}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem{'s' * (len(problems) > 2)})"
    return APIError(400, message, param=param)


def _is_field_or_index(part: str) -> bool:
    # Field names are lower-case identifiers; pydantic's union branches are type names
    # ("str", "list[str]", "ContentPart").
    if part.isdigit():
        return True
    return part.isidentifier() and part[0].islower() and part not in {"str", "int", "float", "bool"}


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        logger.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _api_error(request, validation_error(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Unknown routes (404) and wrong methods (405) keep their status.
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        response = JSONResponse(error_payload(exc.status_code, message), status_code=exc.status_code)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_payload(500, f"internal error: {type(exc).__name__}"), status_code=500)
