"""libtpu on a machine without a TPU: silent instead of three misleading warnings.

`jax[tpu]` (the `tpu` and `test` extras, for the pre-flight's compile-only TPU topologies) brings libtpu. On a CPU or
GPU machine, every process that starts JAX then prints "could not determine TPU accelerator type, please set env var
TPU_ACCELERATOR_TYPE", "unexpected worker hostname ... TPU_WORKER_HOSTNAMES" and a source location trace, although
nothing is wrong. When no TPU chip is on the PCI bus, this module gives libtpu the two values it asks for (one local
worker; an accelerator type it recognises) before JAX starts: the TPU backend still finds no chip and JAX runs on the
CPU or GPU as before, and compile-only topologies are unchanged (`get_topology_desc` takes the topology by name).
JAX's own INFO line "Unable to initialize backend 'tpu'" is filtered out too. On a TPU VM, or when either
variable is set already, nothing is changed.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os

GOOGLE_PCI_VENDOR = "0x1ae0"  # Cloud TPU chips are PCI devices of Google's vendor id
QUIET_SETTINGS = {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_ACCELERATOR_TYPE": "v4-8"}


def tpu_chip_present(sysfs: str = "/sys/bus/pci/devices") -> bool:
    """True when a Google PCI device (a TPU chip) is attached."""
    for vendor_file in glob.glob(os.path.join(sysfs, "*", "vendor")):
        try:
            with open(vendor_file) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def quiet_libtpu_without_tpu(environ: dict[str, str] | None = None, sysfs: str = "/sys/bus/pci/devices") -> bool:
    """Sets QUIET_SETTINGS when libtpu is installed, no TPU chip is present and neither variable is set -> applied."""
    env = os.environ if environ is None else environ
    if any(name in env for name in QUIET_SETTINGS) or env.get("LATENTDIFF_NO_LIBTPU_ENV"):
        return False
    if importlib.util.find_spec("libtpu") is None or tpu_chip_present(sysfs):
        return False
    env.update(QUIET_SETTINGS)
    logging.getLogger("jax._src.xla_bridge").addFilter(_NoTpuBackendNotice())
    return True


class _NoTpuBackendNotice(logging.Filter):
    """JAX logs "Unable to initialize backend 'tpu': INTERNAL: Failed to get global TPU topology" (INFO, shown by the
    programs' logging) when libtpu finds no chip: on a machine without one that is expected, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unable to initialize backend 'tpu'")
