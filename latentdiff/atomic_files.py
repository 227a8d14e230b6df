"""Atomic file writes and their temporaries, in one place.

Every file latentdiff writes in place is first written to a temporary `<path>.tmp.<pid>[<suffix>]` beside it, then
renamed over `path`, so a reader never sees half a file. `replacing` removes the temporary when the write fails or is
interrupted (an exception; the command-line programs turn SIGTERM into one, see `errors.run_cli`). Only SIGKILL or a
crash of the interpreter can leave one behind: `remove_stale` deletes those whose process is gone, and the programs
call it on their output folders before they write.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

# <name>.tmp.<pid> with an optional extension some writers need (np.savez appends '.npz' to any other name).
_TEMPORARY = re.compile(r"\.tmp\.(\d+)(\.[A-Za-z0-9]+)?$")


def temp_path(path: str, suffix: str = "") -> str:
    """The temporary file this process writes before it renames it to `path`."""
    return f"{path}.tmp.{os.getpid()}{suffix}"


@contextlib.contextmanager
def replacing(path: str, suffix: str = "") -> Iterator[str]:
    """Yields a temporary path to write; renames it over `path` when the block ends normally, removes it otherwise."""
    tmp = temp_path(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def discard(path: str) -> None:
    """Removes a temporary file if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` atomically."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(directory: str) -> list[str]:
    """Deletes the temporaries under `directory` (recursively) whose writing process no longer runs -> their paths.

    A temporary of a live process (another run writing beside this one) is left alone."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for root, _, files in os.walk(directory):
        for name in files:
            match = _TEMPORARY.search(name)
            if match and not _process_alive(int(match.group(1))):
                path = os.path.join(root, name)
                discard(path)
                removed.append(path)
    return removed
