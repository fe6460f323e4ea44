"""The server's malloc arena cap (captioning.malloc), checked in fresh processes: glibc reads it once."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and malloc_info")

# 12 threads alive at once, each allocating outside Python's small-object allocator (which has its own
# memory), then glibc's own report of its arenas: one <heap nr=...> per arena.
COUNT_ARENAS = r"""
import ctypes, sys, tempfile, threading
from captioning.malloc import limit_arenas

capped = limit_arenas(2) if sys.argv[1] == "cap" else None
together = threading.Barrier(12)

def allocate():
    together.wait()
    blocks = [bytearray(4096) for _ in range(200)]
    together.wait()
    del blocks

threads = [threading.Thread(target=allocate) for _ in range(12)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile("r", suffix=".xml") as report:
    stream = libc.fopen(report.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))
    print(capped, report.read().count("<heap nr="))
"""


def arenas_after_threads(mode: str, **env) -> tuple[str, int]:
    environment = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"} | env
    out = subprocess.run([sys.executable, "-c", COUNT_ARENAS, mode], capture_output=True, text=True, check=True,
                         env=environment).stdout.split()
    return out[0], int(out[1])


def test_capped_arenas_stay_at_two_while_threads_allocate_together():
    capped, arenas = arenas_after_threads("free")
    assert capped == "None" and arenas > 2  # glibc's default: one per thread, up to 8 per core
    assert arenas_after_threads("cap") == ("True", 2)


def test_a_users_malloc_arena_max_is_left_as_set():
    capped, arenas = arenas_after_threads("cap", MALLOC_ARENA_MAX="3")
    assert (capped, arenas) == ("False", 3)
