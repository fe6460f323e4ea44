"""How the text files people really have are decoded: the captions files and the split lists."""
from __future__ import annotations

# Captions files are meant to be UTF-8, but many copies were saved by Windows tools in cp1252 (or
# latin-1). Each line (or pickled bytes value) is decoded alone with the first of these that accepts
# it, so a cafe\xe9 costs no caption; latin-1 accepts any byte, so no line is ever lost to its encoding.
# The report lists every line that needed a fallback (`decoded_as_cp1252`, `decoded_as_latin1`).
ENCODINGS = ("utf-8", "cp1252", "latin-1")
FALLBACK_ENCODINGS = ENCODINGS[1:]
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # Notepad's "Unicode" and "Unicode big endian"


def decode(data: bytes) -> tuple[str, str | None]:
    """The text of `data` and the fallback encoding it needed (None when it is UTF-8)."""
    for encoding in ENCODINGS[:-1]:
        try:
            return data.decode(encoding), (None if encoding == ENCODINGS[0] else encoding)
        except UnicodeDecodeError:
            continue
    return data.decode(ENCODINGS[-1]), ENCODINGS[-1]


def as_utf8(data: bytes) -> bytes:
    """A text file's bytes without a UTF-8 byte-order mark, and a UTF-16 file (one that starts with its
    byte-order mark) converted to UTF-8, so that every reader can split lines on b"\\n"."""
    if data.startswith(UTF16_BOMS):
        try:
            return data.decode("utf-16").encode("utf-8")
        except UnicodeDecodeError:
            pass  # not UTF-16 after all: read as bytes like any other file
    return data.removeprefix(b"\xef\xbb\xbf")
