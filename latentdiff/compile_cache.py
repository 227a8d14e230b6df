"""JAX's persistent compilation cache for the command-line programs: a second start skips XLA compilation.

Every CLI turns it on (`errors.run_cli` calls `enable`); importing the library leaves JAX's setting alone.
- Directory: $LATENTDIFF_COMPILE_CACHE, else $XDG_CACHE_HOME/latentdiff/jax-compile (~/.cache/latentdiff/jax-compile).
- Off: LATENTDIFF_COMPILE_CACHE=off. A cache directory the user gave JAX itself (JAX_COMPILATION_CACHE_DIR) wins.
- Shared safely by concurrent processes (several CLIs, the processes of a multi-host run on one machine): the size cap
  below turns on JAX's file lock around every read and write, so nobody reads a half-written entry, and the least
  recently used entries are evicted beyond it.
- What is stored: every program (JAX's `jax_persistent_cache_min_compile_time_secs` is set to 0 here, not JAX's
  1 s: a sampling start compiles a dozen sub-second helpers, ~1.5 s together on a 2-core CPU; set
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS to choose another threshold). The key covers the program, the XLA flags,
  the devices and the jaxlib version, so a stale entry is never used.
- `trace_cache` keeps traced programs and parameter shapes in `<directory>/traces`, so a second start skips tracing.
"""

from __future__ import annotations

import os
import sys

import jax
from jax.experimental.compilation_cache import compilation_cache

ENV_VAR = "LATENTDIFF_COMPILE_CACHE"
OFF_VALUES = ("off", "0", "false", "no", "none")
SUBDIRECTORY = os.path.join("latentdiff", "jax-compile")
MAX_BYTES = 8 << 30  # 8 GiB: the paper-scale CPU and GPU programs are tens of MB each
MIN_COMPILE_SECONDS = 0.0  # store every program (see the module docstring)
_active: list[str] = []  # the directory `enable` turned on in this process (empty: off)


def active_directory() -> str | None:
    """The directory `enable` turned on in this process, or None (never enabled, or switched off)."""
    return _active[-1] if _active else None


def cache_directory(environ: dict[str, str] | None = None) -> str | None:
    """The directory the CLIs cache compiled programs in, or None when switched off."""
    env = os.environ if environ is None else environ
    chosen = env.get(ENV_VAR, "").strip()
    if chosen.lower() in OFF_VALUES:
        return None
    if chosen:
        return os.path.abspath(os.path.expanduser(chosen))
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, SUBDIRECTORY)


def enable(environ: dict[str, str] | None = None) -> str | None:
    """Points JAX's persistent compilation cache at `cache_directory()`. Returns the directory in use (None: off).

    A directory that cannot be created costs a one-line warning, never the run.
    """
    env = os.environ if environ is None else environ
    _active.clear()
    if env.get("JAX_COMPILATION_CACHE_DIR"):
        _active.append(env["JAX_COMPILATION_CACHE_DIR"])
        return env["JAX_COMPILATION_CACHE_DIR"]
    directory = cache_directory(env)
    if directory is None:
        return None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        print(f"warning: compilation cache off ({directory}: {error.strerror}); set {ENV_VAR}=DIR", file=sys.stderr)
        return None
    if not env.get("JAX_COMPILATION_CACHE_MAX_SIZE"):
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    if not env.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_dir", directory)
    compilation_cache.reset_cache()  # re-read the settings even if something was compiled before
    _active.append(directory)
    return directory
