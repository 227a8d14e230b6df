"""The training driver both stages share: sharded state, jitted step, resume, preemption, logging.

A stage supplies a `Task` (pure init and step functions plus optional image/eval callbacks); `run` does the rest:
  * mesh from config.mesh; state created already sharded (`jax.jit(init, out_shardings=...)`) or restored from the
    latest checkpoint in `workdir/checkpoints` (params, optimizer, EMA, step, counters and every process's data
    iterator position), so a run killed at any point and restarted reaches bit-identical params;
  * the step is `jax.jit` with explicit in/out shardings and the state donated; rng = fold_in(base, step);
  * SIGTERM (preemption) -> checkpoint, exit code 0 (several processes agree on the step first); non-finite updates
    are skipped inside the step and counted; `max_consecutive_nonfinite` in a row stops the run with a clear error
    (checked one step late, so the host never waits on the device just for that);
  * process 0 writes TensorBoard scalars (losses, lr, grad norm, images/s, step time, TFLOP/s, MFU), metrics.jsonl,
    config.json, a progress bar with ETA and image grids; an optional jax.profiler trace of a few steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from latentdiff import atomic_files, checkpoint, parallel
from latentdiff import workdir as workdir_lib
from latentdiff.errors import UserError

log = logging.getLogger("latentdiff")


class NonFiniteError(UserError, RuntimeError):
    """Too many consecutive non-finite updates."""


@dataclasses.dataclass
class Task:
    """What a stage contributes to the loop. All functions are pure except the callbacks."""

    init_state: Callable[[jax.Array], Any]  # rng -> state pytree (has .step, .nonfinite_count, .nonfinite_streak)
    # step number -> pure step function (state, batch, rng, constants) -> (state, metrics). Stages with phases
    # (e.g. the GAN switched on at disc_start) return a different function per phase; each is compiled once.
    step_for: Callable[[int], Callable[[Any, dict, jax.Array, Any], tuple[Any, dict]]]
    batch_keys: tuple[str, ...]  # numeric fields of host batches that go to the device
    constants: Any = None  # frozen arrays the step reads (e.g. LPIPS weights), passed as arguments, never baked in
    write_images: Callable[[Any, int, str], None] | None = None  # (state, step, out_dir), all processes call it
    evaluate: Callable[[Any], dict[str, float]] | None = None  # state -> scalars, all processes call it
    # (fresh state, its shardings) -> the state a new run starts from (fine-tuning: a base's weights); not on resume
    start_state: Callable[[Any, Any], Any] | None = None


class _Preemption:
    """Preemption (SIGTERM) -> "stop after this step", agreed by every process.

    One process: a SIGTERM handler sets a flag the loop reads between steps. Several processes: JAX's preemption
    service (started by `jax.distributed.initialize`) catches SIGTERM on any host and all hosts agree on the step
    at which to stop (`reached_preemption_sync_point`), so every host saves the same step; without that service
    each host's flag is all-gathered every step.
    """

    def __init__(self) -> None:
        self._requested = False
        self._previous: Any = None
        self._installed = False
        self._synced = False

    def __enter__(self) -> _Preemption:
        self._synced = jax.process_count() > 1 and _preemption_service_running()
        if self._synced:  # the service owns SIGTERM; a Python handler would hide the signal from it
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        except ValueError:  # not the main thread (e.g. under some test runners): no handler
            self._installed = False
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del signum, frame
        self._requested = True

    def should_stop(self, step: int) -> bool:
        """True on every process at the same step once any process was asked to stop. Call it after every step."""
        if self._synced:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return bool(np.any(multihost_utils.process_allgather(np.int32(self._requested))))
        return self._requested

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


def _preemption_service_running() -> bool:
    try:
        from jax._src import distributed

        return distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):  # private API moved: fall back to all-gathered flags
        return False


class MetricWriter:
    """Process 0 writes TensorBoard scalars and a JSONL file; other processes write nothing.

    On resume from `start_step`, rows a killed run logged after that step are dropped from metrics.jsonl and
    TensorBoard is told to purge its events after it, so every step appears once.
    """

    def __init__(self, workdir: str, enabled: bool, start_step: int) -> None:
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            truncate_metrics(path, start_step)
            self._jsonl = open(path, "a")
            try:
                from tensorboardX import SummaryWriter

                purge = {"purge_step": start_step + 1} if start_step > 0 else {}
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), **purge)
            except ImportError:  # tensorboardX is a base dependency; tolerate its absence in minimal envs
                self._tb = None

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in clean.items():
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def truncate_metrics(path: str, last_step: int) -> None:
    """Keeps the rows of a metrics.jsonl with step <= last_step (and drops a torn last line); atomic rewrite."""
    if not os.path.isfile(path):
        return
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                dropped += 1
                continue
            if int(row.get("step", 0)) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        atomic_files.write_text(path, "".join(kept))


def _progress(config: ml_collections.ConfigDict, start: int, enabled: bool) -> Any:
    if not (enabled and config.progress_bar):
        return None
    from tqdm import tqdm

    return tqdm(total=config.num_train_steps, initial=start, dynamic_ncols=True, file=sys.stderr, unit="step")


def compiled_flops(compiled: Any) -> float:
    """FLOPs of one call of a compiled executable on ONE device, from XLA's cost analysis (0 when unavailable).

    For an SPMD program the analysis describes the per-device partition (replicated work counted on every device).
    """
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return 0.0
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def throughput_scalars(
    steps: int, seconds: float, images_per_step: int, flops_per_device_step: float, num_devices: int, peak_tflops: float
) -> dict[str, float]:
    """Step time, images/s, estimated TFLOP/s (all devices) and MFU (achieved per-device FLOP/s over the peak)."""
    seconds = max(seconds, 1e-9)
    out = {
        "step_time_s": seconds / max(steps, 1),
        "steps_per_sec": steps / seconds,
        "images_per_sec": steps * images_per_step / seconds,
    }
    if flops_per_device_step > 0:
        per_device = flops_per_device_step * steps / seconds / 1e12
        out["tflops_per_sec"] = per_device * num_devices
        if peak_tflops > 0:
            out["mfu"] = per_device / peak_tflops
    return out


def state_shardings(
    config: ml_collections.ConfigDict, init_state: Callable[[jax.Array], Any], mesh: jax.sharding.Mesh, rng: Any
) -> tuple[Any, Any]:
    """(abstract state, its NamedShardings) as training lays the state out: `jax.eval_shape(init_state)` and the
    config's sharding rules (explicit regexes, then FSDP over the 'fsdp' axis). rng may be abstract."""
    abstract = jax.eval_shape(init_state, rng)
    return abstract, parallel.infer_shardings(abstract, mesh, config.sharding.rules, config.sharding.fsdp_min_size)


def jit_step(fn: Callable[[Any, dict, jax.Array, Any], tuple[Any, dict]], shardings: Any, mesh: Any) -> Any:
    """The jitted train step exactly as training runs it: (state, batch, rng, constants) -> (state, metrics) with the
    state sharded by `shardings` and donated, the batch split over the batch axes, rng and constants replicated.

    The executable also returns the non-finite streak among its metrics: metrics are not donated, so the loop can
    read them one step late without stalling the device. The pre-flight (latentdiff.tools.preflight) compiles this
    same function for TPU topologies.
    """
    replicated = parallel.replicated(mesh)

    def step_with_streak(state: Any, batch: dict, rng: jax.Array, constants: Any) -> tuple[Any, dict]:
        new_state, metrics = fn(state, batch, rng, constants)
        return new_state, {**metrics, _STREAK: new_state.nonfinite_streak}

    return jax.jit(
        parallel.under_mesh(step_with_streak, mesh),
        in_shardings=(shardings, parallel.batch_sharding(mesh), replicated, replicated),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    task: Task,
    make_train_iter: Callable[[], Any],
    mesh: jax.sharding.Mesh,
) -> Any:
    """Trains to config.num_train_steps (resuming if a checkpoint exists). Returns the final state.

    make_train_iter() -> this process's iterator of host batches (global batch / process_count examples each); with
    get_state()/set_state() its position is checkpointed per process and restored on resume.
    """
    is_main = jax.process_index() == 0
    parallel.global_batch_size_ok(config.batch_size, mesh)

    base_rng = jax.random.key(config.seed)
    init_rng = jax.random.fold_in(base_rng, -1 & 0x7FFFFFFF)
    abstract, shardings = state_shardings(config, task.init_state, mesh, init_rng)
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=config.keep_checkpoints,
        async_save=config.async_checkpointing,
        cleanup_tmp=True,
    )
    train_iter = make_train_iter()
    resumed = ckpt.restore_latest(checkpoint.abstract_with_shardings(abstract, shardings), set_aside_damaged=is_main)
    if resumed is not None:
        latest, state, data_state = resumed
        if int(jax.device_get(state.nonfinite_streak)):  # a checkpoint of an older version saved mid-streak
            state = state.replace(nonfinite_streak=jax.device_put(np.int32(0), shardings.nonfinite_streak))
        if data_state is not None and hasattr(train_iter, "set_state"):
            train_iter.set_state(data_state)
        if is_main:
            print(f"resumed from step {latest} (checkpoint {ckpt.directory}/{latest})", file=sys.stderr, flush=True)
    else:
        state = jax.jit(task.init_state, out_shardings=shardings)(init_rng)
        if task.start_state is not None:
            state = task.start_state(state, shardings)

    replicated = parallel.replicated(mesh)
    compiled_steps: dict[Callable, Any] = {}
    flops_per_step = 0.0
    compile_seconds = 0.0

    def compiled_step(step: int, *args: Any) -> Any:
        """The compiled executable of this step's function (compiled on first use; FLOPs logged from it)."""
        nonlocal flops_per_step, compile_seconds
        fn = task.step_for(step)
        if fn not in compiled_steps:
            start = time.perf_counter()
            compiled_steps[fn] = jit_step(fn, shardings, mesh).lower(*args).compile()
            flops_per_step = compiled_flops(compiled_steps[fn])
            compile_seconds += time.perf_counter() - start
        return compiled_steps[fn]

    constants = jax.device_put(task.constants, replicated) if task.constants is not None else None
    start_step = int(jax.device_get(state.step))
    if is_main:
        workdir_lib.record_config(config, workdir, start_step)
    writer = MetricWriter(workdir, is_main, start_step)
    bar = _progress(config, start_step, is_main)
    step = start_step
    window_start, window_steps, window_compile = time.perf_counter(), 0, 0.0
    profiling = False
    previous_metrics: dict | None = None
    try:
        with _Preemption() as preemption:
            while step < config.num_train_steps:
                host_batch = next(train_iter)
                batch = parallel.host_to_global({k: host_batch[k] for k in task.batch_keys}, mesh)
                rng = jax.random.fold_in(base_rng, step)
                step_fn = compiled_step(step, state, batch, rng, constants)
                if step == start_step:  # every process compiled: start the collectives together
                    parallel.wait_for_all_processes(f"latentdiff_first_step_{start_step}", config.distributed.timeout_s)
                if step == config.profile_start_step and is_main:
                    jax.profiler.start_trace(os.path.join(workdir, "profile"))
                    profiling = True
                state, metrics = step_fn(state, batch, rng, constants)
                step += 1
                window_steps += 1
                if profiling and step >= config.profile_start_step + config.profile_num_steps:
                    jax.profiler.stop_trace()
                    profiling = False
                # The previous step's streak (already computed while this step runs); the last step's is checked
                # below before returning.
                if previous_metrics is not None:
                    _check_streak(previous_metrics, step - 1, config.max_consecutive_nonfinite, ckpt, workdir)
                previous_metrics = metrics
                if bar is not None:
                    bar.update(1)
                if step % config.log_every == 0 or step == config.num_train_steps:
                    elapsed = time.perf_counter() - window_start - (compile_seconds - window_compile)
                    scalars = {k: float(v) for k, v in jax.device_get(metrics).items() if k != _STREAK}
                    scalars |= throughput_scalars(
                        window_steps,
                        elapsed,
                        config.batch_size * config.grad_accum_steps,
                        flops_per_step,
                        mesh.size,
                        config.peak_tflops,
                    )
                    scalars["nonfinite_skipped"] = float(jax.device_get(state.nonfinite_count))
                    writer.write(step, scalars)
                    if bar is not None:
                        bar.set_postfix({k: f"{scalars[k]:.4g}" for k in ("loss", "step_time_s") if k in scalars})
                    window_start, window_steps, window_compile = time.perf_counter(), 0, compile_seconds
                if task.evaluate is not None and step % config.eval_every == 0:
                    writer.write(step, {f"eval/{k}": v for k, v in task.evaluate(state).items()})
                if task.write_images is not None and step % config.image_every == 0:
                    task.write_images(state, step, os.path.join(workdir, "images"))
                if step % config.checkpoint_every == 0 or step == config.num_train_steps:
                    _save_unless_streak(ckpt, step, state, metrics, train_iter)
                if preemption.should_stop(step):
                    if ckpt.latest_step() != step:
                        _save_unless_streak(ckpt, step, state, metrics, train_iter)
                    ckpt.wait()
                    log.warning("preemption (SIGTERM): checkpoint written at step %d; exiting", step)
                    break
            if previous_metrics is not None:
                _check_streak(previous_metrics, step, config.max_consecutive_nonfinite, ckpt, workdir)
    finally:
        if profiling:
            jax.profiler.stop_trace()
        if bar is not None:
            bar.close()
        writer.close()
        ckpt.close()
    return state


_STREAK = "_nonfinite_streak"


def _save_unless_streak(ckpt: checkpoint.Checkpointer, step: int, state: Any, metrics: dict, train_iter: Any) -> None:
    """Saves, except while updates are being skipped as non-finite: a checkpoint of a run going bad would push good
    ones out of retention (reads one scalar; the save waits for the state anyway)."""
    streak = int(jax.device_get(metrics[_STREAK]))
    if streak:
        log.warning("step %d: not saving a checkpoint during %d consecutive non-finite updates", step, streak)
        return
    ckpt.save(step, state, _data_state(train_iter))


def _check_streak(metrics: dict, step: int, limit: int, ckpt: checkpoint.Checkpointer, workdir: str) -> None:
    """Stops the run (NonFiniteError) after `limit` consecutive skipped updates ending at `step`.

    The state the streak started from (step - streak: its next update was the first non-finite one) is suspect; its
    checkpoint, if one was written, is set aside as `nonfinite-<step>` so that a resume starts from the last good one.
    """
    streak = int(jax.device_get(metrics[_STREAK]))
    if streak < limit:
        return
    ckpt.wait()
    suspect = step - streak
    aside = []
    if jax.process_index() == 0:
        aside = [ckpt.set_aside(s, "nonfinite") for s in ckpt.all_steps() if s >= suspect]
    good = ckpt.latest_step()
    moved = f"; set aside {', '.join(os.path.basename(a) for a in aside)} (kept, never resumed from)" if aside else ""
    if good is None:
        resume = f"no checkpoint before it remains: a rerun on {workdir} starts from step 0"
    else:
        resume = f"the last good checkpoint is step {good} ({ckpt.directory}/{good}); rerunning resumes from it"
    raise NonFiniteError(
        f"{streak} consecutive non-finite updates, steps {suspect + 1}..{step} (loss or gradients inf/nan, each "
        f"skipped){moved}; {resume}: train.py --config CONFIG --workdir {workdir} with a lower --config.optim.lr, "
        "--config.optim.grad_clip=1.0, or checked data"
    )


def _data_state(train_iter: Iterator) -> dict:
    return train_iter.get_state() if hasattr(train_iter, "get_state") else {}


def fetch(tree: Any) -> Any:
    """Global (possibly multi-host sharded) arrays -> numpy on every process (parallel.to_host)."""
    return parallel.to_host(tree)


def scalar_metrics(**values: jax.Array) -> dict[str, jax.Array]:
    """Metrics dict with float32 scalars (what the loop logs)."""
    return {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}
