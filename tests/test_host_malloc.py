"""latentdiff/_host_malloc.py: glibc malloc tuning only when opted in, never over the user's own settings."""

import os
import subprocess
import sys

import pytest

from latentdiff import _host_malloc as hm


def test_off_unless_opted_in():
    assert not hm.should_tune({})
    assert not hm.should_tune({hm.OPT_IN: "0"})
    assert not hm.apply_malloc_settings({})
    assert hm.should_tune({hm.OPT_IN: "1"})


@pytest.mark.parametrize("own", [{"MALLOC_ARENA_MAX": "4"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}])
def test_never_over_the_users_own_malloc_settings(own):
    environ = {hm.OPT_IN: "1", **own}
    assert not hm.should_tune(environ)
    assert not hm.apply_malloc_settings(environ)


def test_settings_keep_freed_buffers_in_the_heap():
    assert hm.malloc_settings(cpu_count=2) == {hm.M_ARENA_MAX: 2, hm.M_MMAP_MAX: 0, hm.M_TRIM_THRESHOLD: 2**31 - 1}
    assert hm.malloc_settings(cpu_count=0)[hm.M_ARENA_MAX] == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt exists on Linux only")
def test_applies_when_opted_in_on_linux():
    # In a child process: mallopt changes the whole process, and this one runs the rest of the suite.
    code = "import sys; from latentdiff import _host_malloc as hm; sys.exit(0 if hm.apply_malloc_settings() else 1)"
    own = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX")
    env = {**{k: v for k, v in os.environ.items() if k not in own}, hm.OPT_IN: "1"}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0  # glibc's mallopt accepted all
