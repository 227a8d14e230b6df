"""XLA settings applied before JAX initialises, so users get the fast CPU path without knowing about it.

Measured on a 2-core x86 CPU with jaxlib 0.10.2 (../bench/RESULTS.md): routing convolutions through Eigen instead of
YNNPACK makes a UNet train step ~1.6x faster. A flag the user already set in XLA_FLAGS is never overridden.
With several host-platform devices (--xla_force_host_platform_device_count > 1, as the tests use) nothing is added:
there the Eigen convolution path corrupted images (the top rows of the first image of each device's shard in the
demo's decoder, differing by up to 255 levels from a single-device run; jaxlib 0.10.2), and YNNPACK's did not.
"""

from __future__ import annotations

import os
import re

# flag name -> value; applied only when the user's XLA_FLAGS does not mention the flag.
CPU_FLAGS: dict[str, str] = {
    "--xla_cpu_experimental_ynn_fusion_type": "-individual_convolution",
}


def apply_cpu_flags(environ: dict[str, str] | None = None) -> str:
    """Adds CPU_FLAGS to XLA_FLAGS unless the user set them (or LATENTDIFF_NO_XLA_FLAGS=1). Returns XLA_FLAGS.

    XLA reads XLA_FLAGS when the first backend starts, so this works as long as it runs before any JAX computation.
    """
    env = os.environ if environ is None else environ
    if env.get("LATENTDIFF_NO_XLA_FLAGS"):
        return env.get("XLA_FLAGS", "")
    current = env.get("XLA_FLAGS", "")
    if host_device_count(current) > 1:
        return current
    extra = [f"{name}={value}" for name, value in CPU_FLAGS.items() if name not in current]
    if extra:
        env["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return env.get("XLA_FLAGS", "")


def host_device_count(xla_flags: str) -> int:
    """The --xla_force_host_platform_device_count in an XLA_FLAGS string (1 when absent)."""
    match = re.search(r"--xla_force_host_platform_device_count=(\d+)", xla_flags)
    return int(match.group(1)) if match else 1
