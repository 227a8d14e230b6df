"""Test session set-up: 8 fake CPU devices (multi-device code is tested on CPU) before JAX initialises."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# libtpu (test extra, for the TPU pre-flight tests) is only used to compile here: let every xdist worker load it
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import latentdiff  # noqa: E402,F401  (applies the CPU XLA flags before JAX starts)
