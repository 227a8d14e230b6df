"""The accelerator chips the pre-flight plans for: peak bf16 compute, HBM capacity and bandwidth, one table.

Figures are Google's published per-chip specifications (the Cloud TPU system-architecture pages named in `source`,
read 2026-12). HBM capacities are taken as GiB (the TPU runtime reports 16/32/95 GiB for v5e/v6e-v4/v5p), bandwidths
as 10^9 bytes/s. A topology name 'TYPE:AxB[xC]' selects the chip by its TYPE (v4, v5e, v5p, v6e).
"""

from __future__ import annotations

import dataclasses

from latentdiff.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip's roofline figures."""

    name: str
    bf16_tflops: float  # dense peak, 10^12 FLOP/s
    hbm_gib: float  # capacity, 2^30 bytes
    hbm_gbps: float  # bandwidth, 10^9 bytes/s
    source: str

    @property
    def hbm_bytes(self) -> int:
        return int(self.hbm_gib * 2**30)

    def per_device(self, devices_per_chip: int) -> Chip:
        """The share of one JAX device when a chip shows several (v4's two TensorCores without megacore)."""
        if devices_per_chip == 1:
            return self
        n = devices_per_chip
        name = f"{self.name}, one of {n} cores"
        return Chip(name, self.bf16_tflops / n, self.hbm_gib / n, self.hbm_gbps / n, self.source)


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 275.0, 32.0, 1200.0, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 197.0, 16.0, 819.0, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 459.0, 95.0, 2765.0, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e (Trillium)", 918.0, 32.0, 1640.0, "https://cloud.google.com/tpu/docs/v6e"),
}


def chip_for_topology(topology: str) -> Chip:
    """'v5p:2x2x1' -> the v5p chip; ValueError naming the known types otherwise."""
    kind = topology.partition(":")[0].strip().lower()
    if kind not in CHIPS:
        raise UserError(
            f"unknown TPU type {kind!r} in topology {topology!r}; use TYPE:SHAPE with TYPE one of {sorted(CHIPS)} "
            "(e.g. v5e:2x2, v5p:2x2x1, v4:2x2x2, v6e:2x2)"
        )
    return CHIPS[kind]
