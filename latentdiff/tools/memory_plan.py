"""Per-device memory of a stage-2 train step at any scale, planned on fake CPU devices (nothing is allocated).

    python -m latentdiff.tools.memory_plan --config configs/ldm_txt2img_kl8.py:paper --mesh data=1,fsdp=8 \
        --global_batch 64

Builds the LDM task from abstract shapes (the first stage from --first_stage_config's autoencoder block, default
configs/autoencoder_kl_f8.py:paper, with abstract variables), infers the shardings exactly as training does, lowers and
compiles the jitted train step (state donated) for a mesh of fake CPU devices, and prints per-device bytes: parameters,
EMA, optimizer state and frozen first stage (from the shardings, exact) and the compiled program's arguments, outputs,
aliasing and temporaries (from XLA's memory analysis). The CPU compiler's temporaries are an estimate of what a TPU/GPU
needs (fusion and rematerialisation differ by backend); the state bytes are exact for any backend.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import sys
import time
from typing import Any

import latentdiff  # noqa: F401  (CPU XLA flags)
from latentdiff import errors


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one train step (state fields from the shardings; the rest from XLA)."""

    mesh: dict[str, int]
    global_batch: int
    grad_accum_steps: int
    num_params: int
    params: int
    ema: int
    optimizer: int
    other_state: int
    first_stage: int
    batch: int
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    generated_code: int
    compile_seconds: float

    @property
    def peak(self) -> int:
        """Live bytes at the step's peak: inputs + temporaries + outputs that do not reuse a donated input."""
        return self.arguments + self.temporaries + max(self.outputs - self.aliased, 0)


def parse_mesh(text: str) -> dict[str, int]:
    """'data=1,fsdp=8' -> {'data': 1, 'fsdp': 8} (a clear error otherwise)."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--mesh {text!r}: expected NAME=SIZE pairs like data=1,fsdp=8")
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--mesh {text!r}: size of {name!r} is not an integer") from None
    if not sizes or any(v < 1 for v in sizes.values()):
        raise ValueError(f"--mesh {text!r}: give every axis an explicit size >= 1 (e.g. data=1,fsdp=8)")
    return sizes


def apply_overrides(config: Any, overrides: list[str]) -> None:
    """Sets 'a.b=VALUE' fields (VALUE parsed as a Python literal, else kept as a string)."""
    for item in overrides:
        field, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        *parents, leaf = field.split(".")
        node = config
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, value)


def _sharded_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of a pytree sharded by `shardings` (largest shard per leaf)."""
    import jax
    import numpy as np

    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
        shard = sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def plan(
    config: Any,
    first_stage_config: Any,
    mesh_sizes: dict[str, int],
    global_batch: int,
    devices: list | None = None,
) -> MemoryPlan:
    """Compiles the stage-2 train step for `mesh_sizes` over `devices` (default: all) from abstract shapes only."""
    import jax
    import numpy as np

    from latentdiff import first_stage, parallel
    from latentdiff.nn.autoencoder import build_autoencoder
    from latentdiff.params_io import count
    from latentdiff.train import ldm

    if config.stage != "ldm":
        raise ValueError(f"memory_plan plans stage-2 (ldm) configs; {config.stage!r} given")
    ae_cfg = first_stage_config.autoencoder
    config.batch_size = global_batch
    fs = first_stage.FirstStage(
        config=ae_cfg, module=build_autoencoder(ae_cfg), variables=first_stage.abstract_variables(ae_cfg)
    )
    null_cond = np.zeros((config.text_encoder.max_length,), np.int32)
    if config.text_encoder.kind == "class":
        null_cond = np.zeros((), np.int32)
    task = ldm.LDMTask(config, fs, null_cond, 1.0)
    num_devices = int(np.prod(list(mesh_sizes.values())))
    devices = list(jax.devices() if devices is None else devices)[:num_devices]
    if len(devices) < num_devices:
        raise ValueError(f"mesh {mesh_sizes} needs {num_devices} devices, {len(devices)} available")
    mesh = parallel.make_mesh(mesh_sizes, devices)
    parallel.global_batch_size_ok(global_batch, mesh)

    key = jax.eval_shape(lambda: jax.random.key(0))
    abstract = jax.eval_shape(task.init_state, key)
    shardings = parallel.infer_shardings(abstract, mesh, config.sharding.rules, config.sharding.fsdp_min_size)
    replicated = parallel.replicated(mesh)
    rows = global_batch * config.grad_accum_steps
    res = config.data.resolution
    batch = {"image": jax.ShapeDtypeStruct((rows, res, res, 3), np.float32)}
    cond_shape = (rows,) if config.text_encoder.kind == "class" else (rows, config.text_encoder.max_length)
    if task.cond_key is not None:  # None: unconditional apart from concat inputs (super-resolution)
        batch[task.cond_key] = jax.ShapeDtypeStruct(cond_shape, np.int32)
    batch_sharding = parallel.batch_sharding(mesh)

    def with_sharding(tree: Any, sharding: Any) -> Any:
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sharding)

    args = (
        with_sharding(abstract, shardings),
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding) for k, v in batch.items()},
        jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), fs.variables),
    )
    start = time.perf_counter()
    compiled = (
        jax.jit(
            task.train_step,
            in_shardings=(shardings, batch_sharding, replicated, replicated),
            out_shardings=(shardings, replicated),
            donate_argnums=(0,),
        )
        .lower(*args)
        .compile()
    )
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    fields = {"params": abstract.params, "ema_params": abstract.ema_params, "opt_state": abstract.opt_state}
    per_field = {k: _sharded_bytes(v, getattr(shardings, k)) for k, v in fields.items()}
    state_total = _sharded_bytes(abstract, shardings)
    replicated_tree = jax.tree.map(lambda _: replicated, fs.variables)
    return MemoryPlan(
        mesh=dict(mesh.shape),
        global_batch=global_batch,
        grad_accum_steps=config.grad_accum_steps,
        num_params=count(abstract.params),
        params=per_field["params"],
        ema=per_field["ema_params"],
        optimizer=per_field["opt_state"],
        other_state=state_total - sum(per_field.values()),
        first_stage=_sharded_bytes(fs.variables, replicated_tree),
        batch=_sharded_bytes(batch, jax.tree.map(lambda _: batch_sharding, batch)),
        arguments=int(memory.argument_size_in_bytes),
        outputs=int(memory.output_size_in_bytes),
        aliased=int(memory.alias_size_in_bytes),
        temporaries=int(memory.temp_size_in_bytes),
        generated_code=int(memory.generated_code_size_in_bytes),
        compile_seconds=seconds,
    )


def format_plan(p: MemoryPlan) -> str:
    gib = 2.0**30
    lines = [
        f"mesh {p.mesh}  global batch {p.global_batch} x {p.grad_accum_steps} micro-batches  "
        f"params {p.num_params / 1e9:.3f}B  compile {p.compile_seconds:.0f}s",
        "per device (GiB):",
        f"  parameters        {p.params / gib:8.3f}",
        f"  EMA parameters    {p.ema / gib:8.3f}",
        f"  optimizer state   {p.optimizer / gib:8.3f}",
        f"  other state       {p.other_state / gib:8.3f}",
        f"  first stage       {p.first_stage / gib:8.3f}",
        f"  batch             {p.batch / gib:8.3f}",
        f"  XLA arguments     {p.arguments / gib:8.3f}",
        f"  XLA outputs       {p.outputs / gib:8.3f}  (aliased to donated inputs {p.aliased / gib:.3f})",
        f"  XLA temporaries   {p.temporaries / gib:8.3f}",
        f"  peak (args + temp + non-aliased outputs) {p.peak / gib:8.3f}",
    ]
    return "\n".join(lines)


def _force_cpu_devices(count: int) -> None:
    """Fake CPU devices for the plan; must run before JAX starts (a no-op if the user set a count)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="stage-2 config, configs/NAME.py:VARIANT")
    parser.add_argument("--first_stage_config", default="configs/autoencoder_kl_f8.py:paper")
    parser.add_argument("--mesh", required=True, help="axis sizes, e.g. data=1,fsdp=8")
    parser.add_argument("--global_batch", type=int, required=True, help="examples per micro-batch over all devices")
    parser.add_argument("--grad_accum_steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override")
    args = parser.parse_args(argv)

    def run() -> None:
        import numpy as np

        mesh_sizes = parse_mesh(args.mesh)
        _force_cpu_devices(int(np.prod(list(mesh_sizes.values()))))
        from latentdiff.config_utils import load_config

        config = load_config(args.config)
        apply_overrides(config, args.set)
        if args.grad_accum_steps is not None:
            config.grad_accum_steps = args.grad_accum_steps
        result = plan(config, load_config(args.first_stage_config), mesh_sizes, args.global_batch)
        print(format_plan(result))

    errors.run_cli(run)


if __name__ == "__main__":
    main(sys.argv[1:])
