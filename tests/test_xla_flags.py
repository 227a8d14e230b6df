"""latentdiff/_xla_flags.py: the CPU defaults are added only where they are safe and never override the user."""

import pytest

from latentdiff import _xla_flags

CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def test_adds_the_cpu_defaults_to_a_single_device_run():
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    flags = _xla_flags.apply_cpu_flags(env)
    assert flags.startswith("--xla_dump_to=/tmp/x ") and f"{CONV_FLAG}=-individual_convolution" in flags
    assert env["XLA_FLAGS"] == flags


def test_never_overrides_a_flag_the_user_set_or_the_opt_out():
    env = {"XLA_FLAGS": f"{CONV_FLAG}=all"}
    assert _xla_flags.apply_cpu_flags(env) == f"{CONV_FLAG}=all"
    env = {"XLA_FLAGS": "", "LATENTDIFF_NO_XLA_FLAGS": "1"}
    assert _xla_flags.apply_cpu_flags(env) == ""


def test_adds_nothing_with_several_host_devices():
    """The Eigen convolution path corrupted sampled images on 8 host devices (see the module docstring)."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert _xla_flags.apply_cpu_flags(env) == "--xla_force_host_platform_device_count=8"
    assert _xla_flags.host_device_count("--xla_force_host_platform_device_count=1") == 1
    assert CONV_FLAG in _xla_flags.apply_cpu_flags({"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})


def test_libtpu_without_a_tpu_starts_silently(tmp_path):
    """With jax[tpu] installed (the test extra) on a machine with no TPU chip, starting JAX printed three warnings
    about TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES; after `import latentdiff` it prints nothing."""
    import importlib.util
    import os
    import subprocess
    import sys

    from latentdiff import _libtpu_env

    if importlib.util.find_spec("libtpu") is None or _libtpu_env.tpu_chip_present():
        pytest.fail("this test needs libtpu installed (make install-test) on a machine without a TPU chip")
    env = {k: v for k, v in os.environ.items() if k not in _libtpu_env.QUIET_SETTINGS}
    code = "import logging, latentdiff, jax; logging.basicConfig(level=logging.INFO); print(jax.devices()[0].platform)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "cpu", run.stderr
    assert "TPU_ACCELERATOR_TYPE" not in run.stderr and "TPU_WORKER_HOSTNAMES" not in run.stderr, run.stderr
    assert "Unable to initialize backend 'tpu'" not in run.stderr, run.stderr  # JAX's INFO line (the CLIs show INFO)
    # a TPU chip on the PCI bus, or a variable the user set: left alone
    (tmp_path / "0000:00:04.0").mkdir()
    (tmp_path / "0000:00:04.0" / "vendor").write_text("0x1ae0\n")
    assert not _libtpu_env.quiet_libtpu_without_tpu({}, sysfs=str(tmp_path))
    assert not _libtpu_env.quiet_libtpu_without_tpu({"TPU_ACCELERATOR_TYPE": "v5p-8"}, sysfs=str(tmp_path / "none"))
    quiet: dict[str, str] = {}
    assert _libtpu_env.quiet_libtpu_without_tpu(quiet, sysfs=str(tmp_path / "none")) and quiet["TPU_ACCELERATOR_TYPE"]
