"""Atomic output writing: a stage killed mid-write never leaves a file that looks complete.

Every writer goes to a temporary file in the destination folder and renames it into place, which
is atomic on POSIX file systems.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _file_mode() -> int:
    """What open() gives a new file under this process's umask (os.umask can only be read by setting it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    `suffix` keeps a file extension on the temporary name for writers that insist on one
    (Keras' `.keras`, NumPy's `.npy`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _FILE_MODE)  # mkstemp's 0600 would hide outputs from the other users of a project
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: object) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> object:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_parquet(path: str | os.PathLike, frame) -> None:
    with atomic_path(path, suffix=".parquet") as tmp:
        frame.to_parquet(tmp, index=False)


def write_lines(path: str | os.PathLike, lines) -> None:
    write_text(path, "".join(f"{line}\n" for line in lines))


def read_lines(path: str | os.PathLike) -> list[str]:
    """The non-empty lines `write_lines` wrote, split on "\\n" only: str.splitlines() also splits on
    U+2028, U+0085 and other separators that a file name may hold (parse_pickle keeps such names), and
    would cut one image name into two names of no image."""
    return [line for line in Path(path).read_text(encoding="utf-8").split("\n") if line]


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in blocks (weights files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
