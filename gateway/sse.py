"""Server-sent events: reading a worker's stream, writing the client's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson

from gateway.upstream_http import UpstreamResponse

DONE = b"data: [DONE]\n\n"


class StreamTruncated(Exception):
    """The worker's stream ended (EOF) without a final event."""


async def sse_payloads(resp: UpstreamResponse) -> AsyncIterator[bytes]:
    """The payload of each `data:` line, up to a line-anchored `data: [DONE]` or EOF."""
    while True:
        line = await resp.readline()
        if not line:
            return
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return
            if payload:
                yield payload


def event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"
