"""Progress lines for long phases without a step counter (loading, compiling, sampling, feature extraction).

    with progress.phase("sampling 8 images, 50 steps"):
        images = pipe(...)

prints "sampling 8 images, 50 steps ..." when the phase starts, "sampling 8 images, 50 steps: 10 s" every
`every` seconds while it runs (from a daemon thread: XLA releases Python's lock while it compiles and runs, so the
line comes even during a minute-long compile) and "sampling 8 images, 50 steps: done in 12.3 s" at the end, on
stderr. A user never watches a silent terminal for minutes and wonders whether the program hangs.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

EVERY_SECONDS = 5.0  # half of the 10 s a user should ever wait for a sign of life


def _print(stream: TextIO, line: str) -> None:
    print(line, file=stream, flush=True)


@contextlib.contextmanager
def phase(what: str, every: float = EVERY_SECONDS, stream: TextIO | None = None) -> Iterator[None]:
    """Prints `what` at the start, the elapsed time every `every` seconds while the block runs, and at the end."""
    out = sys.stderr if stream is None else stream
    start = time.perf_counter()
    finished = threading.Event()

    def beat() -> None:
        while not finished.wait(every):
            _print(out, f"{what}: {time.perf_counter() - start:.0f} s")

    _print(out, f"{what} ...")
    thread = threading.Thread(target=beat, name="latentdiff-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        finished.set()
        thread.join()
    _print(out, f"{what}: done in {time.perf_counter() - start:.1f} s")
