"""Reading an image upload (multipart/form-data, field `image`, optional field `k`) within a byte limit.

The body is streamed into Starlette's multipart parser (file parts spool to a temporary file past 1 MB) through a
counter: a Content-Length over the limit, or a body that turns out longer, is a 413. Before answering 413 the rest of
the body is read and thrown away (up to DRAIN_FACTOR x the limit): a server that closes a connection with unread data
makes the kernel reset it, and the client then never sees the 413 (a client that sent `Expect: 100-continue` gets
the 413 at once and sends no body). Every problem is an `ApiError` (status + JSON
message), never a 500.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.datastructures import UploadFile
from starlette.requests import Request

DRAIN_FACTOR = 4
MAX_FIELD_BYTES = 1024  # a form field other than the image (k) is tiny


class ApiError(Exception):
    """An answer other than 200: HTTP status, a message for people, and an optional machine-readable reason."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason


class _TooLarge(Exception):
    pass


@dataclass(frozen=True)
class Upload:
    data: bytes
    k: str | None  # the raw form field (or query parameter); checked by the caller
    filename: str


async def read_upload(request: Request, limit: int) -> Upload:
    """The uploaded image's bytes and the `k` field; ApiError 400/413/415 for anything else."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise ApiError(415, "send the image as multipart/form-data in a field named 'image'", "bad_content_type")
    declared = request.headers.get("content-length")
    body = _Body(request, limit)
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        if request.headers.get("expect", "").lower() != "100-continue":  # else the client waits and sends nothing
            await body.drain(limit * DRAIN_FACTOR)
        raise _too_large(limit)
    chunks: Any = body.chunks()  # any async iterator of bytes (starlette's type asks for a generator)
    parser = MultiPartParser(request.headers, chunks, max_files=1, max_fields=4, max_part_size=MAX_FIELD_BYTES)
    try:
        form = await parser.parse()
    except _TooLarge:
        await body.drain(limit * DRAIN_FACTOR)
        raise _too_large(limit) from None
    except MultiPartException as exc:
        await body.drain(limit * DRAIN_FACTOR)  # the answer must reach the client: see the module's text
        raise ApiError(400, f"bad multipart body: {exc.message}", "bad_multipart") from None
    try:
        image = form.get("image")
        if not isinstance(image, UploadFile):
            raise ApiError(400, "the form has no file field 'image'", "missing_field")
        data = await image.read()
        k = form.get("k")
        if k is not None and not isinstance(k, str):
            raise ApiError(400, "'k' must be a form field, not a file", "bad_k")
        return Upload(data, k if k is not None else request.query_params.get("k"), image.filename or "")
    finally:
        await form.close()


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the upload is larger than --max-upload-mb ({limit / (1 << 20):g} MB)", "too_large_upload")


class _Body:
    """The request body as an async stream of chunks that stops past `limit` bytes; `done` once it was all read."""

    def __init__(self, request: Request, limit: int) -> None:
        self.request, self.limit = request, limit
        self.done = False

    async def chunks(self) -> AsyncIterator[bytes]:
        from starlette.requests import ClientDisconnect

        total = 0
        while not self.done:
            message = await self.request.receive()
            if message["type"] != "http.request":
                raise ClientDisconnect()
            body = message.get("body", b"")
            self.done = not message.get("more_body", False)
            total += len(body)
            if total > self.limit:
                raise _TooLarge()
            if body:
                yield body

    async def drain(self, budget: int) -> None:
        """Read and discard what is left, at most `budget` bytes (past that the connection closes anyway)."""
        seen = 0
        while not self.done and seen <= budget:
            message = await self.request.receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
