"""The devices of a Cloud TPU topology name, from libtpu's compile-only topologies (no TPU needed), or fake CPU
devices ('cpu:N'); and the figures of one device."""

from __future__ import annotations

import importlib.util
import os

from latentdiff.errors import UserError
from latentdiff.tools.tpu_chips import CHIPS, Chip, chip_for_topology

# Compile-only use of libtpu: never runs on a TPU, so several processes may load it at once (libtpu otherwise takes a
# machine-wide lock file and refuses a second process, e.g. a pre-flight beside the test suite).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(topology: str, chips_per_host: str) -> tuple[list, Chip | None]:
    """Devices of a named topology ('v5p:2x2x1' via libtpu, or 'cpu:N' fake CPU devices) and the figures of one
    device (None: CPU). chips_per_host: 'X,Y,Z' host bounds ('' = libtpu's default; shapes smaller than it get their
    own shape, e.g. v5e:1x1 is one chip on one host)."""
    import jax

    if topology.startswith("cpu:"):
        count = int(topology.partition(":")[2])
        devices = jax.devices("cpu")
        if len(devices) < count:
            raise UserError(f"--topology {topology}: only {len(devices)} CPU devices exist (XLA_FLAGS set elsewhere?)")
        return devices[:count], None
    chip = chip_for_topology(topology)
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(
            f'--topology {topology} needs the TPU compiler (libtpu): pip install "jax[tpu]=={jax.__version__}" '
            "(or plan on fake CPU devices with --topology cpu:N)"
        )
    from jax.experimental import topologies

    shape = [int(x) for x in topology.partition(":")[2].lower().split("x") if x.isdigit()]
    bounds = _host_bounds(chips_per_host, shape)
    kwargs = {"chips_per_host_bounds": bounds} if bounds else {}
    kwargs |= {"chip_config_name": "megacore"} if chip is CHIPS["v4"] else {}  # as v4 VMs run: 1 device per chip
    try:
        topo = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
    except Exception as error:  # libtpu's own error text is long and multi-line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"libtpu cannot build topology {topology!r} ({first}); use TYPE:SHAPE names like v5e:2x2, v5e:2x4, "
            "v5p:2x2x1, v5p:4x4x4, v4:2x2x1, v6e:2x2 (and --chips_per_host X,Y,Z for other host shapes)"
        ) from None
    devices = list(topo.devices)
    per_chip = len(devices) // max(1, len({tuple(d.coords) for d in devices}))
    return devices, chip.per_device(per_chip)


def _host_bounds(chips_per_host: str, shape: list[int]) -> tuple[int, ...] | None:
    """--chips_per_host 'X,Y,Z' -> (X, Y, Z); '' -> None (libtpu's default of 2x2x1), or the topology's own shape
    when it is smaller than that (one host)."""
    if chips_per_host:
        try:
            bounds = tuple(int(x) for x in chips_per_host.split(","))
        except ValueError:
            bounds = ()
        if len(bounds) != 3 or min(bounds) < 1:
            raise UserError(f"--chips_per_host {chips_per_host!r}: expected three sizes >= 1 like 2,2,1")
        return bounds
    full = [*shape, 1, 1, 1][:3]
    return tuple(full) if full[0] * full[1] * full[2] < 4 and len(shape) >= 2 else None
