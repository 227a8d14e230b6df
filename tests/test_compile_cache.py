"""The CLIs' persistent compilation cache: created, used by a second start, and switched off by the environment."""

import os
import subprocess
import sys

from latentdiff import compile_cache

# A command-line program in miniature: run_cli around one jitted computation; prints JAX's cache events.
PROGRAM = """
import jax, jax.numpy as jnp
from latentdiff import errors
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
def main():
    step = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    return float(step(jnp.arange(64.0).reshape(8, 8) / 64))
value = errors.run_cli(main)
hits = events.count("/jax/compilation_cache/cache_hits")
misses = events.count("/jax/compilation_cache/cache_misses")
print(f"value={value:.6f} hits={hits} misses={misses}")
"""


def run_program(tmp_path, **env_vars) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LATENTDIFF_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env.update(HOME=str(tmp_path / "home"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env_vars)
    env.pop("XDG_CACHE_HOME", None)
    result = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return dict(field.split("=") for field in result.stdout.split())


def cache_entries(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith("-cache"))


def test_cache_directory_follows_the_environment(tmp_path):
    home_default = os.path.join(os.path.expanduser("~"), ".cache", "latentdiff", "jax-compile")
    assert compile_cache.cache_directory({}) == home_default
    assert compile_cache.cache_directory({"XDG_CACHE_HOME": "/x"}) == "/x/latentdiff/jax-compile"
    assert compile_cache.cache_directory({"LATENTDIFF_COMPILE_CACHE": str(tmp_path)}) == str(tmp_path)
    for off in ("off", "OFF", "0", "false", "none"):
        assert compile_cache.cache_directory({"LATENTDIFF_COMPILE_CACHE": off}) is None


def test_second_start_reads_what_the_first_compiled(tmp_path):
    first = run_program(tmp_path)  # default place: ~/.cache/latentdiff/jax-compile
    default_dir = tmp_path / "home" / ".cache" / "latentdiff" / "jax-compile"
    assert int(first["misses"]) >= 1 and int(first["hits"]) == 0
    entries = cache_entries(default_dir)
    assert entries, "the first run stored nothing"
    second = run_program(tmp_path)
    assert int(second["hits"]) >= 1 and int(second["misses"]) == 0
    assert second["value"] == first["value"]
    assert cache_entries(default_dir) == entries


def test_explicit_directory_and_switch_off(tmp_path):
    chosen = tmp_path / "chosen"
    run_program(tmp_path, LATENTDIFF_COMPILE_CACHE=str(chosen))
    assert cache_entries(chosen)
    assert not (tmp_path / "home" / ".cache").exists()

    off = run_program(tmp_path, LATENTDIFF_COMPILE_CACHE="off")
    assert int(off["hits"]) == 0 and int(off["misses"]) == 0
    assert not (tmp_path / "home" / ".cache").exists()


def test_unwritable_directory_costs_a_warning_not_the_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(LATENTDIFF_COMPILE_CACHE=str(blocker / "cache"))
    result = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: compilation cache off" in result.stderr and "LATENTDIFF_COMPILE_CACHE" in result.stderr
