"""User-facing errors.

A `KDError` is a problem with the user's input (config, file, data row, checkpoint) rather than a
bug. Entry scripts print its message on one screen and exit with status 2, without a traceback.
The message should name the problem and the fix.
"""
import sys
from contextlib import contextmanager


class KDError(Exception):
    """An input problem the user can fix; its message says how."""


@contextmanager
def friendly_errors():
    """Turn a KDError into a short message on stderr and exit status 2 (no traceback wall)."""
    try:
        yield
    except KDError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
