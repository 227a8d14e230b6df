"""A training workdir's own record: one run at a time (the lock), a config that matches the workdir, and the config
history. The first run's config.json is never rewritten; a resume with a changed config appends an entry to
`config_history.jsonl` ({"time", "step", "changes": {field: [old, new]}, "config"}).

  workdir/train.lock           held (fcntl.flock) by process 0 of the run for its whole life; holds "pid host time"
  workdir/config.json          the config of the first run (what sampling and conversion read)
  workdir/config_history.jsonl one line per run whose config differed from the previous one (the first run too)
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import ml_collections

from latentdiff import atomic_files, config_utils
from latentdiff.errors import UserError

log = logging.getLogger("latentdiff")

LOCK_FILE = "train.lock"
CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"

# Config sections that define a stage's model (a workdir's checkpoints only fit these). Fields that change how the
# same parameters are computed, not what they are, may change on resume.
MODEL_SECTIONS = {
    "ldm": ("unet", "text_encoder", "conditioning", "diffusion"),
    "autoencoder": ("autoencoder", "discriminator"),
}
IMPLEMENTATION_FIELDS = ("attention_impl", "remat", "dtype")


class WorkdirBusyError(UserError):
    """Another training run holds the workdir's lock."""


def _holder_text() -> str:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return f"pid {os.getpid()} on host {socket.gethostname()} since {now}"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


@contextlib.contextmanager
def exclusive_run(workdir: str, enabled: bool = True) -> Iterator[None]:
    """Holds workdir/train.lock for the run (process 0 only: pass enabled=False on the others); released on any exit,
    by the kernel if the process dies. A second run on the same workdir gets WorkdirBusyError naming the holder. A
    lock file left by a run that died (SIGKILL, power loss) is reported and taken over, and the half-written
    temporaries of that run (latentdiff.atomic_files) are removed."""
    if not enabled:
        yield
        return
    created = not os.path.isdir(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(path) or "another process"
            raise WorkdirBusyError(
                f"workdir {workdir!r} is in use by another training run ({holder}); wait for it to finish, stop it, or "
                "pass another --workdir"
            ) from None
        except OSError as e:  # a filesystem without locks (some FUSE mounts): warn, run unlocked
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log.warning("workdir %s: this filesystem has no file locks; not protected against a second run", workdir)
        stale = _read(path)
        if stale:
            log.warning("workdir %s: taking over the lock of a run that did not exit cleanly (%s)", workdir, stale)
            for leftover in atomic_files.remove_stale(workdir):
                log.warning("removed %s, a half-written file of that run", leftover)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text().encode(), 0)
        try:
            yield
        finally:
            os.unlink(path)
    finally:
        os.close(fd)
        if created and os.path.isdir(workdir) and not os.listdir(workdir):
            os.rmdir(workdir)  # a run refused before writing anything leaves no empty workdir behind


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out |= _flat(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def config_changes(old: dict, new: dict) -> dict[str, list]:
    """{dotted field: [old, new]} for every field that differs (absent = None)."""
    a, b = _flat(old), _flat(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def read_config_dict(workdir: str) -> dict | None:
    """The workdir's config.json as a plain dict (None when it has none); malformed JSON is a one-line error."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    return config_utils.read_json_file(path, "the workdir's config")


def check_compatible(config: ml_collections.ConfigDict, workdir: str) -> None:
    """UserError, before anything is written, when `workdir` was trained as another stage or another model."""
    saved = read_config_dict(workdir)
    if saved is None:
        return
    new = json.loads(config_utils.to_json(config))
    if saved.get("stage") != new["stage"]:
        raise UserError(
            f"workdir {workdir!r} holds a {saved.get('stage')!r} run but the config is stage {new['stage']!r}; pass "
            "another --workdir (nothing was written)"
        )
    for section in MODEL_SECTIONS.get(new["stage"], ()):
        if section not in saved or section not in new:
            continue
        changes = {
            k: v
            for k, v in config_changes(saved[section], new[section]).items()
            if k.split(".")[-1] not in IMPLEMENTATION_FIELDS and None not in v
        }
        if changes:
            field, (old, now) = next(iter(changes.items()))
            raise UserError(
                f"workdir {workdir!r} was trained with another model ({section}.{field} = {old!r}, the config says "
                f"{now!r}{f', and {len(changes) - 1} more' if len(changes) > 1 else ''}); resume with the config it "
                "was trained with or pass another --workdir (nothing was written)"
            )


def _latest_recorded(workdir: str, original: dict) -> dict:
    path = os.path.join(workdir, HISTORY_FILE)
    latest = original
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    latest = json.loads(line).get("config", latest)
    return latest


def record_config(config: ml_collections.ConfigDict, workdir: str, step: int) -> None:
    """First run: writes config.json and the first history entry. Later runs: config.json stays; a config that differs
    from the last recorded one is appended to config_history.jsonl with its changes."""
    new = json.loads(config_utils.to_json(config))
    original = read_config_dict(workdir)
    entry = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "step": step}
    if original is None:
        config_utils.save_config(config, workdir)
        entry |= {"changes": {}, "config": new}
    else:
        changes = config_changes(_latest_recorded(workdir, original), new)
        if not changes:
            return
        entry |= {"changes": changes, "config": new}
        log.warning("workdir %s: config changed on resume at step %d: %s", workdir, step, ", ".join(changes))
    with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
