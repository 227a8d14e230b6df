"""User-facing errors: the one exception type for bad input, and how entry points report it.

Validation code raises `UserError` (or a subclass: ConfigError, DataError, ConversionError, ...) for anything the user
can fix: a bad flag, a bad file, a config that cannot work. Entry points (`run_cli`) print those as one line and exit
with status 2; the operating system's file errors (missing, unreadable, not a directory) are treated the same way.
Anything else is a bug in latentdiff: its traceback is printed in full, followed by where to report it.

Set LATENTDIFF_DEBUG=1 to see the full traceback of user errors too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from latentdiff import compile_cache

BUG_REPORT_HINT = (
    "this is a bug in latentdiff, not a problem with your input: please report it with the traceback above, "
    "the command line and `pip freeze` (the project's issue tracker)"
)


class UserError(ValueError):
    """Bad input or a bad config: the message names the problem and the fix. (A ValueError for older callers.)"""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that describe bad input, not a bug: UserError and the OS's file errors."""
    return (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def one_line(error: BaseException) -> str:
    """The first line of the error's message (its type name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_out_of_memory(error: BaseException) -> bool:
    """XLA's allocation failures (a config too large for the device, not a bug)."""
    return "RESOURCE_EXHAUSTED" in str(error)[:500]


def exit_with(error: BaseException) -> NoReturn:
    print(f"error: {one_line(error)}", file=sys.stderr)
    sys.exit(2)


def exit_with_bug(error: BaseException) -> NoReturn:
    traceback.print_exception(error)
    print(f"internal error ({type(error).__name__}): {BUG_REPORT_HINT}", file=sys.stderr)
    sys.exit(3)


def _raise_on_sigterm(signum: int, frame: Any) -> NoReturn:
    del frame
    print("stopped by SIGTERM", file=sys.stderr)
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While the block runs, SIGTERM raises SystemExit(143) in the main thread instead of killing the process at once,
    so `finally` blocks run and half-written temporaries are removed (latentdiff.atomic_files). A handler set by
    someone else is left in place, and training installs its own (checkpoint, then exit 0) for its loop."""
    try:
        installed = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        if installed:
            signal.signal(signal.SIGTERM, _raise_on_sigterm)
    except ValueError:  # not the main thread: signals cannot be handled here
        installed = False
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_cli(main: Callable[[], Any]) -> Any:
    """Runs a command-line program's `main` with the compilation cache on (`compile_cache`) and SIGTERM unwinding the
    stack (`sigterm_unwinds`): user errors -> one line and exit 2; device out of memory -> one line with the fix,
    exit 2; anything else -> its traceback, the bug-report hint and exit 3."""
    compile_cache.enable()
    with sigterm_unwinds():
        if os.environ.get("LATENTDIFF_DEBUG"):
            return main()
        try:
            return main()
        except user_error_types() as error:
            exit_with(error)
        except Exception as error:
            if is_out_of_memory(error):
                print(
                    f"error: out of device memory ({one_line(error)[:200]}); lower the batch size or the resolution, "
                    "or check the plan first with `latentdiff preflight`",
                    file=sys.stderr,
                )
                sys.exit(2)
            exit_with_bug(error)
