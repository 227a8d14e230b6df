"""Orbax CheckpointManager wrapper: atomic (async) saves of the train state and the data iterator, exact resume.

A checkpoint directory `workdir/checkpoints/<step>/` holds two items: `state` (the whole train state pytree: params,
optimizer states, EMA, step, counters) and `data` (the input iterator's JSON state). Orbax writes into a temporary
directory and renames it when complete, so a run killed during a save never leaves a checkpoint that `latest_step`
would pick up half-written. Restoring takes an abstract target (`jax.eval_shape` + shardings) so the state comes back
as our pytree, already sharded over the current mesh (which may differ from the one that saved it).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """A checkpoint whose arrays do not fit the current config."""


class Checkpointer:
    """Save every N steps (async), keep K, resume from the latest."""

    def __init__(self, directory: str, *, max_to_keep: int, async_save: bool) -> None:
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None) -> None:
        """Starts an (async) save; returns once arrays are copied off the device."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
        )
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores (state, data_state) at `step` into the structure and shardings of `abstract_state`."""
        self._check_shapes(step, abstract_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
        )
        try:
            restored = self._manager.restore(step, args=args)
        except (ValueError, KeyError) as e:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not match the current config ({_first_line(e)}); "
                "use a fresh --workdir or the config it was trained with"
            ) from e
        return restored.state, dict(restored.data or {})

    def restore_subtree(self, step: int, abstract_subtree: dict) -> dict:
        """Restores only some top-level fields of the saved state as numpy (e.g. params and EMA for sampling, without
        the optimizer state); `abstract_subtree` is a dict of those fields' abstract values."""
        path = os.path.join(self.directory, str(step), "state")
        restore_args = jax.tree.map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype), abstract_subtree)
        args = ocp.args.PyTreeRestore(item=abstract_subtree, restore_args=restore_args, partial_restore=True)
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(path, args=args)

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        """Names the first parameters whose stored shape differs from the config's (clearer than orbax's message)."""
        metadata = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), "state"))
        stored = _flat_shapes(getattr(metadata.item_metadata, "tree", metadata.item_metadata))
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


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (the restore target)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
