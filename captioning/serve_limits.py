"""The server's bounds, with their defaults: one place for `serve` and for the command line's flags, which
must read them without importing the server (and TensorFlow) first."""
from __future__ import annotations

from dataclasses import dataclass, field

from captioning.fetch import FetchLimits


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 20 * 2**20
    max_files: int = 8                 # images in one request
    max_pixels: int = 40_000_000       # width x height of one image, checked before decoding
    max_batch: int = 16                # images in one forward pass
    max_wait_s: float = 0.005          # how long the first image of a batch waits for company
    request_timeout_s: float = 60.0    # to send a request's headers, and the first part of its body (slowloris)
    min_body_rate: float = 16 * 1024   # bytes/s a body must keep up past request_timeout_s (http_limits)
    max_connections: int = 100         # open at once; each may hold a body of max_body_bytes in memory
    fetch: FetchLimits = field(default_factory=FetchLimits)
