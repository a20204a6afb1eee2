"""The server's size and queue limits (a light module: the command line reads its defaults)."""
from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Request limits.

    Attributes:
        body_bytes: largest API request body (413 beyond).
        media_bytes: largest decoded media item (an image, a clip) in a request or an upload.
        queue: turns that may wait for the model; more are refused (429 / a page error).
    """

    body_bytes: int = 32 * MIB
    media_bytes: int = 20 * MIB
    queue: int = 16
