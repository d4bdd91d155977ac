"""OpenAI-shaped errors: every failure a client sees is `{"error": {message, type, param, code}}`.

Handlers raise ``ApiError``; the middleware in ``gateway.app`` turns it (and aiohttp's own HTTP
exceptions, and anything unexpected) into one of these bodies, so a client never sees a traceback.
"""

from __future__ import annotations

import orjson
from aiohttp import web

# OpenAI's `type` strings by status; `code` carries our finer reason.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    501: "not_implemented_error",
    502: "upstream_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """A request failed in a way the client should be told about, with the field at fault if any."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "upstream_error" if self.status >= 500 else "invalid_request_error")

    def detail(self) -> dict[str, object]:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def body(self) -> dict[str, object]:
        return {"error": self.detail()}

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.body())

    def response(self) -> web.Response:
        return web.Response(
            status=self.status, body=self.to_bytes(), content_type="application/json", headers=self.headers
        )


def invalid(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    """400 naming the field at fault."""
    return ApiError(400, message, param=param, code=code)


def sse_error_event(err: ApiError) -> bytes:
    """An error inside an already-started SSE stream (the status line has gone out already)."""
    return b"data: " + orjson.dumps({"error": {**err.detail(), "status": err.status}}) + b"\n\n"
