"""One kind of error for problems the user can fix, and one way to report it.

Expected problems (bad params, missing files, unusable data) raise `UserError`; entry points run
through `run_cli`, which prints the message on one line and exits with status 2 instead of a traceback.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem in the user's input or setup; the message names it and says what to do."""


def one_line(message: object) -> str:
    """The message with its line breaks folded, so each problem is exactly one line of output."""
    return " ".join(str(message).split())


def clipped(text: str, limit: int = 120) -> str:
    """`text` as an error message quotes it: whole up to `limit` characters, else its start and its end with
    its length between them. An echoed 64 KB URL (or a file name, or a field's value) made an error as long;
    the start still names the scheme, host and path, the end the file."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    return f"{text[:head]}...[{len(text)} characters]...{text[head - limit:]}"


# A URL's user name and password (`scheme://user:secret@host`), or what could be one: in a word (at the start or
# after white space), what comes before an "@" that precedes the first "/", "?" or "#" after the scheme's slashes
CREDENTIALS = re.compile(r"(?<!\S)((?:[A-Za-z][A-Za-z0-9+.-]*:)?[/\\]*)[^\s/?#]*@")


def without_credentials(text: str) -> str:
    """`text` with the user name and password of any URL in it shown as ***: errors and log lines quote URLs
    (`http://user:secret@host/x.jpg` as `http://***@host/x.jpg`), and must never show a password."""
    return CREDENTIALS.sub(r"\1***@", text)


def run_cli(main: Callable[[], object]) -> None:
    try:
        main()
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def run_stage(main: Callable[[], object], doc: str | None) -> None:
    """Entry point of a pipeline stage. A stage takes no arguments (params.yaml holds its settings),
    so `--help` prints its docstring and exits without running; anything else runs it via run_cli."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)  # stages.x when run as python -m stages.x
    argparse.ArgumentParser(
        prog=f"python -m {spec.name}" if spec else None, description=doc,
        epilog="It reads its settings from params.yaml and its inputs from the paths in captioning/layout.py. "
               "`dvc repro` runs it when its code, data or params change (see dvc.yaml).").parse_args()
    run_cli(main)
