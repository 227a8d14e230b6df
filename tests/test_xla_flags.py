"""latentdiff/_xla_flags.py: the CPU defaults are added only where they are safe and never override the user."""

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
