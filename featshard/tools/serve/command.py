"""`featshard serve RUN`: an HTTP search service over a run's index, with a result gallery at `/`.

One process, one model (on one device: `--gpus 0`, or the CPU), the index opened once (an --on-disk IVF
memory-mapped; nprobe/efSearch from index.json), runs added with `featshard add` searchable too. Starlette under
uvicorn: one event loop takes every request; uploads are decoded in a thread pool and concurrent queries are batched
into one forward pass (up to --max-batch, waiting at most --max-wait-ms for more). Binds 127.0.0.1 unless --host says
otherwise.

  GET  /healthz                     200 {"status": "ok"} once model and index are loaded, 503 before
  GET  /api/info                    model, layer, dim, ntotal, spec, metric, recall, runs, batching counters
  POST /api/search                  multipart field `image` (+ field `k`) -> {"results": [...], "took_ms"}
  GET  /api/neighbors/<id>?k=       neighbours of a stored image from its stored vector
  GET  /api/dedup?threshold=&page=  near-duplicate groups, 20 per page
  GET  /image/<id>, /thumb/<id>     the stored image file, a cached JPEG thumbnail
  GET  /                            the gallery page (plain HTML + JS, works offline)

Bad input is a 4xx JSON answer (400 bad image / field / k, 404 unknown id, 413 body over --max-upload-mb); more than
--max-queue searches at once is a 503, a search over --timeout a 504.
"""
from __future__ import annotations

import logging

from featshard.errors import FeatshardError, UsageError
from featshard.tools.config import ServeConfig

log = logging.getLogger("featshard.serve")


def pick_device(gpus: str | None) -> str:
    """Pin this process to the one device it serves on and return its torch name (before torch starts CUDA)."""
    from featshard.runner.devices import Device, parse_gpus, pin_device, visible_cuda_count

    if gpus is None or not gpus.strip():
        devices = [Device("cuda", 0) if visible_cuda_count() > 0 else Device("cpu", 0)]
    else:
        devices = parse_gpus(gpus)
    if len(devices) != 1:
        raise UsageError(f"--gpus {gpus!r} names {len(devices)} devices: serve runs one model per process; give "
                         "one (e.g. --gpus 0) and start one server per GPU")
    return pin_device(devices[0])


def serve(options: ServeConfig) -> int:
    """Run the server until SIGINT/SIGTERM; returns 0, or raises FeatshardError when the run cannot be served."""
    import uvicorn

    from featshard.index.reader import read_meta
    from featshard.runner.runtime import tune_malloc, tune_process_env
    from featshard.store.manifest import load_manifest
    from featshard.tools.serve.app import create_app
    from featshard.tools.serve.state import ServeState

    load_manifest(options.run_dir)  # fail now, with the CLI's message, on a directory that is no run or has no index
    read_meta(options.run_dir)
    tune_process_env()
    tune_malloc()
    logging.getLogger("python_multipart").setLevel(logging.ERROR)  # a bad upload is answered 400, not logged twice
    state = ServeState(options, pick_device(options.gpus))
    config = uvicorn.Config(create_app(state), host=options.host, port=options.port, access_log=False,
                            log_config=None, limit_concurrency=max(64, 4 * options.max_queue),
                            timeout_keep_alive=5, timeout_graceful_shutdown=10, server_header=False)
    server = uvicorn.Server(config)
    state.on_failure = lambda: setattr(server, "should_exit", True)
    log.info("serving %s on http://%s:%d/ (%s)", options.run_dir, options.host, options.port, state.device)
    server.run()
    if state.error:
        raise FeatshardError(f"cannot serve {options.run_dir}: {state.error}")
    if not server.started:
        raise FeatshardError(f"could not listen on {options.host}:{options.port} (in use? see the log above)")
    return 0
