"""The API key check: `Authorization: Bearer KEY`, as OpenAI clients send it.

It runs as ASGI middleware, before the body is read or validated, so a request without the key
learns nothing about the API (not even whether its body was valid). Every route that runs or
describes the model is guarded: `/v1/*`, MiniMind's `POST /` and `/tokenize`. Health checks,
metrics and the OpenAPI schema stay open for monitoring.
"""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from wren.serve.errors import error_payload

OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


class ApiKeyCheck:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorised(scope):
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            error_payload(401, "missing or incorrect API key: send 'Authorization: Bearer KEY'",
                          code="invalid_api_key"),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip
        await response(scope, receive, send)

    def _authorised(self, scope: Scope) -> bool:
        sent = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(sent) != 1:
            return False
        scheme, _, token = sent[0].strip().partition(b" ")
        # Constant-time comparison: the time taken says nothing about how much of a guess was right.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)
