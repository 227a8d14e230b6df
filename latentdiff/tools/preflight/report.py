"""Compiling a program for its devices and reading XLA's memory and cost analyses per chip: the fit against HBM,
FLOPs, the roofline bound and MFU ceiling, the report's text and JSON record, and the largest batch that fits."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

from latentdiff.errors import UserError
from latentdiff.tools.preflight.programs import Program
from latentdiff.tools.tpu_chips import Chip

GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """One compiled program's per-chip bytes, FLOPs and fit."""

    name: str
    batch: int  # global examples per call
    state: dict[str, int]  # per-chip bytes of named inputs (exact, from the shardings)
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    flops: float  # compiled, per device (XLA cost analysis: remat recompute included, loop bodies counted once)
    bytes_accessed: float  # compiled, per device (loop bodies counted once)
    model_flops: float  # per device: matmuls + convolutions of the program without remat, loops multiplied out
    loop_factor: float  # model FLOPs with loops multiplied out / with loop bodies once (1 without loops)
    compile_seconds: float
    capacity: int  # HBM bytes per device; 0 = unknown
    compiled: Any = dataclasses.field(default=None, repr=False, compare=False)  # the executable; None: not compiled
    compiler_oom: str = ""  # the TPU compiler's own out-of-HBM verdict (then arguments = capacity + the excess)

    @property
    def peak(self) -> int:
        """Live bytes at the program's peak: inputs + temporaries + outputs that do not reuse a donated input."""
        return self.arguments + self.temporaries + max(self.outputs - self.aliased, 0)

    @property
    def fits(self) -> bool:
        return self.capacity <= 0 or self.peak <= self.capacity


def compile_program(program: Program, capacity: int) -> ProgramReport:
    """Lowers and compiles `program` for its devices; XLA's memory and cost analyses per device.

    When the program's inputs alone (exact bytes from the shardings, a lower bound of XLA's padded arguments) exceed
    `capacity`, it does not fit whatever XLA does: it is reported as such without compiling (compiled None).
    """
    from latentdiff.train.loop import compiled_flops

    inputs = sum(program.state.values())
    if 0 < capacity < inputs:
        return ProgramReport(
            program.name, program.batch, program.state, inputs, 0, 0, 0, 0.0, 0.0, 0.0, 1.0, 0.0, capacity
        )
    start = time.perf_counter()
    try:
        compiled = program.jitted.lower(*program.args).compile()
    except Exception as error:  # only the compiler's out-of-HBM verdict is a result; any other error re-raises
        excess = compiler_hbm_excess(str(error))
        if excess is None:
            raise
        text = str(error).strip().splitlines()[0][:300]
        return ProgramReport(
            program.name, program.batch, program.state, max(capacity, 0) + excess, 0, 0, 0, 0.0, 0.0, 0.0, 1.0,
            time.perf_counter() - start, capacity, compiler_oom=text,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    num_chips = len(_devices_of(program.args))
    total, once = program.model_flops_fn()
    return ProgramReport(
        name=program.name,
        batch=program.batch,
        state=program.state,
        arguments=int(memory.argument_size_in_bytes),
        outputs=int(memory.output_size_in_bytes),
        aliased=int(memory.alias_size_in_bytes),
        temporaries=int(memory.temp_size_in_bytes),
        flops=compiled_flops(compiled),
        bytes_accessed=float((cost or {}).get("bytes accessed", 0.0)),
        model_flops=total / num_chips,
        loop_factor=total / once if once > 0 else 1.0,
        compile_seconds=seconds,
        capacity=capacity,
        compiled=compiled,
    )


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def compiler_hbm_excess(message: str) -> int | None:
    """Bytes by which a program exceeds HBM, from the TPU compiler's out-of-memory error ('RESOURCE_EXHAUSTED ...
    CompileTimeHbmOom ... Ran out of memory in memory space hbm. Used 30.97G of 30.75G hbm. Exceeded hbm capacity by
    227.67M.'); None for any other error. The compiler refuses a program that does not fit the HBM it may use (on v4:
    30.75 of 32 GiB), after its own attempts to save memory."""
    import re

    if "RESOURCE_EXHAUSTED" not in message or "hbm" not in message.lower():
        return None
    match = re.search(r"Exceeded hbm capacity by ([\d.]+)\s*([KMGT]?)", message, re.IGNORECASE)
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()]) if match else 1


def _devices_of(args: tuple) -> list:
    import jax

    for leaf in jax.tree.leaves(args):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            return list(sharding.mesh.devices.flat)
    raise UserError("no sharded argument")


def roofline(report: ProgramReport, chip: Chip | None) -> dict[str, float]:
    """Lower bound of the program's time on one chip and the MFU it allows (empty without a chip)."""
    if chip is None:
        return {}
    # The larger of the two FLOP counts: XLA's leaves out padded convolution taps and computations it merged; the
    # jaxpr's leaves out remat recompute and element-wise work.
    compute_s = max(report.flops * report.loop_factor, report.model_flops) / (chip.bf16_tflops * 1e12)
    memory_s = report.bytes_accessed * report.loop_factor / (chip.hbm_gbps * 1e9)
    bound_s = max(compute_s, memory_s, 1e-12)
    return {
        "compute_s": compute_s,
        "memory_s": memory_s,
        "bound_s": bound_s,
        "mfu_ceiling": report.model_flops / (bound_s * chip.bf16_tflops * 1e12),
    }


def format_report(report: ProgramReport, chip: Chip | None, num_chips: int) -> str:
    s = report.state
    parts = [f"{k} {v / GIB:.3f}" for k, v in s.items() if v or k in ("params", "ema_params", "opt_state")]
    how = f"compiled in {report.compile_seconds:.0f} s" if report.compiled is not None else "not compiled"
    how = f"refused by the compiler after {report.compile_seconds:.0f} s" if report.compiler_oom else how
    lines = [
        f"[{report.name}] global batch {report.batch} ({report.batch / num_chips:g} per device), {how}",
        "  state per device (GiB): " + ", ".join(parts),
    ]
    if report.compiler_oom:
        lines.append(
            f"  DOES NOT FIT: the TPU compiler ran out of HBM, over by {(report.peak - report.capacity) / GIB:.2f} GiB "
            f"per device ({report.compiler_oom})"
        )
        return "\n".join(lines)
    if report.compiled is None:
        lines.append(
            f"  DOES NOT FIT: its inputs alone take {report.arguments / GIB:.3f} GiB per device, more than the "
            f"{report.capacity / GIB:g} GiB of HBM (shard the state over more chips: a larger fsdp axis)"
        )
        return "\n".join(lines)
    lines += [
        f"  XLA per device (GiB): arguments {report.arguments / GIB:.3f}, outputs {report.outputs / GIB:.3f} "
        f"(aliased {report.aliased / GIB:.3f}), temporaries {report.temporaries / GIB:.3f}, "
        f"peak {report.peak / GIB:.3f}",
    ]
    if report.capacity > 0:
        margin = report.capacity - report.peak
        verdict = "FITS" if report.fits else "DOES NOT FIT"
        lines.append(
            f"  HBM {report.capacity / GIB:g} GiB per device: {verdict} (margin {margin / GIB:+.2f} GiB, "
            f"{100 * margin / report.capacity:+.0f}%)"
        )
    else:
        lines.append("  HBM capacity unknown (CPU plan without --hbm_gib): no fit verdict")
    loops = f" x {report.loop_factor:.4g} for loops" if report.loop_factor != 1.0 else ""
    lines.append(
        f"  per device: model FLOPs {report.model_flops:.4g}; XLA FLOPs {report.flops:.4g}{loops} (incl. remat "
        f"recompute), bytes accessed {report.bytes_accessed:.4g}{loops}"
    )
    r = roofline(report, chip)
    if r:
        lines.append(
            f"  roofline on {chip.name} ({chip.bf16_tflops:g} TFLOP/s bf16, {chip.hbm_gbps:g} GB/s): compute "
            f"{1e3 * r['compute_s']:.1f} ms, HBM {1e3 * r['memory_s']:.1f} ms -> >= {1e3 * r['bound_s']:.1f} ms "
            f"per call; MFU ceiling {100 * r['mfu_ceiling']:.0f}%"
        )
    return "\n".join(lines)


def report_record(report: ProgramReport, chip: Chip | None) -> dict[str, Any]:
    """A report as JSON-able fields (the executable left out)."""
    fields = {f.name: getattr(report, f.name) for f in dataclasses.fields(report) if f.name != "compiled"}
    return {
        **fields,
        "was_compiled": report.compiled is not None,
        "peak": report.peak,
        "fits": report.fits,
        **(roofline(report, chip) if report.compiled is not None else {}),
    }


def find_max_batch(
    compile_at: Callable[[int], list[ProgramReport]], start: int, shards: int, limit: int
) -> tuple[int, list[ProgramReport]]:
    """Largest multiple of `shards` (<= limit) whose programs all fit: doubling (or halving) from `start` to a bracket
    [fits, does not fit], then probes where the line through the bracket's peaks meets the capacity (a bisection
    step when it cannot), so a paper-scale search costs a few compiles. Returns (batch, its reports); (0, the
    reports at `shards`) when one example per shard does not fit.
    """
    cache: dict[int, list[ProgramReport]] = {}

    def fits(batch: int) -> bool:
        if batch not in cache:
            cache[batch] = compile_at(batch)
            verdict = "fits" if all(r.fits for r in cache[batch]) else "does not fit"
            peak = max(r.peak for r in cache[batch]) / GIB
            print(f"  batch {batch}: peak {peak:.2f} GiB per device, {verdict}", file=sys.stderr, flush=True)
        return all(r.fits for r in cache[batch])

    if fits(start):
        lo, previous = start, None
        while True:
            probe = lo * 2
            if previous is not None:  # two fitting compiles: just past where their line meets the capacity
                probe = max(_interpolate(previous, lo, cache, shards) + shards, lo + shards)
            probe = min(probe, limit)
            if probe == lo:
                return lo, cache[lo]
            if not fits(probe):
                hi = probe
                break
            previous, lo = lo, probe
    else:
        hi = start
        while True:
            probe = max(shards, hi // 2 // shards * shards)
            if probe == hi:
                return 0, cache[hi]
            if fits(probe):
                lo = probe
                break
            hi = probe
    while hi - lo > shards:
        probe = min(max(_interpolate(lo, hi, cache, shards), lo + shards), hi - shards)
        if fits(probe):
            lo = probe
        else:
            hi = probe
    return lo, cache[lo]


def _interpolate(lo: int, hi: int, cache: dict[int, list[ProgramReport]], shards: int) -> int:
    """The batch where the peak reaches the capacity on the line through the compiles at `lo` and `hi` (XLA's memory
    grows about linearly in the batch), rounded down to a multiple of `shards`; their midpoint without a rising line.
    """

    def worst(batch: int) -> tuple[int, int]:
        report = max(cache[batch], key=lambda r: r.peak - r.capacity)
        return report.peak, report.capacity

    midpoint = (lo + hi) // 2 // shards * shards
    (p_lo, capacity), (p_hi, _) = worst(lo), worst(hi)
    if p_hi <= p_lo:
        return midpoint
    return int(lo + (capacity - p_lo) * (hi - lo) / (p_hi - p_lo)) // shards * shards
