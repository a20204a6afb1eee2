"""``anygpt bench serve``: N concurrent API clients against ``anygpt serve`` on the tiny model.

The server runs as its own process (as in use: the clients' threads do not share its interpreter);
each client sends chat completions over its own HTTP connection until the fixed number of requests is
done.  The mix is what a server sees: mostly text, every fourth asks for speech (rendered and
base64-encoded), every eighth is malformed (bad base64: it must come back as a clean 400).  Reported:
requests/s, p50/p95 latency, and every request's fate: answered, a clean error (a 4xx/5xx in the
API's error shape), or lost (connection dropped, timeout, a body that is not the API's) - lost must
be 0.  The tiny model is random: speed, not quality, is measured.
"""
from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from anygpt.serve.testing import ServerProcess

MODEL_ID = "bench-tiny"


def _body(i: int, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL_ID, "max_tokens": max_tokens, "seed": i,
                            "messages": [{"role": "user", "content": f"question number {i}: tell me about it"}]}
    if i % 8 == 7:
        body["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]
    elif i % 4 == 3:
        body.update(modalities=["text", "audio"], audio={"format": "wav"})
    return body


def _classify(response: Any) -> str:
    """``answered`` / ``error`` (clean, in the API's shape) / ``lost``."""
    try:
        data = response.json()
    except ValueError:
        return "lost"
    if response.status_code == 200:
        ok = isinstance(data, dict) and data.get("choices") and data["choices"][0].get("message")
        return "answered" if ok else "lost"
    err = data.get("error") if isinstance(data, dict) else None
    return "error" if isinstance(err, dict) and err.get("message") and 400 <= response.status_code < 600 else "lost"


def bench_serve(clients: int = 4, requests: int = 32, max_tokens: int = 16, timeout: float = 120.0,
                threads: int = 1) -> dict[str, Any]:
    """Start a tiny-model server, run ``requests`` requests from ``clients`` concurrent clients, report.

    Args:
        clients: concurrent clients (threads, one HTTP connection each).
        requests: total requests (spread over the clients).
        max_tokens: the answer budget per request.
        timeout: per-request timeout in seconds (a request over it counts as lost).
        threads: the server's torch threads (``OMP_NUM_THREADS``).
    """
    import httpx

    from anygpt.infer.testing import build_tiny_model_dir

    if clients < 1 or requests < 1:
        raise ValueError(f"bench serve: clients and requests must be >= 1, got {clients} and {requests}")
    with tempfile.TemporaryDirectory(prefix="anygpt-bench-serve-") as tmp:
        model = build_tiny_model_dir(Path(tmp))
        server = ServerProcess(["--model", str(model), "--codecs", "tiny", "--name", MODEL_ID, "--no-page",
                                "--max-new-tokens", str(max(max_tokens, 8)), "--queue", str(max(clients, 16))],
                               env={"OMP_NUM_THREADS": str(threads)})
        server.start()
        try:
            url = server.url + "/v1/chat/completions"
            counter = iter(range(requests))
            lock = threading.Lock()
            outcomes: list[tuple[str, float, int]] = []  # (fate, seconds, status)

            def client() -> None:
                with httpx.Client(timeout=timeout) as http:
                    while True:
                        with lock:
                            i = next(counter, None)
                        if i is None:
                            return
                        t0 = time.perf_counter()
                        try:
                            r = http.post(url, json=_body(i, max_tokens))
                            fate, status = _classify(r), r.status_code
                        except httpx.HTTPError:
                            fate, status = "lost", 0
                        with lock:
                            outcomes.append((fate, time.perf_counter() - t0, status))

            # One request first: the server's lazy codec loading is not what a steady state costs.
            httpx.post(url, json=_body(3, max_tokens), timeout=timeout)
            t0 = time.perf_counter()
            pool = [threading.Thread(target=client) for _ in range(clients)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            wall = time.perf_counter() - t0
        finally:
            server.stop()
    latencies = np.array([s for _, s, _ in outcomes])
    fates = [f for f, _, _ in outcomes]
    statuses: dict[str, int] = {}
    for _, _, st in outcomes:
        statuses[str(st)] = statuses.get(str(st), 0) + 1
    result = {
        "clients": clients, "requests": requests, "max_tokens": max_tokens, "seconds": round(wall, 2),
        "requests_per_s": round(len(outcomes) / wall, 2),
        "latency_p50_s": round(float(np.percentile(latencies, 50)), 3),
        "latency_p95_s": round(float(np.percentile(latencies, 95)), 3),
        "answered": fates.count("answered"), "clean_errors": fates.count("error"), "lost": fates.count("lost"),
        "statuses": statuses,
        # 1.0 when every request got an answer or a clean error (the table of `anygpt bench` shows ratios).
        "served_ratio": (fates.count("answered") + fates.count("error")) / requests,
    }
    print(f"[bench serve] {clients} clients, {requests} requests in {wall:.1f} s: {result['requests_per_s']} req/s, "
          f"p50 {result['latency_p50_s']} s, p95 {result['latency_p95_s']} s; answered {result['answered']}, "
          f"clean errors {result['clean_errors']}, lost {result['lost']}", flush=True)
    return result
