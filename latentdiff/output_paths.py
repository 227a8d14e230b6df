"""Output paths checked before any work starts (before a model loads or a dataset is read): one-line UserErrors
naming the flag, the problem and the fix. Nothing is left behind: the parent is probed with an empty directory that is
removed at once (os.access alone says yes to root on read-only and virtual filesystems such as /proc)."""

from __future__ import annotations

import os
import tempfile

from latentdiff.errors import UserError


def _nearest_existing(path: str) -> str:
    current = os.path.abspath(path)
    while not os.path.exists(current):
        current = os.path.dirname(current)
    return current


def _check_writable_parent(path: str, flag: str) -> None:
    anchor = _nearest_existing(os.path.dirname(os.path.abspath(path)) or ".")
    if not os.path.isdir(anchor):
        raise UserError(f"{flag} {path!r}: {anchor!r} is a file, not a directory; pass a path in a directory")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path!r}: cannot write into {anchor!r} (permission denied); pass a writable path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".latentdiff-write-probe-", dir=anchor))
    except OSError as error:
        raise UserError(
            f"{flag} {path!r}: cannot create anything in {anchor!r} ({error.strerror}); pass a writable path"
        ) from None


def check_output_dir(path: str, flag: str) -> None:
    """`path` is, or can be created as, a writable directory."""
    if not path:
        raise UserError(f"{flag} is empty; pass a directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is an existing file; pass a directory (it is created if missing)")
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {path!r}: cannot write into it (permission denied); pass a writable directory")
        return
    _check_writable_parent(path, flag)


def check_output_file(path: str, flag: str) -> None:
    """`path` is, or can be created as, a writable file (an existing file is replaced)."""
    if not path:
        raise UserError(f"{flag} is empty; pass a file path")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a directory; pass a file path")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path!r}: cannot overwrite it (permission denied); pass a writable path")
    _check_writable_parent(path, flag)
