"""User-facing errors: entry points print these as one line (no traceback) and exit with status 2.

Set LATENTDIFF_DEBUG=1 to see the full traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that describe bad input or a bad config, not a bug."""
    return (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError, RuntimeError)


def exit_with(error: BaseException) -> NoReturn:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, KeyError):
        message = f"missing key {message}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_cli(main: Callable[[], Any]) -> Any:
    """Runs `main`, turning user errors into a one-line message and exit status 2."""
    if os.environ.get("LATENTDIFF_DEBUG"):
        return main()
    try:
        return main()
    except user_error_types() as error:
        exit_with(error)
