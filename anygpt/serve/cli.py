"""``anygpt serve --model DIR``: the chat page and the OpenAI-compatible API on one local server.

Light at import (the registry, argparse); Gradio, FastAPI and uvicorn are imported when the command
runs, with a one-line hint when the ``web`` extra is not installed.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from anygpt.infer.cli import add_model_arguments, generation_config, load_model, system_prompt
from anygpt.serve.limits import MIB, Limits

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="a web chat page and an OpenAI-compatible API for one model on a local server",
        description="Serve one model: the chat page at / (Gradio; needs the 'web' extra) and the OpenAI "
                    "chat-completions API at /v1/chat/completions and /v1/models. Bound to 127.0.0.1 unless "
                    "--host says otherwise; uploaded and generated files live in a temporary directory removed "
                    "on exit.")
    s = p.add_argument_group("server")
    s.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = a free one)")
    s.add_argument("--api-key", default=os.environ.get("ANYGPT_API_KEY"), metavar="KEY",
                   help="required as 'Authorization: Bearer KEY' on every API call, and as the page's password "
                        "(default: $ANYGPT_API_KEY; none: open)")
    s.add_argument("--media-root", default=None, metavar="DIR",
                   help="the only directory whose files API requests may name with file: URLs (default: none)")
    s.add_argument("--name", default=None, help="the model id /v1/models lists (default: the model directory's name)")
    s.add_argument("--system", default=None, help="system prompt (default: the one recorded in the export, else none)")
    s.add_argument("--max-body-mb", type=float, default=Limits.body_bytes / MIB, metavar="MB",
                   help=f"largest API request body (default {Limits.body_bytes // MIB})")
    s.add_argument("--max-media-mb", type=float, default=Limits.media_bytes / MIB, metavar="MB",
                   help=f"largest media item in a request or an upload (default {Limits.media_bytes // MIB})")
    s.add_argument("--queue", type=int, default=Limits.queue, metavar="N",
                   help=f"requests that may wait for the model; more get 429 (default {Limits.queue})")
    s.add_argument("--no-page", action="store_true", help="serve the API only (no Gradio needed)")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")
    add_model_arguments(p, out=False)
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from anygpt.cli import UserError
    from anygpt.serve.engine import Engine
    from anygpt.serve.server import Stopped, bind, build_app, prepare_gradio_env, run, sigterm_raises

    if args.media_root is not None and not Path(args.media_root).is_dir():
        raise ValueError(f"--media-root {args.media_root}: no such directory")
    if min(args.max_body_mb, args.max_media_mb) <= 0 or args.queue < 0:
        raise ValueError("--max-body-mb and --max-media-mb must be > 0, --queue >= 0")
    # Gradio reads its environment when first imported: only look for it here.
    for module in ("fastapi", "uvicorn") + (() if args.no_page else ("gradio",)):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"anygpt serve needs the web extra ({module} is missing): pip install 'anygpt-trainer[web]'")
    config = generation_config(args)
    sock = bind(args.host, args.port)  # fail on a taken port before loading the model
    limits = Limits(body_bytes=int(args.max_body_mb * MIB), media_bytes=int(args.max_media_mb * MIB), queue=args.queue)
    workdir = Path(tempfile.mkdtemp(prefix="anygpt-serve-"))
    # From here on a SIGTERM (as a service manager stops it) ends in the `finally` that removes workdir.
    with sigterm_raises():
        try:
            prepare_gradio_env(workdir)
            lm, media = load_model(args, print)
            name = args.name or Path(args.model).resolve().name
            engine = Engine(lm, media, config, name, system=system_prompt(args), media_root=args.media_root,
                            limits=limits, workdir=workdir)
            app = build_app(engine, api_key=args.api_key, page=not args.no_page)
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            print(f"serving {name} on http://{shown}:{port}/  (page: /, API: /v1/chat/completions; Ctrl-C stops); "
                  f"temporary files in {workdir}", flush=True)
            if host not in ("127.0.0.1", "::1", "localhost") and not args.api_key:
                print(f"warning: listening on {host} without --api-key: anyone who can reach it can use the model",
                      file=sys.stderr, flush=True)
            run(app, sock, args.log_level)
        except Stopped:
            pass
        finally:
            sock.close()
            shutil.rmtree(workdir, ignore_errors=True)
    print("stopped; temporary files removed", flush=True)
    return 0
