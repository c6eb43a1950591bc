"""One log line per HTTP request of `featshard serve` (logger `featshard.serve.access`)."""
from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

access = logging.getLogger("featshard.serve.access")


class AccessLog:
    """Pure ASGI middleware: one line per HTTP request, `METHOD PATH STATUS MS` (path as sent, still %-encoded)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.monotonic(), [0]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("raw_path") or scope["path"].encode()
            query = f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else ""
            client = scope.get("client") or ("-", 0)
            access.info("%s %s %s%s %d %.1f ms", client[0], scope["method"], path.decode("latin-1"), query[:200],
                        status[0], (time.monotonic() - started) * 1000)
