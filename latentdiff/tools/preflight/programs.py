"""The programs the pre-flight compiles, built exactly as training and sampling build them (`loop.state_shardings`,
`loop.jit_step`; the sampler as `Pipeline` jits it), on abstract sharded arguments: nothing is allocated."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from latentdiff.errors import UserError
from latentdiff.tools import flop_count

LDM_PROGRAMS = ("train", "sample")
AE_PROGRAMS = ("ae_rec", "ae_gan")


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted function with sharded abstract arguments, ready to lower and compile."""

    name: str
    batch: int
    jitted: Any
    args: tuple
    state: dict[str, int]
    model_flops_fn: Callable[[], tuple[float, float]]  # global (FLOPs, FLOPs with loop bodies once), no remat


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
    from latentdiff.first_stage import FirstStage, abstract_autoencoder_variables
    from latentdiff.nn.autoencoder import build_autoencoder

    ae = first_stage_config.autoencoder
    return FirstStage(config=ae, module=build_autoencoder(ae), variables=abstract_autoencoder_variables(ae))


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

    from latentdiff.train import ldm

    first_stage = abstract_first_stage(first_stage_config).with_compute_dtype(config.first_stage.dtype)
    config.batch_size = global_batch
    null_cond = np.zeros((), np.int32)
    if config.text_encoder.kind not in ("class", "none"):
        null_cond = np.zeros((config.text_encoder.max_length,), np.int32)

    def make_task(cfg: Any) -> Any:
        return ldm.LDMTask(cfg, first_stage, null_cond, 1.0)

    task = make_task(config)
    cond_shape = () if config.text_encoder.kind in ("class", "none") else (config.text_encoder.max_length,)
    programs = []
    if "train" in names:
        rows = global_batch * config.grad_accum_steps
        batch = {task.source_key: jax.ShapeDtypeStruct((rows, *source_shape(task)), np.float32)}
        if task.cond_key is not None:
            batch[task.cond_key] = jax.ShapeDtypeStruct((rows, *cond_shape), np.int32)
        program = _train_program("train", config, task, task.train_step, mesh, batch, first_stage.variables)
        plain_task = make_task(_model_config(config))
        plain = _train_program("train", config, plain_task, plain_task.train_step, mesh, batch, first_stage.variables)
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

    from latentdiff import generation, parallel

    generate = generation.make_generate(
        unet=task.unet,
        cond_encoder=task.cond_encoder,
        first_stage=task.first_stage,
        schedule=task.schedule,
        parameterization=config.diffusion.parameterization,
        sampler=config.sampling.sampler,
        num_steps=sample_steps,
    )
    abstract = jax.eval_shape(task.init_state, jax.eval_shape(lambda: jax.random.key(0)))
    replicated = parallel.replicated(mesh)
    split = parallel.sampling_batch_sharding(mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    keys = jax.eval_shape(lambda: generation.sampler_keys(0, jnp.arange(sample_batch)))
    args = (
        _with_sharding(abstract.ema_params, replicated),
        _with_sharding(task.first_stage.variables, replicated),
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
        "constants": _sharded_bytes(
            task.first_stage.variables, jax.tree.map(lambda _: replicated, task.first_stage.variables)
        ),
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
