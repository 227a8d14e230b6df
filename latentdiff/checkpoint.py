"""Orbax CheckpointManager wrapper: atomic (async) saves of the train state and the data iterator, exact resume.

A checkpoint directory `workdir/checkpoints/<step>/` holds two items: `state` (the whole train state pytree: params,
optimizer states, EMA, step, counters) and `data` (the input iterators' JSON states, one per process:
{"process_count": P, "processes": [state_0, ..., state_{P-1}]}; every process reads a different shard of the data, so
each needs its own position back). Orbax writes into a temporary directory and renames it when complete, so a run
killed during a save never leaves a checkpoint that `latest_step` would pick up half-written (the trainer removes such
leftovers on start). Restoring takes an abstract target (`jax.eval_shape` + shardings) so the state comes back as our
pytree, already sharded over the current mesh (which may differ from the one that saved it).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from latentdiff.errors import UserError

log = logging.getLogger("latentdiff")


COMMIT_MARKER = "commit_success.txt"


class CheckpointMismatchError(UserError):
    """A checkpoint whose arrays do not fit the current config."""


class CheckpointDamagedError(UserError):
    """A checkpoint that cannot be read (truncated or missing files, damaged metadata or iterator state)."""


def _write_replicated_arrays_whole() -> None:
    """In a single process, write each array from one of its device copies instead of orbax's "replica-parallel"
    default, which splits a replicated array into one slice per device so that several hosts can share the write.
    With all devices in one process there is nobody to share with, and each slice is a separate small XLA program:
    the first save of a tiny model on 8 CPU devices spent 10 of its 10.5 s compiling ~170 of them. Multi-host runs keep
    orbax's default. (Orbax reads its array handler from a process-wide registry; this replaces that entry.)"""
    global _ARRAYS_WHOLE
    if jax.process_count() == 1 and not _ARRAYS_WHOLE:
        handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
        absl_logger = logging.getLogger("absl")  # orbax warns "overriding jax.Array" at every replacement: intended
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)
        try:
            ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
        finally:
            absl_logger.setLevel(level)
        _ARRAYS_WHOLE = True


_ARRAYS_WHOLE = False  # set once this process's orbax registry holds the whole-array handler


class Checkpointer:
    """Save every N steps (async), keep K, resume from the latest."""

    def __init__(self, directory: str, *, max_to_keep: int, async_save: bool, cleanup_tmp: bool = False) -> None:
        """cleanup_tmp: delete temporary directories left by a save that was killed (the trainer only; a reader such
        as sampling must not, since a running trainer may be writing one)."""
        self.directory = os.path.abspath(directory)
        _write_replicated_arrays_whole()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=cleanup_tmp,
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None) -> None:
        """Starts an (async) save; returns once arrays are copied off the device. Every process calls it with its own
        iterator state (`data_state`); all of them are stored (a collective when there are several processes)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(pack_data_states(gather_process_states(data_state or {}))),
        )
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict | None]:
        """Restores (state, this process's data_state) at `step` into the structure and shardings of `abstract_state`.

        The data state is None when the checkpoint holds none usable for this process (see `unpack_data_state`).
        CheckpointMismatchError when its shapes do not fit the config; CheckpointDamagedError when it cannot be read.
        """
        self._check_committed(step)
        self._check_shapes(step, abstract_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
        )
        try:
            restored = self._manager.restore(step, args=args)
            data = dict(restored.data or {})
            data_state = unpack_data_state(data, jax.process_index(), jax.process_count())
        except Exception as e:  # shapes matched above: any failure to read is damage
            raise CheckpointDamagedError(f"{type(e).__name__}: {_first_line(e)}") from e
        return restored.state, data_state

    def restore_latest(self, abstract_state: Any, set_aside_damaged: bool) -> tuple[int, Any, dict | None] | None:
        """(step, state, data_state) of the newest checkpoint that restores, or None when there is none.

        A damaged checkpoint is skipped with a warning naming what was wrong, and (set_aside_damaged: the trainer's
        process 0) renamed to `damaged-<step>` so that it is kept but never picked again; then the previous one is
        tried. A checkpoint that does not fit the config stops (CheckpointMismatchError): falling back would hide it.
        """
        steps = sorted(self.all_steps(), reverse=True)
        problems = []
        for step in steps:
            try:
                return (step, *self.restore(step, abstract_state))
            except CheckpointDamagedError as e:
                problems.append(f"{step}: {e}")
                aside = self.set_aside(step, "damaged") if set_aside_damaged else None
                log.warning(
                    "checkpoint %s/%d is damaged (%s)%s; falling back to the previous one",
                    self.directory,
                    step,
                    e,
                    f", moved to {aside}" if aside else "",
                )
        if problems:
            raise CheckpointDamagedError(
                f"no usable checkpoint in {self.directory} ({len(problems)} damaged; newest {problems[0]}); restore "
                "the files from a copy, or start over in a new --workdir"
            )
        return None

    def set_aside(self, step: int, reason: str) -> str:
        """Renames checkpoint `step` to `<reason>-<step>` (nothing is deleted; a numbered name is never reused) and
        returns the new path; later latest_step() / all_steps() no longer see it."""
        source = os.path.join(self.directory, str(step))
        target = os.path.join(self.directory, f"{reason}-{step}")
        suffix = 1
        while os.path.exists(target):
            suffix += 1
            target = os.path.join(self.directory, f"{reason}-{step}.{suffix}")
        self._manager.wait_until_finished()
        os.rename(source, target)
        self._manager.reload()
        return target

    def restore_subtree(self, step: int, abstract_subtree: dict) -> dict:
        """Restores only some top-level fields of the saved state as numpy (e.g. params and EMA for sampling, without
        the optimizer state); `abstract_subtree` is a dict of those fields' abstract values."""
        self._check_committed(step)
        path = os.path.join(self.directory, str(step), "state")
        restore_args = jax.tree.map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype), abstract_subtree)
        args = ocp.args.PyTreeRestore(item=abstract_subtree, restore_args=restore_args, partial_restore=True)
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(path, args=args)

    def restore_latest_subtree(self, abstract_subtree: dict) -> tuple[int | None, dict | None]:
        """(step, subtree) of the newest checkpoint whose subtree reads (readers: a damaged newest checkpoint is
        skipped with a warning, never moved, since a trainer may be running); (None, None) when there is none."""
        steps = sorted(self.all_steps(), reverse=True)
        for step in steps:
            try:
                return step, self.restore_subtree(step, abstract_subtree)
            except Exception as e:  # orbax raises many types for truncated / missing files
                log.warning(
                    "checkpoint %s/%d is damaged (%s: %s); using the previous one",
                    self.directory,
                    step,
                    type(e).__name__,
                    _first_line(e),
                )
        if steps:
            raise CheckpointDamagedError(
                f"no readable checkpoint in {self.directory} ({len(steps)} damaged); restore the files from a copy"
            )
        return None, None

    def read_numpy(self, step: int) -> dict:
        """The whole saved state at `step` as nested dicts/lists of numpy arrays, without a target: works on any
        device topology (e.g. inspecting or comparing checkpoints written by a multi-host run on one CPU)."""
        metadata = self._manager.item_metadata(step)["state"]
        metadata = getattr(metadata, "tree", metadata)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
        path = os.path.join(self.directory, str(step), "state")
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))

    def _check_committed(self, step: int) -> None:
        """Orbax finishes every save by writing `commit_success.txt` into the step and each item; a checkpoint
        without them was not completely saved or copied (CheckpointDamagedError)."""
        step_dir = os.path.join(self.directory, str(step))
        for where in (step_dir, os.path.join(step_dir, "state"), os.path.join(step_dir, "data")):
            if not os.path.isfile(os.path.join(where, COMMIT_MARKER)):
                raise CheckpointDamagedError(
                    f"commit marker {os.path.relpath(os.path.join(where, COMMIT_MARKER), self.directory)} missing: "
                    "the save or the copy of this checkpoint is incomplete"
                )

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        """Names the first parameters whose stored shape differs from the config's (clearer than orbax's message).
        Unreadable metadata is CheckpointDamagedError."""
        try:
            metadata = self._manager.item_metadata(step)["state"]
            if metadata is None:
                raise FileNotFoundError("no state metadata")
        except Exception as e:  # orbax raises many types for missing / damaged metadata
            raise CheckpointDamagedError(f"metadata unreadable: {type(e).__name__}: {_first_line(e)}") from e
        stored = _flat_shapes(getattr(metadata, "tree", metadata))
        wanted = _flat_shapes(abstract_state)
        problems = [f"{k}: checkpoint {stored.get(k)} vs config {v}" for k, v in wanted.items() if stored.get(k) != v]
        problems += [f"{k}: in checkpoint, not in config" for k in stored if k not in wanted]
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not match the current config ({'; '.join(problems[:3])}"
                f"{' ...' if len(problems) > 3 else ''}); use a fresh --workdir or the config it was trained with"
            )

    def wait(self) -> None:
        """Blocks until pending async saves are finalised."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def gather_process_states(local: dict) -> list[dict]:
    """Every process's JSON-serialisable `local` dict, in process order (a collective for several processes)."""
    if jax.process_count() == 1:
        return [local]
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(local, sort_keys=True).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(encoded.size))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: encoded.size] = encoded
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(gathered[i, : lengths[i]]).decode()) for i in range(len(lengths))]


def pack_data_states(states: list[dict]) -> dict:
    """Per-process iterator states -> the checkpoint's `data` item."""
    return {"process_count": len(states), "processes": states}


def unpack_data_state(saved: dict, process_index: int, process_count: int) -> dict | None:
    """This process's iterator state from a checkpoint's `data` item; None (with a warning) when there is none for it.

    A checkpoint written by a different number of processes cannot restore the data positions (each process's shard
    of the data changes with the count); training then continues with freshly started iterators.
    """
    if not saved:
        return None
    if "processes" not in saved:  # a single iterator state (older checkpoints)
        states, count = [saved], 1
    else:
        states, count = list(saved["processes"]), int(saved["process_count"])
    if count != process_count:
        log.warning(
            "checkpoint data positions were saved by %d process(es), this run has %d: the input pipeline restarts "
            "from its beginning (parameters and optimizer state are restored exactly)",
            count,
            process_count,
        )
        return None
    return dict(states[process_index]) or None


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (the restore target)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    """'/'-joined key names -> shapes. Names only, so orbax's metadata (plain dicts and lists) and our pytrees
    (dataclasses, namedtuples) give the same keys."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
