"""glibc's malloc arenas, capped for the long-running server so its memory stays flat under load.

glibc gives each thread that allocates its own arena, up to 8 per core, and hands little of an arena's
freed memory back to the system. The server's request threads (upload parsing, image decoding, URL
fetching) each grew one: measured with `bench/bench_serve.py`'s model, the server's RSS rose by 9% (94 MB)
with its first concurrent requests, after the warm-up, and by 2% with the arenas capped at 2.
"""
from __future__ import annotations

import ctypes
import os

M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h
SERVER_ARENAS = 2


def limit_arenas(count: int = SERVER_ARENAS) -> bool:
    """Cap the arenas of threads that start allocating from now on; call it before threads start (before
    TensorFlow loads). True if capped; False off glibc, or when MALLOC_ARENA_MAX is set (the user's
    choice stands)."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library this process runs on
    return mallopt is not None and mallopt(M_ARENA_MAX, count) == 1
