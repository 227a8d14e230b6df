"""The trace cache: a second start reads parameter shapes and traced programs instead of tracing them again."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latentdiff import compile_cache, trace_cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh active compilation cache for one test (the session's one is restored afterwards)."""
    monkeypatch.setattr(compile_cache, "_active", [str(tmp_path)])
    return tmp_path / trace_cache.SUBDIRECTORY


def test_abstract_tree_is_computed_once_and_read_back(cache_dir):
    calls = []

    def compute():
        calls.append(1)
        return {
            "conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32)},
            "s": jax.ShapeDtypeStruct((), "bfloat16"),
        }

    first = trace_cache.abstract_tree(["model", 1], compute)
    second = trace_cache.abstract_tree(["model", 1], compute)
    assert len(calls) == 1
    assert second == first
    assert second["conv"]["kernel"].shape == (3, 3, 4, 8) and second["s"].dtype == jnp.bfloat16
    trace_cache.abstract_tree(["model", 2], compute)  # other settings: another entry
    assert len(calls) == 2 and len(os.listdir(cache_dir)) == 2


def test_a_damaged_entry_is_recomputed_and_replaced(cache_dir):
    compute = lambda: {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
    trace_cache.abstract_tree(["m"], compute)
    (entry,) = cache_dir.iterdir()
    entry.write_text("{not json")
    assert trace_cache.abstract_tree(["m"], compute) == compute()
    assert trace_cache.abstract_tree(["m"], lambda: 1 / 0) == compute()  # replaced: read back, not computed


def test_off_computes_every_time_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_cache, "_active", [])
    calls = []
    trace_cache.abstract_tree(["m"], lambda: calls.append(1) or {})
    trace_cache.abstract_tree(["m"], lambda: calls.append(1) or {})
    assert len(calls) == 2 and trace_cache.directory() is None


def traced_counter():
    """A jitted function that counts its tracings (Python runs only while tracing)."""
    traces = []

    def f(x, y):
        traces.append(1)
        return jnp.tanh(x @ y.T).sum(axis=0) * 2.0

    return jax.jit(f), traces


def test_a_second_start_runs_the_stored_program_without_tracing(cache_dir):
    x, y = jnp.arange(12.0).reshape(3, 4) / 12, jnp.ones((5, 4))
    jitted, traces = traced_counter()
    first = trace_cache.exported(jitted, {"name": "f"})(x, y)
    assert len(traces) == 1 and len(list(cache_dir.glob("program-*.bin"))) == 1
    jitted_again, traces_again = traced_counter()  # a new process in miniature: nothing traced yet
    second = trace_cache.exported(jitted_again, {"name": "f"})(x, y)
    assert traces_again == []
    np.testing.assert_array_equal(np.asarray(second), np.asarray(first))
    np.testing.assert_array_equal(np.asarray(second), np.asarray(jitted(x, y)))


def test_other_shapes_settings_or_source_give_other_programs(cache_dir, monkeypatch):
    x, y = jnp.ones((3, 4)), jnp.ones((5, 4))
    jitted, _traces = traced_counter()
    trace_cache.exported(jitted, {"name": "f"})(x, y)
    trace_cache.exported(jitted, {"name": "f"})(x[:2], y)  # another shape
    trace_cache.exported(jitted, {"name": "f", "steps": 2})(x, y)  # other settings
    monkeypatch.setattr(trace_cache, "source_digest", lambda: "edited")
    trace_cache.exported(jitted, {"name": "f"})(x, y)  # the library's code changed
    assert len(list(cache_dir.glob("program-*.bin"))) == 4


def test_a_program_that_cannot_be_serialized_runs_as_traced(cache_dir, monkeypatch):
    seen = []
    jitted = jax.jit(lambda x: jax.pure_callback(lambda v: seen.append(1) or np.asarray(v) * 3, x, x) + 1)
    out = trace_cache.exported(jitted, {"name": "callback"})(jnp.ones(3))
    np.testing.assert_array_equal(np.asarray(out), np.full(3, 4.0))
    (entry,) = cache_dir.glob("program-*.bin")
    assert seen and entry.read_bytes() == trace_cache.UNSERIALIZABLE
    tried = []
    monkeypatch.setattr(jax.export, "export", lambda *a, **k: tried.append(1) / 0)
    again = trace_cache.exported(jitted, {"name": "callback"})(jnp.ones(3))  # a later start: no export attempt
    np.testing.assert_array_equal(np.asarray(again), np.full(3, 4.0))
    assert tried == []


def test_a_damaged_program_is_exported_again(cache_dir):
    x, y = jnp.ones((3, 4)), jnp.ones((5, 4))
    jitted, _traces = traced_counter()
    expected = np.asarray(trace_cache.exported(jitted, {"name": "f"})(x, y))
    (entry,) = cache_dir.glob("program-*.bin")
    entry.write_bytes(b"garbage")
    again, traces_again = traced_counter()
    np.testing.assert_array_equal(np.asarray(trace_cache.exported(again, {"name": "f"})(x, y)), expected)
    assert len(traces_again) == 1 and entry.read_bytes() != b"garbage"


def test_least_recently_used_entries_are_evicted_beyond_the_cap(tmp_path):
    for index, name in enumerate(["a", "b", "c", "d"]):
        (tmp_path / name).write_bytes(b"x" * 100)
        os.utime(tmp_path / name, (1000 + index, 1000 + index))
    os.utime(tmp_path / "a", (2000, 2000))  # "a" was read last: kept
    assert trace_cache.evict(str(tmp_path), 250) == ["b", "c"]
    assert sorted(os.listdir(tmp_path)) == ["a", "d"]
    assert trace_cache.evict(str(tmp_path), 250) == []
