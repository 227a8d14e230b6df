"""`latentdiff preflight`: flags, bad-input checks, and the run that compiles the requested programs and prints
the per-chip report (latentdiff/tools/preflight/__init__.py describes it)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import latentdiff  # noqa: F401  (CPU XLA flags)
from latentdiff import cli_flags, errors
from latentdiff.errors import UserError
from latentdiff.tools import preflight
from latentdiff.tools.preflight import programs, topology
from latentdiff.tools.preflight.report import (
    GIB,
    ProgramReport,
    compile_program,
    find_max_batch,
    format_report,
    report_record,
)


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
    parser = argparse.ArgumentParser(prog="latentdiff preflight", description=preflight.__doc__.splitlines()[0])
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
    parser.add_argument(
        "--programs", default="", help=f"comma list of {programs.LDM_PROGRAMS} / {programs.AE_PROGRAMS} ('': all)"
    )
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
    known = {"ldm": programs.LDM_PROGRAMS, "autoencoder": programs.AE_PROGRAMS}.get(config.stage, ())
    if not known:
        raise UserError(f"{args.config}: stage {config.stage!r} has no programs to plan (ldm or autoencoder)")
    names = tuple(filter(None, (n.strip() for n in args.programs.split(",")))) or known
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise UserError(f"--programs {unknown} are not programs of a {config.stage!r} config; choose from {known}")
    if config.stage == "ldm" and not args.first_stage_config:
        raise UserError("a stage-2 config needs --first_stage_config (e.g. configs/autoencoder_kl_f8.py:paper)")
    first_stage_config = config_utils.load_config(args.first_stage_config) if config.stage == "ldm" else None

    devices, chip = topology.topology_devices(args.topology, args.chips_per_host)
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
            built = programs.ldm_programs(
                cfg, first_stage_config, mesh, sample_mesh, batch, sample_batch, sample_steps, which
            )
        else:
            built = programs.ae_programs(cfg, mesh, batch, which)
        return [compile_program(p, capacity) for p in built]

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
            "programs": [report_record(r, chip) for r in reports],
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
