"""Pre-flight: compile training's and sampling's programs for a Cloud TPU topology on this host and say, per device,
whether they fit, what they cost and how fast they could run. Nothing is allocated; no TPU is needed.

    latentdiff preflight --config configs/ldm_txt2img_kl8.py:paper --topology v5p:2x2x1 \
        --mesh data=1,fsdp=4 --global_batch 64
    latentdiff preflight --config configs/autoencoder_kl_f8.py:paper --topology v5e:2x4 \
        --mesh data=8,fsdp=1 --global_batch 64 --find_max_batch
    latentdiff preflight --config configs/ldm_txt2img_kl8.py:paper --topology cpu:8 --hbm_gib 80 \
        --mesh data=1,fsdp=8 --global_batch 64 --programs train     # fake CPU devices (e.g. to plan for GPUs)

Programs, each compiled with exactly the shardings and donation training and sampling use (`loop.state_shardings`,
`loop.jit_step`; the sampler as `Pipeline` runs it: params replicated, the batch split over every chip):
  stage 1 (stage 'autoencoder'): `ae_rec` (the step before disc_start) and `ae_gan` (generator + discriminator);
  stage 2 (stage 'ldm'): `train` (one update of global_batch x grad_accum_steps examples; images encoded by the frozen
  first stage in the step, or, with `--config.first_stage.latents=DIR` as in training, precomputed latents) and `sample`
  (the config's sampler, --sample_steps steps with classifier-free guidance, then the first-stage decoder).

Per chip it prints the state (parameters, EMA, optimizer, constants, batch: exact, from the shardings), XLA's memory
analysis (arguments, outputs, aliasing, temporaries), the peak against the chip's HBM (latentdiff/tools/tpu_chips.py)
with the margin, the model FLOPs (matmuls + convolutions of the program without remat, loops multiplied out, counted
from its jaxpr by latentdiff/tools/flop_count.py, / chips) and XLA's compiled FLOPs and bytes accessed (remat
recompute included; XLA counts a loop body once, so both are scaled by the program's loop factor, assuming the
bytes split between loop bodies and the rest as the FLOPs do), and the roofline: time per call >= max(the larger FLOP
count / peak bf16, bytes accessed / HBM bandwidth); MFU ceiling = model FLOPs / (that time x peak). Collectives over
ICI/DCN are not in the bound. --find_max_batch searches the largest global batch whose train program(s) fit.

Exit status: 0 every program fits, 1 one does not, 2 bad input (one line). Topologies need libtpu
(`pip install "jax[tpu]"`); 'cpu:N' plans on N fake CPU devices (no capacity unless --hbm_gib).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import latentdiff  # noqa: F401  (CPU XLA flags)
from latentdiff import cli_flags, errors
from latentdiff.errors import UserError
from latentdiff.tools import flop_count
from latentdiff.tools.tpu_chips import CHIPS, Chip, chip_for_topology

# Compile-only use of libtpu: never runs on a TPU, so several processes may load it at once (libtpu otherwise takes a
# machine-wide lock file and refuses a second process, e.g. a pre-flight beside the test suite).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GIB = 2.0**30
LDM_PROGRAMS = ("train", "sample")
AE_PROGRAMS = ("ae_rec", "ae_gan")


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

    @property
    def peak(self) -> int:
        """Live bytes at the program's peak: inputs + temporaries + outputs that do not reuse a donated input."""
        return self.arguments + self.temporaries + max(self.outputs - self.aliased, 0)

    @property
    def fits(self) -> bool:
        return self.capacity <= 0 or self.peak <= self.capacity


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted function with sharded abstract arguments, ready to lower and compile."""

    name: str
    batch: int
    jitted: Any
    args: tuple
    state: dict[str, int]
    model_flops_fn: Callable[[], tuple[float, float]]  # global (FLOPs, FLOPs with loop bodies once), no remat


# ----------------------------------------------------------------------------------------------------------------
# Devices


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


def check_mesh(mesh_sizes: dict[str, int], num_chips: int, topology: str) -> None:
    import numpy as np

    size = int(np.prod(list(mesh_sizes.values())))
    if size != num_chips:
        raise UserError(
            f"--mesh {mesh_sizes} has {size} devices but {topology} has {num_chips} devices; make the axis sizes "
            f"multiply to {num_chips} (e.g. data=1,fsdp={num_chips})"
        )


def check_batch(global_batch: int, shards: int, flag: str) -> None:
    if global_batch < 1 or global_batch % shards:
        raise UserError(
            f"{flag} {global_batch} must be a positive multiple of the {shards} batch shards of the mesh; "
            f"use e.g. {flag} {max(shards, shards * (global_batch // shards))}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Building the programs


def _sharded_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of a pytree sharded by `shardings` (largest shard per leaf)."""
    import jax
    import numpy as np

    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
        total += int(np.prod(sharding.shard_shape(leaf.shape), dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def _with_sharding(tree: Any, sharding: Any) -> Any:
    """ShapeDtypeStructs of `tree` carrying `sharding` (one sharding for all leaves, or a matching tree)."""
    import jax

    if not isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sharding)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _model_config(config: Any) -> Any:
    """The config whose jaxpr defines model FLOPs: no remat (no recompute), XLA attention (Pallas kernels are opaque
    to the counter; the maths is the same)."""
    config = config.copy_and_resolve_references()
    for block in ("unet", "text_encoder"):
        if block in config and "remat" in config[block]:
            config[block].remat = False
        if block in config and "attention_impl" in config[block]:
            config[block].attention_impl = "xla"
    return config


def _train_program(name: str, config: Any, task: Any, step_fn: Callable, mesh: Any, batch: dict, constants: Any):
    """The train step `step_fn` of `task` as training compiles it (loop.jit_step), on abstract sharded arguments."""
    import jax

    from latentdiff import parallel
    from latentdiff.train import loop

    key = jax.eval_shape(lambda: jax.random.key(0))
    abstract, shardings = loop.state_shardings(config, task.init_state, mesh, key)
    replicated = parallel.replicated(mesh)
    batch_sharding = parallel.batch_sharding(mesh)
    args = (
        _with_sharding(abstract, shardings),
        _with_sharding(batch, batch_sharding),
        _with_sharding(key, replicated),
        _with_sharding(constants, replicated) if constants is not None else None,
    )
    state = {
        field: _sharded_bytes(getattr(abstract, field), getattr(shardings, field))
        for field in type(abstract).__dataclass_fields__
    }
    state["constants"] = _sharded_bytes(constants, jax.tree.map(lambda _: replicated, constants)) if constants else 0
    state["batch"] = _sharded_bytes(batch, jax.tree.map(lambda _: batch_sharding, batch))
    rows = next(iter(batch.values())).shape[0]
    jitted = loop.jit_step(step_fn, shardings, mesh)
    return Program(name, rows, jitted, args, state, lambda: flop_count.model_flops(jitted, *args))


def abstract_first_stage(first_stage_config: Any) -> Any:
    """The frozen first stage of a stage-1 config, with abstract variables (nothing allocated)."""
    from latentdiff import first_stage
    from latentdiff.nn.autoencoder import build_autoencoder

    ae = first_stage_config.autoencoder
    return first_stage.FirstStage(config=ae, module=build_autoencoder(ae), variables=first_stage.abstract_variables(ae))


def source_shape(task: Any) -> tuple[int, ...]:
    """Per-example shape of the batch field stage 2 reads z0 from (LDMTask.source_key): images [res, res, 3] encoded
    in the step, or (with config.first_stage.latents) precomputed KL moments [h, w, 2c] / VQ latents [h, w, c]."""
    (h, w, c), res = task.latent_shape, task.config.data.resolution
    return {"image": (res, res, 3), "moments": (h, w, 2 * c), "latents": (h, w, c)}[task.source_key]


def ldm_programs(
    config: Any,
    first_stage_config: Any,
    mesh: Any,
    sample_mesh: Any,
    global_batch: int,
    sample_batch: int,
    sample_steps: int,
    names: tuple[str, ...],
) -> list[Program]:
    """Stage 2: the train step (global_batch x grad_accum_steps rows) and the guided sampler with decode."""
    import jax
    import numpy as np

    from latentdiff import first_stage
    from latentdiff.train import ldm

    fs = first_stage.with_compute_dtype(abstract_first_stage(first_stage_config), config.first_stage.dtype)
    config.batch_size = global_batch
    null_cond = np.zeros((), np.int32)
    if config.text_encoder.kind not in ("class", "none"):
        null_cond = np.zeros((config.text_encoder.max_length,), np.int32)

    def make_task(cfg: Any) -> Any:
        return ldm.LDMTask(cfg, fs, null_cond, 1.0)

    task = make_task(config)
    cond_shape = () if config.text_encoder.kind in ("class", "none") else (config.text_encoder.max_length,)
    programs = []
    if "train" in names:
        rows = global_batch * config.grad_accum_steps
        batch = {task.source_key: jax.ShapeDtypeStruct((rows, *source_shape(task)), np.float32)}
        if task.cond_key is not None:
            batch[task.cond_key] = jax.ShapeDtypeStruct((rows, *cond_shape), np.int32)
        program = _train_program("train", config, task, task.train_step, mesh, batch, fs.variables)
        plain_task = make_task(_model_config(config))
        plain = _train_program("train", config, plain_task, plain_task.train_step, mesh, batch, fs.variables)
        programs.append(dataclasses.replace(program, model_flops_fn=plain.model_flops_fn))
    if "sample" in names:
        if task.concat != "none":
            raise UserError(f"the sample program covers text/class-to-image; conditioning.concat={task.concat!r}")
        program = _sample_program(config, task, sample_mesh, sample_batch, sample_steps, cond_shape)
        plain_task = make_task(_model_config(config))
        plain = _sample_program(config, plain_task, sample_mesh, sample_batch, sample_steps, cond_shape)
        programs.append(dataclasses.replace(program, model_flops_fn=plain.model_flops_fn))
    return programs


def _sample_program(
    config: Any, task: Any, mesh: Any, sample_batch: int, sample_steps: int, cond_shape: tuple[int, ...]
) -> Program:
    """The guided sampler with decode as `Pipeline` runs it: EMA params and first stage replicated, the batch
    (condition, noise, per-sample keys) split over the 'data' axis of every chip."""
    import jax
    import jax.numpy as jnp

    from latentdiff import parallel, sampling

    generate = sampling.make_generate(
        unet=task.unet,
        cond_encoder=task.cond_encoder,
        fs=task.fs,
        schedule=task.schedule,
        parameterization=config.diffusion.parameterization,
        sampler=config.sampling.sampler,
        num_steps=sample_steps,
    )
    abstract = jax.eval_shape(task.init_state, jax.eval_shape(lambda: jax.random.key(0)))
    replicated = parallel.replicated(mesh)
    split = parallel.sampling_batch_sharding(mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    keys = jax.eval_shape(lambda: sampling.sampler_keys(0, jnp.arange(sample_batch)))
    args = (
        _with_sharding(abstract.ema_params, replicated),
        _with_sharding(task.fs.variables, replicated),
        scalar,
        jax.ShapeDtypeStruct((sample_batch, *cond_shape), jnp.int32, sharding=split),
        jax.ShapeDtypeStruct((1, *cond_shape), jnp.int32, sharding=replicated),
        scalar,
        scalar,
        jax.ShapeDtypeStruct((sample_batch, *task.latent_shape), jnp.float32, sharding=split),
        jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=split),
    )
    state = {
        "ema_params": _sharded_bytes(abstract.ema_params, jax.tree.map(lambda _: replicated, abstract.ema_params)),
        "constants": _sharded_bytes(task.fs.variables, jax.tree.map(lambda _: replicated, task.fs.variables)),
    }
    jitted = jax.jit(parallel.under_mesh(generate, mesh))  # as Pipeline jits it
    return Program("sample", sample_batch, jitted, args, state, lambda: flop_count.model_flops(jitted, *args))


def ae_programs(config: Any, mesh: Any, global_batch: int, names: tuple[str, ...]) -> list[Program]:
    """Stage 1: the reconstruction step (before disc_start) and the GAN step (generator + discriminator)."""
    import jax
    import numpy as np

    from latentdiff.nn.lpips import abstract_lpips_params
    from latentdiff.train.autoencoder import AutoencoderTask

    config.batch_size = global_batch
    task = AutoencoderTask(config)
    rows = global_batch * config.grad_accum_steps
    r = config.autoencoder.resolution
    batch = {"image": jax.ShapeDtypeStruct((rows, r, r, config.autoencoder.in_channels), np.float32)}
    lpips = abstract_lpips_params() if config.loss.perceptual_weight > 0 else None
    programs = []
    for name, fn in (("ae_rec", task.train_step_rec), ("ae_gan", task.train_step_gan)):
        if name in names:
            programs.append(_train_program(name, config, task, fn, mesh, batch, lpips))  # no remat in stage 1
    return programs


# ----------------------------------------------------------------------------------------------------------------
# Compiling and reporting


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
    compiled = program.jitted.lower(*program.args).compile()
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
    lines = [
        f"[{report.name}] global batch {report.batch} ({report.batch / num_chips:g} per device), {how}",
        "  state per device (GiB): " + ", ".join(parts),
    ]
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


def _report_record(report: ProgramReport, chip: Chip | None) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_mesh(text: str) -> dict[str, int]:
    """'data=1,fsdp=8' -> {'data': 1, 'fsdp': 8} (a clear error otherwise)."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise UserError(f"--mesh {text!r}: expected NAME=SIZE pairs like data=1,fsdp=8")
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            raise UserError(f"--mesh {text!r}: size of {name!r} is not an integer") from None
    if not sizes or any(v < 1 for v in sizes.values()):
        raise UserError(f"--mesh {text!r}: give every axis an explicit size >= 1 (e.g. data=1,fsdp=8)")
    return sizes


def _force_cpu_devices(count: int) -> None:
    """Fake CPU devices for a 'cpu:N' plan; must run before JAX starts (a no-op if the user set a count)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="latentdiff preflight", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/NAME.py:VARIANT (stage 'autoencoder' or 'ldm')")
    parser.add_argument(
        "--first_stage_config",
        default="",
        help="stage 2 only: the frozen autoencoder's config, e.g. configs/autoencoder_kl_f8.py:paper",
    )
    parser.add_argument("--topology", required=True, help="Cloud TPU topology (v5e:2x2, v5p:4x4x4, ...) or cpu:N")
    parser.add_argument("--chips_per_host", default="", help="host bounds X,Y,Z ('': libtpu's default)")
    parser.add_argument("--mesh", required=True, help="axis sizes whose product is the chip count, e.g. data=1,fsdp=4")
    parser.add_argument("--global_batch", type=int, required=True, help="examples per micro-batch over all chips")
    parser.add_argument("--grad_accum_steps", type=int, default=0, help="micro-batches per update (0: the config's)")
    parser.add_argument("--programs", default="", help=f"comma list of {LDM_PROGRAMS} / {AE_PROGRAMS} ('': all)")
    parser.add_argument("--sample_batch", type=int, default=0, help="sampler batch over all chips (0: --global_batch)")
    parser.add_argument("--sample_steps", type=int, default=0, help="sampler steps (0: the config's sampling.steps)")
    parser.add_argument("--find_max_batch", action="store_true", help="bisect the largest global batch that fits")
    parser.add_argument("--max_batch_limit", type=int, default=8192, help="upper end of --find_max_batch's search")
    parser.add_argument("--hbm_gib", type=float, default=0.0, help="memory per device in GiB (0: the chip's table)")
    parser.add_argument("--json", default="", help="also write the reports to this JSON file")
    args, args.config_overrides = cli_flags.parse_with_config_overrides(parser, argv)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Bad numbers and unwritable outputs, before anything compiles."""
    for flag in ("grad_accum_steps", "sample_batch", "sample_steps"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be >= 0 (0 = default), got {getattr(args, flag)}")
    if not args.hbm_gib >= 0 or args.hbm_gib == float("inf"):
        raise UserError(f"--hbm_gib must be a finite number >= 0 (0 = the chip's table), got {args.hbm_gib}")
    if args.max_batch_limit < 1:
        raise UserError(f"--max_batch_limit must be >= 1, got {args.max_batch_limit}")
    if args.json and os.path.isdir(args.json):
        raise UserError(f"--json {args.json!r} is a directory; give a file path such as {args.json}/preflight.json")
    if args.json and not os.access(os.path.dirname(os.path.abspath(args.json)), os.W_OK):
        raise UserError(f"--json {args.json!r}: its directory does not exist or is not writable")


def run(args: argparse.Namespace) -> int:
    """Compiles the requested programs; prints the report; returns the exit status (0 fits, 1 does not)."""
    import numpy as np

    check_args(args)
    mesh_sizes = parse_mesh(args.mesh)
    if args.topology.startswith("cpu:"):
        count = args.topology.partition(":")[2]
        if not count.isdigit() or int(count) < 1:
            raise UserError(f"--topology {args.topology!r}: use cpu:N with N >= 1 fake CPU devices")
        _force_cpu_devices(int(count))
    from latentdiff import config_utils, parallel

    config = config_utils.load_config(args.config)
    config_utils.apply_overrides(config, args.config_overrides)
    if args.grad_accum_steps:
        config.grad_accum_steps = args.grad_accum_steps
    known = LDM_PROGRAMS if config.stage == "ldm" else AE_PROGRAMS if config.stage == "autoencoder" else ()
    if not known:
        raise UserError(f"{args.config}: stage {config.stage!r} has no programs to plan (ldm or autoencoder)")
    names = tuple(filter(None, (n.strip() for n in args.programs.split(",")))) or known
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise UserError(f"--programs {unknown} are not programs of a {config.stage!r} config; choose from {known}")
    if config.stage == "ldm" and not args.first_stage_config:
        raise UserError("a stage-2 config needs --first_stage_config (e.g. configs/autoencoder_kl_f8.py:paper)")
    first_stage_config = config_utils.load_config(args.first_stage_config) if config.stage == "ldm" else None

    devices, chip = topology_devices(args.topology, args.chips_per_host)
    check_mesh(mesh_sizes, len(devices), args.topology)
    mesh = parallel.make_mesh(mesh_sizes, devices)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    check_batch(args.global_batch, shards, "--global_batch")
    sample_batch = args.sample_batch or args.global_batch
    if "sample" in names:
        check_batch(sample_batch, len(devices), "--sample_batch")
    capacity = int(args.hbm_gib * GIB) if args.hbm_gib else (chip.hbm_bytes if chip else 0)
    sample_mesh = parallel.make_mesh({"data": len(devices)}, devices)
    sample_steps = args.sample_steps or (config.sampling.steps if config.stage == "ldm" else 0)

    def compile_at(batch: int, which: tuple[str, ...]) -> list[ProgramReport]:
        cfg = config.copy_and_resolve_references()
        if cfg.stage == "ldm":
            programs = ldm_programs(
                cfg, first_stage_config, mesh, sample_mesh, batch, sample_batch, sample_steps, which
            )
        else:
            programs = ae_programs(cfg, mesh, batch, which)
        return [compile_program(p, capacity) for p in programs]

    head = (
        f"pre-flight {args.config} on {args.topology} ({len(devices)} devices"
        + (f", {chip.name}, {chip.hbm_gib:g} GiB HBM each" if chip else ", fake CPU devices")
        + f"), mesh {dict(mesh.shape)}"
    )
    print(head, flush=True)
    reports = []
    max_batch = None
    if args.find_max_batch:
        train_names = tuple(n for n in names if n != "sample")
        if not train_names:
            raise UserError("--find_max_batch searches the train programs' batch; --programs has none")
        if capacity <= 0:
            raise UserError("--find_max_batch needs a capacity: a TPU topology or --hbm_gib")
        limit = max(shards, args.max_batch_limit // shards * shards)
        max_batch, reports = find_max_batch(lambda b: compile_at(b, train_names), args.global_batch, shards, limit)
        print(f"largest global batch that fits: {max_batch} ({max_batch / shards:g} per batch shard)", flush=True)
        if "sample" in names:
            reports += compile_at(args.global_batch, ("sample",))
    else:
        reports = compile_at(args.global_batch, names)
    for report in reports:
        print(format_report(report, chip, len(devices)), flush=True)
    if args.json:
        record = {
            "config": args.config,
            "topology": args.topology,
            "chips": len(devices),
            "chip": dataclasses.asdict(chip) if chip else None,
            "mesh": dict(mesh.shape),
            "max_batch": max_batch,
            "programs": [_report_record(r, chip) for r in reports],
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    fits = bool(reports) and all(r.fits for r in reports) and max_batch != 0
    print(
        "verdict: " + ("fits" if fits else "DOES NOT FIT") + f" ({int(np.sum([r.fits for r in reports]))}/"
        f"{len(reports)} programs fit)",
        flush=True,
    )
    return 0 if fits else 1


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    sys.exit(errors.run_cli(lambda: run(args)))


if __name__ == "__main__":
    main(sys.argv[1:])
