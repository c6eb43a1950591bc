"""The Starlette app of `featshard serve`: JSON API, stored images and thumbnails, and the gallery page.

Routes: `/healthz`, `/api/info`, `POST /api/search`, `/api/neighbors/<id>`, `/api/dedup`, `/image/<id>`, `/thumb/<id>`,
and `/`, `/app.js`, `/style.css` (files of
featshard/tools/serve/static read once at start, no static-folder lookup).
`<id>` is an index id: the row number for the served run's own images (runs added with `featshard add` are offset,
see /api/info `runs`). It must be plain decimal digits naming a stored image; anything else is a JSON 404, and the
file served is the path the run's input list gives that row, so no part of a request becomes a path.
Every error is JSON `{"error": message, "reason": ...}`; one log line per request (method, path, status, ms).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import mimetypes
import os
import re
import stat
import time
from importlib import resources
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from featshard.extract.decode import ImageFailure
from featshard.tools.serve.accesslog import AccessLog
from featshard.tools.serve.batcher import Batcher, Overloaded
from featshard.tools.serve.state import Query, ServeState
from featshard.tools.serve.thumbs import ThumbCache, make_thumbnail
from featshard.tools.serve.uploads import ApiError, read_upload
from featshard.store.inputs import read_item_bytes
from featshard.store.webdataset import TarMember

log = logging.getLogger("featshard.serve")
_ID = re.compile(r"[0-9]{1,18}")
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                "base-uri 'none'; frame-ancestors 'none'", "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache"}
PER_PAGE = 20


def error(status: int, message: str, reason: str = "", headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": message, "status": status, **({"reason": reason} if reason else {})}
    return JSONResponse(body, status_code=status, headers=headers)


class Server:
    """The state shared by the handlers: the loaded run, the batcher and the worker pools."""

    def __init__(self, state: ServeState) -> None:
        self.state, self.options = state, state.options
        self.batcher: Batcher[Query, list[dict[str, Any]] | ImageFailure] | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 2), "featshard-io")
        self.dedup_pool = concurrent.futures.ThreadPoolExecutor(1, "featshard-dedup")
        self.thumbs = ThumbCache(self.options.thumb_cache_mb << 20)
        self.in_flight = 0  # admitted /api/search requests (body, decode, queue, model)
        self.static = {route: (resources.files("featshard.tools.serve").joinpath("static", name).read_bytes(), ctype)
                       for route, (name, ctype) in STATIC.items()}

    async def run(self, pool: concurrent.futures.Executor, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on a worker thread, answered 504 past --timeout (the thread finishes; its result is dropped)."""
        job = asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        try:
            return await asyncio.wait_for(job, self.options.timeout)
        except asyncio.TimeoutError:
            raise ApiError(504, f"no answer within --timeout {self.options.timeout:g} s", "timeout") from None

    def require_ready(self) -> None:
        if not self.state.ready:
            raise ApiError(503, self.state.error or "loading the model and the index", "not_ready")

    def parse_k(self, text: str | None) -> int:
        if text is None or text == "":
            return self.state.clamp_k(self.options.k)
        if not re.fullmatch(r"[0-9]{1,18}", text.strip()) or int(text) < 1:
            raise ApiError(400, f"k must be a positive integer, got {text[:40]!r}", "bad_k")
        return self.state.clamp_k(int(text))

    def stored(self, text: str) -> tuple[int, str | TarMember]:
        """(id, path) of a stored image named by decimal digits; ApiError 404 for anything else."""
        found = self.state.files.locate(int(text)) if _ID.fullmatch(text) else None
        if found is None:
            raise ApiError(404, "no stored image has this id", "unknown_id")
        run, row = found
        path = run.path(row)
        if path is None:
            raise ApiError(404, f"the images of run {run.name} are not available: {run.unavailable}", "no_images")
        return int(text), path


async def healthz(request: Request) -> Response:
    state = request.app.state.server.state
    if state.ready:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "error" if state.error else "loading", **({"error": state.error} if state.error
                                                                               else {})}, status_code=503)


async def info(request: Request) -> Response:
    srv: Server = request.app.state.server
    srv.require_ready()
    out = srv.state.info()
    out.update({"k": srv.state.clamp_k(srv.options.k), "max_k": srv.state.clamp_k(10 ** 9),
                "max_upload_mb": srv.options.max_upload_mb, "max_batch": srv.options.max_batch,
                "batching": srv.batcher.stats.to_dict() if srv.batcher else {}, "thumbs": srv.thumbs.stats()})
    return JSONResponse(out)


async def search(request: Request) -> Response:
    srv: Server = request.app.state.server
    srv.require_ready()
    if srv.in_flight >= srv.options.max_queue:
        raise ApiError(503, f"{srv.in_flight} searches are in progress; retry shortly", "overloaded")
    srv.in_flight += 1
    started = time.monotonic()
    try:
        results = await asyncio.wait_for(_search(srv, request), srv.options.timeout)
    except asyncio.TimeoutError:
        raise ApiError(504, f"no answer within --timeout {srv.options.timeout:g} s", "timeout") from None
    finally:
        srv.in_flight -= 1
    return JSONResponse({"results": results, "took_ms": round((time.monotonic() - started) * 1000, 2)})


async def _search(srv: Server, request: Request) -> list[dict[str, Any]]:
    upload = await read_upload(request, int(srv.options.max_upload_mb * (1 << 20)))
    k = srv.parse_k(upload.k)
    assert srv.batcher is not None
    try:
        sample = await srv.run(srv.pool, srv.state.decode, upload.data)
        found = await srv.batcher.submit(Query(sample, k), srv.options.timeout)
    except ImageFailure as exc:
        raise ApiError(400, f"the upload is not a usable image: {exc.message}", exc.reason) from None
    except Overloaded as exc:
        raise ApiError(503, str(exc), "overloaded") from None
    if isinstance(found, ImageFailure):
        raise ApiError(400, f"the upload is not a usable image: {found.message}", found.reason)
    return found


async def neighbors(request: Request) -> Response:
    srv: Server = request.app.state.server
    srv.require_ready()
    ident, _ = srv.stored(request.path_params["ident"])
    k = srv.parse_k(request.query_params.get("k"))
    started = time.monotonic()
    out = await srv.run(srv.pool, srv.state.neighbors, ident, k)
    if out is None:
        raise ApiError(404, "no stored image has this id", "unknown_id")
    return JSONResponse({**out, "took_ms": round((time.monotonic() - started) * 1000, 2)})


async def dedup(request: Request) -> Response:
    srv: Server = request.app.state.server
    srv.require_ready()
    metric = srv.state.index.meta.get("metric", "ip")
    threshold = _number(request.query_params.get("threshold"), "threshold", 0.9 if metric == "ip" else 0.2)
    page = int(_number(request.query_params.get("page"), "page", 0, integer=True))
    fut = asyncio.get_running_loop().run_in_executor(srv.dedup_pool, srv.state.dedup_groups, threshold)
    try:
        groups = await asyncio.wait_for(asyncio.shield(fut), srv.options.timeout)
    except asyncio.TimeoutError:
        raise ApiError(503, "still finding duplicate groups (the result is kept): retry shortly", "computing",
                       ) from None
    pages = max(1, -(-len(groups) // PER_PAGE))
    return JSONResponse({"threshold": threshold, "metric": metric, "total": len(groups), "page": page,
                         "pages": pages, "per_page": PER_PAGE, "groups": groups[page * PER_PAGE:(page + 1) * PER_PAGE]})


def _number(text: str | None, name: str, default: float, integer: bool = False) -> float:
    if text is None or text.strip() == "":
        return default
    pattern = r"[0-9]{1,9}" if integer else r"-?[0-9]{1,9}(\.[0-9]{1,9})?"
    if not re.fullmatch(pattern, text.strip()):
        kind = "a non-negative integer" if integer else "a number"
        raise ApiError(400, f"{name} must be {kind}, got {text[:40]!r}", f"bad_{name}")
    return float(text)


async def image(request: Request) -> Response:
    srv: Server = request.app.state.server
    srv.require_ready()
    _, path = srv.stored(request.path_params["ident"])
    if isinstance(path, TarMember):  # an image inside a WebDataset tar: its bytes, read by offset
        return await _member_image(srv, path)
    try:
        st = os.stat(path)
    except OSError:
        raise ApiError(404, "the stored image file is gone", "missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise ApiError(404, "the stored image is not a regular file", "not_regular_file")
    ctype = mimetypes.guess_type(path)[0] or ""
    return FileResponse(path, stat_result=st, media_type=ctype if ctype.startswith("image/") else
                        "application/octet-stream", headers={"X-Content-Type-Options": "nosniff"})


_SIGNATURES = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF8", "image/gif"),
               (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))


async def _member_image(srv: Server, member: TarMember) -> Response:
    try:
        data = await srv.run(srv.pool, read_item_bytes, member)
    except OSError as exc:
        raise ApiError(404, f"the stored image cannot be read from its tar: {exc}", "missing") from None
    ctype = next((t for sig, t in _SIGNATURES if data.startswith(sig)), "")
    if not ctype and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        ctype = "image/webp"
    return Response(data, media_type=ctype or "application/octet-stream",
                    headers={"X-Content-Type-Options": "nosniff"})


async def thumb(request: Request) -> Response:
    from featshard.extract.decode import ImageFailure

    srv: Server = request.app.state.server
    srv.require_ready()
    ident, path = srv.stored(request.path_params["ident"])
    data = srv.thumbs.get(ident)
    if data is None:
        try:
            data = await srv.run(srv.pool, make_thumbnail, path, srv.state.prep.max_pixels)
        except ImageFailure as exc:
            status = 404 if exc.reason in ("missing", "permission", "is_directory", "not_regular_file") else 422
            raise ApiError(status, f"no thumbnail: {exc.message}", exc.reason) from None
        srv.thumbs.put(ident, data)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


async def static(request: Request) -> Response:
    body, ctype = request.app.state.server.static[request.url.path]
    return Response(body, media_type=ctype, headers=PAGE_HEADERS)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error(exc.status, exc.message, exc.reason, {"Retry-After": "1"} if exc.status == 503 else None)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    text = {404: "no such page", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
    return error(exc.status_code, text, headers=dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return error(500, "internal error (logged by the server)", "internal")


def create_app(state: ServeState) -> Starlette:
    """The ASGI app; model and index load in a background thread when it starts (/healthz says 503 until then)."""
    srv = Server(state)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        opts = state.options
        srv.batcher = Batcher(state.search_batch, opts.max_batch, opts.max_wait_ms / 1000, opts.max_queue)
        srv.batcher.start()
        loader = asyncio.get_running_loop().run_in_executor(srv.dedup_pool, state.load)
        yield
        loader.cancel()
        await srv.batcher.stop()
        srv.pool.shutdown(wait=False, cancel_futures=True)
        srv.dedup_pool.shutdown(wait=False, cancel_futures=True)

    routes = [Route("/healthz", healthz), Route("/api/info", info), Route("/api/search", search, methods=["POST"]),
              Route("/api/neighbors/{ident}", neighbors), Route("/api/dedup", dedup),
              Route("/image/{ident}", image), Route("/thumb/{ident}", thumb)]
    routes += [Route(path, static) for path in STATIC]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.server = srv
    app.add_middleware(AccessLog)
    return app
