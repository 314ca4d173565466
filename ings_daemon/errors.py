"""Errors the person running a command can act on.

The command line prints one as a single line, `ings-daemon: <message>`, and exits with its
code; the daemon logs one as a single ERROR line. Neither shows a traceback: the message
names the file, topic or setting and says what to do, and a traceback would only bury it.
"""

from __future__ import annotations

USAGE = 2  # bad arguments or input files, as argparse exits
RUNTIME = 1  # the environment: an unreachable broker


class UserError(Exception):
    """A mistake or a condition the user can fix; `str(error)` says what and what to do.

    `code` is the exit status: USAGE for bad input, RUNTIME for the environment.
    """

    def __init__(self, message: str, code: int = RUNTIME) -> None:
        super().__init__(message)
        self.code = code
