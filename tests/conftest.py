"""Test session set-up: 8 fake CPU devices (multi-device code is tested on CPU) before JAX initialises."""

import atexit
import os
import shutil
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# libtpu (test extra, for the TPU pre-flight tests) is only used to compile here: let every xdist worker load it
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One compilation cache per test session, shared by the xdist workers (they inherit this environment) and by every CLI
# a test starts: the many subprocess runs of the same tiny configs (resume after a kill, two-process runs, CLI checks)
# compile each program once. A fresh directory, so nothing from an earlier run or the user's own cache is reused.
if "LATENTDIFF_COMPILE_CACHE" not in os.environ:
    _session_cache = tempfile.mkdtemp(prefix="latentdiff-test-compile-cache-")
    os.environ["LATENTDIFF_COMPILE_CACHE"] = _session_cache
    atexit.register(shutil.rmtree, _session_cache, ignore_errors=True)

import latentdiff  # noqa: E402,F401  (applies the CPU XLA flags before JAX starts)
from latentdiff import compile_cache  # noqa: E402

compile_cache.enable()

import jax  # noqa: E402

# Synchronous dispatch in the test processes (not in the CLIs they start, which inherit no such setting). Pallas
# interpret mode runs kernel grids through io_callbacks that dispatch JAX ops themselves; with asynchronous CPU
# dispatch the main thread can queue its next eager op behind a running kernel whose callback then waits behind that
# op: a deadlock (a clean-clone CI run hung in tests/test_attention_pallas.py with the main thread in jnp.pad and an
# XLA thread's callback in lax.unstack, both idle; seen once before under load). Read when the CPU client starts.
jax.config.update("jax_cpu_enable_async_dispatch", False)

# The longest test files first (measured, `--durations`): xdist hands out whole files (--dist loadfile) in collection
# order when given --no-loadscope-reorder, as the Makefile does (by default it orders files by their test count, which
# put the 5-minute README run last), so starting the long ones early keeps both workers busy to the end instead of
# one finishing a long file alone.
LONGEST_FIRST = (
    "test_readme_commands.py",
    "test_train_scale.py",
    "test_train_smoke.py",
    "test_image_modification.py",
    "test_resume.py",
    "test_concat_conditioning.py",
    "test_latents.py",
    "test_attention_pallas.py",
    "test_convert_pipeline.py",
    "test_eval_scripts.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept
