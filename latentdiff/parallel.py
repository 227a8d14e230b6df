"""Device mesh, sharding rules, multi-host initialisation and host -> global batches. One helper for both stages.

The modern pjit: `jax.jit` with `NamedSharding`s over a `Mesh` whose axes are ('data', 'fsdp') (+ 'tensor' when
asked for). Parameter shardings are inferred from `jax.eval_shape(init)` by a rule list:
  1. explicit rules from the config: (regex over the '/'-joined param path, spec tuple of axis names or None);
  2. otherwise FSDP: shard the largest dimension divisible by the 'fsdp' axis size over 'fsdp', for params with at
     least `fsdp_min_size` elements; small or indivisible params are replicated.
The batch is sharded over ('data', 'fsdp') on its leading dimension.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from latentdiff._libtpu_env import tpu_chip_present
from latentdiff.errors import UserError

BATCH_AXES = ("data", "fsdp")
MESH_AXES = ("data", "fsdp", "tensor")


def init_distributed(coordinator: str, num_processes: int, process_id: int, *, timeout_s: int) -> None:
    """Starts multi-host JAX (call before any other JAX call). A single-process run does nothing.

    timeout_s (config.distributed.timeout_s): how long every process waits for all the others to join, here and at
    `wait_for_all_processes` (loaded machines and large pods start processes minutes apart).

    Sources, first match wins:
      1. the arguments (--config.distributed.coordinator/num_processes/process_id), each falling back to the usual
         env vars JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (GPU/CPU clusters, any launcher);
      2. num_processes == -1 ("auto"), a Cloud TPU pod slice (TPU_WORKER_HOSTNAMES / MEGASCALE_*) or a SLURM job with
         more than one task: JAX detects coordinator, process count and id itself (`jax.distributed.initialize()`
         without arguments; on TPU VMs from the metadata server, so pass num_processes=-1 there).
    Raises ValueError for a half-given multi-process setup (e.g. a coordinator but no process id).
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    if process_id < 0:
        process_id = int(os.environ.get("JAX_PROCESS_ID", "-1") or -1)
    # (TPU_WORKER_HOSTNAMES alone is no sign of a pod: latentdiff._libtpu_env sets it on machines without a TPU chip)
    pod_env = os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")
    on_tpu_pod = bool(pod_env) and tpu_chip_present()
    on_slurm = "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    explicit = bool(coordinator) or num_processes > 1 or num_processes < -1
    if _distributed_initialized():
        return
    if num_processes == -1:
        jax.distributed.initialize(initialization_timeout=timeout_s)
        return
    if explicit:
        if not coordinator or num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(
                f"multi-process setup is incomplete (coordinator={coordinator!r}, num_processes={num_processes}, "
                f"process_id={process_id}); set all three: --config.distributed.coordinator=HOST:PORT "
                "--config.distributed.num_processes=N --config.distributed.process_id=I (or JAX_COORDINATOR_ADDRESS, "
                "JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
            )
        if num_processes > 1:
            jax.distributed.initialize(
                coordinator_address=coordinator,
                num_processes=num_processes,
                process_id=process_id,
                initialization_timeout=timeout_s,
            )
    elif on_tpu_pod or on_slurm:
        jax.distributed.initialize(initialization_timeout=timeout_s)


def wait_for_all_processes(name: str, timeout_s: int) -> None:
    """Blocks until every process reaches the barrier `name` (through the coordination service, not a device
    collective), for at most timeout_s. Used before the first step: CPU collectives (gloo) give peers only 30 s to
    connect, which processes that compiled at different speeds on a loaded machine can miss."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:  # not started by jax.distributed: nothing to wait on
        return
    client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))


def _distributed_initialized() -> bool:
    is_initialized = getattr(jax.distributed, "is_initialized", None)
    return bool(is_initialized()) if is_initialized is not None else False


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves one -1 entry to "the rest of the devices"; checks the product equals num_devices."""
    sizes = {name: int(axis_sizes[name]) for name in MESH_AXES if name in axis_sizes}
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise UserError(f"unknown mesh axes {sorted(unknown)}; valid axes are {MESH_AXES}")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise UserError(f"mesh: at most one axis may be -1, got {free}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1])) if sizes else 1
    if free:
        if num_devices % fixed:
            raise UserError(f"mesh {dict(axis_sizes)}: {num_devices} devices are not divisible by {fixed}")
        sizes[free[0]] = num_devices // fixed
    if int(np.prod(list(sizes.values()))) != num_devices:
        raise UserError(f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices but {num_devices} exist")
    return sizes


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes ('data', 'fsdp'[, 'tensor']) from e.g. {'data': -1, 'fsdp': 1}.

    Built as `jax.sharding.Mesh` (not jax.make_mesh, whose Explicit axis types break old-style code). Devices are laid
    out by `mesh_utils.create_device_mesh` (TPU: neighbours on the ICI torus share the inner axes; multi-slice TPU:
    'data' spans the slices over DCN); elsewhere, and whenever that fails, in `jax.devices()` order, which keeps each
    process's devices together so every process feeds a contiguous block of the global batch.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(axis_sizes, len(devices))
    sizes.setdefault("data", 1)
    sizes.setdefault("fsdp", 1)
    names = tuple(name for name in MESH_AXES if name in sizes)
    shape = [sizes[n] for n in names]
    return Mesh(_device_grid(shape, devices), names)


def _device_grid(shape: list[int], devices: list[jax.Device]) -> np.ndarray:
    if devices[0].platform == "tpu":
        from jax.experimental import mesh_utils

        try:
            num_slices = len({getattr(d, "slice_index", 0) for d in devices})
            if num_slices > 1 and shape[0] % num_slices == 0:
                dcn = [num_slices] + [1] * (len(shape) - 1)
                ici = [shape[0] // num_slices, *shape[1:]]
                return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
            return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            pass
    return np.array(devices, dtype=object).reshape(shape)


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
    """Shards the largest dimension divisible by fsdp_size; replicates small or indivisible arrays."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return P(*spec)
    return P()


def infer_shardings(
    abstract_tree: Any,
    mesh: Mesh,
    rules: Sequence[tuple[str, Sequence[str | None]]],
    fsdp_min_size: int,
) -> Any:
    """A NamedSharding for every leaf of `abstract_tree` (from jax.eval_shape), by explicit rules then FSDP."""
    fsdp_size = mesh.shape.get("fsdp", 1)
    compiled = [(re.compile(pattern), tuple(spec)) for pattern, spec in rules]

    def leaf_sharding(path: tuple, leaf: Any) -> NamedSharding:
        name = "/".join(_path_name(k) for k in path)
        shape = tuple(getattr(leaf, "shape", ()))
        for pattern, spec in compiled:
            if pattern.fullmatch(name):
                if len(spec) > len(shape):
                    raise UserError(f"sharding rule {pattern.pattern!r} has {len(spec)} axes but {name} is {shape}")
                return NamedSharding(mesh, P(*spec))
        return NamedSharding(mesh, fsdp_spec(shape, fsdp_size, fsdp_min_size))

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_tree)


def _path_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def under_mesh(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
    """`fn` traced with `mesh` as the abstract-mesh context, so code inside it that must place work per device
    itself (the Pallas attention kernel's shard_map) sees the mesh the program is compiled for."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of scalars and anything every device holds whole."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ('data', 'fsdp')."""
    return NamedSharding(mesh, P(BATCH_AXES))


def sampling_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sampling's batch: the leading dimension split over the 'data' axis of a ('data',) mesh of every device
    (`latentdiff.pipeline.Pipeline`; the pre-flight compiles the sampler with it)."""
    return NamedSharding(mesh, P("data"))


def global_batch_size_ok(global_batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the batch axes and over the processes."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch_size % shards:
        raise UserError(
            f"batch_size {global_batch_size} is not divisible by the {shards} batch shards of mesh {dict(mesh.shape)}; "
            "set --config.batch_size to a multiple"
        )
    if global_batch_size % jax.process_count():
        raise UserError(f"batch_size {global_batch_size} is not divisible by {jax.process_count()} processes")


def to_host(tree: Any) -> Any:
    """Global (possibly multi-host sharded) arrays -> numpy, the whole arrays on every process (an all-gather across
    processes when there are several)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def put_global(tree: Any, sharding: NamedSharding) -> Any:
    """Values every process holds whole (numpy or process-local arrays, PRNG key arrays included) -> global arrays
    with `sharding` over all processes' devices; arrays that are already global are resharded. One process: the same
    as jax.device_put (with several, device_put refuses a sharding over devices this process cannot address)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, tree)


def host_to_global(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's share of the batch -> global arrays sharded over the batch axes (numeric fields only)."""
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if value.dtype.kind in "biuf":
            out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def create_sharded(
    init_fn: Callable[..., Any],
    mesh: Mesh,
    rules: Sequence[tuple[str, Sequence[str | None]]],
    fsdp_min_size: int,
    *args: Any,
) -> tuple[Any, Any]:
    """Runs `init_fn(*args)` under jit with inferred out_shardings (born sharded). Returns (state, shardings)."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = infer_shardings(abstract, mesh, rules, fsdp_min_size)
    state = jax.jit(init_fn, out_shardings=shardings)(*args)
    return state, shardings


def describe_shardings(shardings: Any, abstract: Any) -> list[str]:
    """Human-readable 'path shape spec' lines (for logs and the memory plan)."""
    flat_s = traverse_util.flatten_dict(_to_dict(shardings), sep="/")
    flat_a = traverse_util.flatten_dict(_to_dict(abstract), sep="/")
    return [f"{k} {tuple(flat_a[k].shape)} {flat_s[k].spec}" for k in sorted(flat_s)]


def _to_dict(tree: Any) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(_path_name(k) for k in path): leaf for path, leaf in leaves}
