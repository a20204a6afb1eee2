"""One FastAPI app: the OpenAI-style API under ``/v1`` and the chat page at ``/``, run by uvicorn.

The API routes read the body themselves (so an oversized one is a 413 in the API's error shape, and
the rest of it is drained first: a client still sending must read that answer, not a reset
connection), check the API key, and run each request in a worker thread while the event loop keeps
serving.  This module needs the ``web`` extra (FastAPI, uvicorn, Gradio); only ``anygpt serve`` imports it.
The page is mounted with ``allowed_paths`` = the server's temporary directory only and
Gradio's own upload cache inside it, so it serves nothing else.
"""
from __future__ import annotations

import hmac
import json
import os
import shutil
import signal
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from anygpt.serve.api import ApiError, RequestReader, Stream, completion, execute, model_card, models
from anygpt.serve.engine import Engine
from anygpt.serve.limits import MIB

# Drain at most this many times the body limit before answering 413 (beyond that the connection is closed).
DRAIN_FACTOR = 8


def prepare_gradio_env(workdir: Path) -> None:
    """Before Gradio is imported: analytics off, its upload/cache directory inside ``workdir``."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(workdir / "gradio")
    os.environ.setdefault("GRADIO_SSR_MODE", "False")


def build_app(engine: Engine, api_key: str | None = None, page: bool = True) -> Any:
    """The server's ASGI app (FastAPI): ``/v1/chat/completions``, ``/v1/models`` and, with ``page``, ``/``."""
    app = FastAPI(title="anygpt serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given.lower().startswith("bearer ") else ""
        if not token:
            raise ApiError(401, "missing API key: send Authorization: Bearer KEY", "missing_api_key")
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "incorrect API key", "invalid_api_key")

    async def read_json(request: Request) -> Any:
        limit = engine.limits.body_bytes
        too_large = ApiError(413, f"request body larger than the server's limit of {limit / MIB:g} MiB "
                                  f"(--max-body-mb)", "request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > DRAIN_FACTOR * limit:
            raise too_large
        size, chunks = 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > DRAIN_FACTOR * limit:
                break
        if size > limit:
            raise too_large
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", "invalid_json") from None

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_key(request)
        return models(engine)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        check_key(request)
        if model_id != engine.model_id:
            raise ApiError(404, f"the model {model_id!r} does not exist", "model_not_found", "model")
        return model_card(engine)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        check_key(request)
        body = await read_json(request)
        workdir = engine.scratch("api")
        cleanup: Callable[[], None] = lambda: shutil.rmtree(workdir, ignore_errors=True)
        try:
            req = RequestReader(engine, workdir).read(body)
            if req.stream:
                stream = Stream(engine, req, cleanup)
                await anyio.to_thread.run_sync(stream.start)
                cleanup = lambda: None  # the stream removes the directory when it ends
                return StreamingResponse(stream.chunks(), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            answer = await anyio.to_thread.run_sync(execute, engine, req)
            return completion(engine, req, answer)
        finally:
            cleanup()

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def unknown(rest: str, request: Request) -> None:
        check_key(request)
        raise ApiError(404, f"no such endpoint /v1/{rest}", "unknown_url")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        err = ApiError(500, f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                       "internal_error")
        return JSONResponse(err.body(), status_code=500)

    if page:
        import gradio as gr

        from anygpt.serve.page import build_page

        auth = (lambda _user, password: hmac.compare_digest(password.encode(), api_key.encode())) if api_key else None
        app = gr.mount_gradio_app(app, build_page(engine), path="/", allowed_paths=[str(engine.workdir)],
                                  max_file_size=engine.limits.media_bytes, ssr_mode=False, mcp_server=False,
                                  footer_links=[], auth=auth,
                                  auth_message="This server needs its API key (any user name, the key as password).")
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), bound before the server starts so the
    printed address is the real one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class Stopped(Exception):
    """SIGTERM, turned into an exception so that cleanup (``finally``) runs."""


def _raise_stopped(signum: int, frame: Any) -> None:
    raise Stopped


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside: SIGTERM raises :class:`Stopped` (the default would end the process before the
    temporary directory is removed).  Only the main thread can take signals; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(app: Any, sock: socket.socket, log_level: str = "warning") -> None:
    """Serve ``app`` on ``sock`` until SIGINT or SIGTERM, then return (so the caller cleans up).

    uvicorn shuts down gracefully on either signal and then re-raises it with the handlers that were
    there before: SIGINT's raises ``KeyboardInterrupt``, SIGTERM's raises ``Stopped`` inside
    :func:`sigterm_raises`; both end serving normally here.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, Stopped):
        pass
