"""One kind of error for problems the user can fix, and one way to report it.

Expected problems (bad params, missing files, unusable data) raise `UserError`; entry points run
through `run_cli`, which prints the message on one line and exits with status 2 instead of a traceback.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem in the user's input or setup; the message names it and says what to do."""


def one_line(message: object) -> str:
    """The message with its line breaks folded, so each problem is exactly one line of output."""
    return " ".join(str(message).split())


def run_cli(main: Callable[[], object]) -> None:
    try:
        main()
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
