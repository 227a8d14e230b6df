"""What a second start can skip besides XLA compilation: tracing. Owner of `<compile cache>/traces/`.

With the compilation cache on (`compile_cache.enable`, as every CLI does), a warm start still traced the sampler
(Python running the whole UNet, ~1 s for the demo model) and the models' `init` for their parameter shapes, before
XLA's cache could answer. This module keeps both on disk beside the compiled programs:
- `exported(jitted, settings)`: the jitted program serialized with `jax.export` on its first call, keyed by its
  settings and its arguments' shapes, dtypes and shardings; a later process deserializes it and runs `jax.jit` of
  the exported call, whose compilation the persistent cache then answers. A program that cannot be serialized (host
  callbacks, e.g. Pallas interpret mode; custom calls jax.export refuses) runs as `jitted`, and its entry says so,
  so later starts do not trace it once more for nothing.
- `abstract_tree(settings, compute)`: a tree of `jax.ShapeDtypeStruct` (a model's parameter shapes) as JSON.

Every key covers the settings, the versions of Python, jax, jaxlib and flax, and a digest of latentdiff's own source
files, so an edited model, an upgraded JAX or another argument shape never reuses a stale entry. Files are written
atomically; an unreadable entry is recomputed and replaced; beyond MAX_BYTES the least recently used are removed.
Off (everything computed as before) when the compilation cache is off, or when the library is imported without a
CLI having enabled it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import jax

from latentdiff import atomic_files, compile_cache

SUBDIRECTORY = "traces"
UNSERIALIZABLE = b"latentdiff: not serializable"  # the entry of a program jax.export refused
MAX_BYTES = 1 << 30  # entries beyond 1 GiB are evicted, least recently used first (every library edit adds keys)
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def directory() -> str | None:
    """<active compilation cache>/traces, or None when the cache is off."""
    active = compile_cache.active_directory()
    return None if active is None else os.path.join(active, SUBDIRECTORY)


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over latentdiff's .py files (path and content): any edit to the library changes every key."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(PACKAGE_DIR):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, PACKAGE_DIR).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def entry_key(kind: str, settings: Any) -> str:
    """sha256 hex of (kind, settings as JSON, versions, source digest)."""
    import flax
    import jaxlib

    versions = [sys.version, jax.__version__, jaxlib.__version__, flax.__version__, source_digest()]
    text = json.dumps([kind, settings, versions], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _read(path: str) -> bytes | None:
    """The entry's bytes (None when absent); marks it used (its mtime) for the eviction order."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        os.utime(path)
        return data
    except OSError:
        return None


def _store(path: str, data: bytes) -> None:
    """Atomic write, then eviction beyond MAX_BYTES; a cache that cannot be written only costs the next start its
    saving."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_files.write_bytes(path, data)
        evict(os.path.dirname(path), MAX_BYTES)
    except OSError:
        pass


def evict(folder: str, max_bytes: int) -> list[str]:
    """Removes the least recently used entries (oldest mtime) until the folder's entries fit in max_bytes; returns
    the removed names. Entries another process removes meanwhile are skipped."""
    entries = []
    for name in os.listdir(folder):
        try:
            info = os.stat(os.path.join(folder, name))
        except OSError:
            continue
        entries.append((info.st_mtime, info.st_size, name))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, name in sorted(entries):
        if total <= max_bytes:
            break
        try:
            os.remove(os.path.join(folder, name))
        except OSError:
            continue
        total -= size
        removed.append(name)
    return removed


# ----- abstract trees (parameter shapes) -----
def _tree_to_json(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _tree_to_json(v) for k, v in tree.items()}
    return {"shape": list(tree.shape), "dtype": str(tree.dtype)}


def _tree_from_json(data: Any) -> Any:
    if set(data) == {"shape", "dtype"} and isinstance(data["shape"], list):
        return jax.ShapeDtypeStruct(tuple(data["shape"]), data["dtype"])
    return {k: _tree_from_json(v) for k, v in data.items()}


def abstract_tree(settings: Any, compute: Callable[[], dict]) -> dict:
    """compute() — a nested dict of ShapeDtypeStruct, e.g. jax.eval_shape of a model's init — read from the cache
    when `settings` (everything compute depends on, as JSON-able data) was seen before."""
    folder = directory()
    if folder is None:
        return compute()
    path = os.path.join(folder, f"abstract-{entry_key('abstract', settings)}.json")
    data = _read(path)
    if data is not None:
        try:
            return _tree_from_json(json.loads(data))
        except (ValueError, TypeError, AttributeError):
            pass  # damaged entry: recompute and replace it
    tree = compute()
    _store(path, json.dumps(_tree_to_json(tree)).encode())
    return tree


# ----- exported programs (tracing skipped) -----
def _argument_signature(args: tuple) -> list:
    """Shapes, dtypes and shardings of a call's arguments, with the tree structure: what a program's key needs."""
    leaves, treedef = jax.tree.flatten(args)
    return [str(treedef), [[str(jax.typeof(x)), str(getattr(x, "sharding", None))] for x in leaves]]


class Exported:
    """A jitted program whose tracing is cached on disk (see the module docstring); call it like `jitted`."""

    def __init__(self, jitted: Callable[..., Any], settings: Any):
        self.jitted, self.settings = jitted, settings
        self._by_signature: dict[str, Callable[..., Any]] = {}

    def __call__(self, *args: Any) -> Any:
        folder = directory()
        if folder is None:
            return self.jitted(*args)
        signature = json.dumps(_argument_signature(args))
        if signature not in self._by_signature:
            self._by_signature[signature] = self._load_or_export(folder, signature, args)
        return self._by_signature[signature](*args)

    def _load_or_export(self, folder: str, signature: str, args: tuple) -> Callable[..., Any]:
        from jax import export

        devices = [jax.default_backend(), jax.device_count(), jax.process_count()]
        path = os.path.join(folder, f"program-{entry_key('exported', [self.settings, signature, devices])}.bin")
        data = _read(path)
        if data == UNSERIALIZABLE:
            return self.jitted  # an earlier start found it cannot be exported: do not trace it twice again
        if data is not None:
            try:
                return jax.jit(export.deserialize(bytearray(data)).call)
            except Exception:
                pass  # a damaged or foreign entry: export again and replace it
        try:
            program = export.export(self.jitted)(*args)
            serialized = program.serialize()
        except Exception:
            _store(path, UNSERIALIZABLE)
            return self.jitted  # not serializable (host callbacks, custom calls export refuses): run it as traced
        _store(path, bytes(serialized))
        return jax.jit(program.call)


def exported(jitted: Callable[..., Any], settings: Any) -> Callable[..., Any]:
    """`jitted` (a jax.jit function) with its tracing cached: `settings` must hold everything the traced program
    depends on besides its arguments (configs, sampler, steps, ...) as JSON-able data."""
    return Exported(jitted, settings)
