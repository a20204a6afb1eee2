"""A server process for tests and the load benchmark: ``anygpt serve`` on a free port, stopped cleanly."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

_SERVING = re.compile(r"serving \S+ on (http://\S+?)/? .*temporary files in (\S+)")


class ServerProcess:
    """``python -m anygpt.cli serve --port 0 ARGS`` in a subprocess; ``url`` and ``workdir`` once it serves.

    Args:
        args: the serve options after ``serve`` (``--model DIR --codecs tiny ...``).
        env: extra environment (threads, ``GRADIO_ANALYTICS_ENABLED``...); ``PYTHONPATH`` is inherited.
        timeout: seconds to wait for the server to listen (model loading included).
    """

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 300.0) -> None:
        self.args = ["--port", "0", *args]
        self.env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
        self.timeout = timeout
        self.lines: list[str] = []
        self.url = ""
        self.workdir: Path | None = None
        self.proc: subprocess.Popen | None = None

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def start(self) -> "ServerProcess":
        self.proc = subprocess.Popen([sys.executable, "-m", "anygpt.cli", "serve", *self.args], env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = _SERVING.search(line)
                if m:
                    self.url, self.workdir = m.group(1), Path(m.group(2))
                    return self
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader catch the last lines
                raise RuntimeError(f"anygpt serve exited with {self.proc.returncode}:\n{self.output[-3000:]}")
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"anygpt serve did not start within {self.timeout:.0f} s:\n{self.output[-3000:]}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (as a service manager stops it), then wait; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        time.sleep(0.2)
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
