"""glibc's malloc arenas, capped for the long-running server so its memory stays flat under load.

glibc gives each thread that allocates its own arena, up to 8 per core, and hands little of an arena's
freed memory back to the system, so the server's request threads (upload parsing, image decoding, URL
fetching) grew its memory with its first concurrent requests; README "Serve" has the measurements.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h
SERVER_ARENAS = 2


def limit_arenas(count: int = SERVER_ARENAS) -> bool:
    """Cap the arenas of threads that start allocating from now on; call it before threads start (before
    TensorFlow loads). True if capped; False off Linux's glibc, or when MALLOC_ARENA_MAX is set (the user's
    choice stands)."""
    if not sys.platform.startswith("linux") or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # this process's C library; musl's returns 0
    return mallopt is not None and mallopt(M_ARENA_MAX, count) == 1
