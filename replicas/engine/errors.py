"""OpenAI-style errors: every bad request gets a JSON body naming the field at fault, never a traceback."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web


class ApiError(Exception):
    """A request that cannot be served; ``status`` is the HTTP status, ``param`` the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param, "invalid_request_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """``{"error": {message, type, param, code}}``: what OpenAI clients and SGLang's router both parse."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    return {"error": {"message": message, "type": reason, "param": param, "code": code or status}}


def error_response(err: ApiError) -> web.Response:
    return web.Response(status=err.status, body=orjson.dumps(err.body()), content_type="application/json")


def sse_error_event(err: ApiError) -> bytes:
    """An error inside an already-started stream, as SGLang sends it before ``data: [DONE]``."""
    payload = {"error": {"message": err.message, "status": err.status, "param": err.param}}
    return b"data: " + orjson.dumps(payload) + b"\n\n"
