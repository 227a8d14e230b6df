"""A training workdir's own record: one run at a time (the lock), a config that matches the workdir, and the config
history. The first run's config.json is never rewritten; a resume with a changed config appends an entry to
`config_history.jsonl` ({"time", "step", "changes": {field: [old, new]}, "config"}).

  workdir/train.lock           held (fcntl.flock) by process 0 of the run for its whole life; holds "pid host time"
  workdir/config.json          the config of the first run (what sampling and conversion read)
  workdir/config_history.jsonl one line per run whose config differed from the previous one (the first run too)

And the weights others read, without building an optimizer or a train state: a stage-1 workdir's autoencoder (its
latest checkpoint's generator params and model state, for stage 2 and `latentdiff encode`), and the stage-2 weights
sampling reads: the latest checkpoint's params / EMA params / scale factor (checkpoints/, subtree restore), or a
converted workdir's
  workdir/params/ema.safetensors    {'unet', 'cond'} (metadata: format, scale_factor, step, source)
  workdir/params/params.safetensors the non-EMA weights, when the source held both
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import functools
import json
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import ml_collections

from latentdiff import atomic_files, checkpoint, config_utils, params_io, trace_cache
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


# ------------------------------------------------------------------------------- stage-2 weights for sampling

PARAMS_DIR = "params"
EMA_FILE = "ema.safetensors"
LIVE_FILE = "params.safetensors"
CONVERTED_FORMAT = "latentdiff-converted-1"


def abstract_stage2(config: ml_collections.ConfigDict) -> dict:
    """{'unet': ..., 'cond': ...} abstract params (jax.eval_shape) of a stage-2 config (cached per model config)."""
    frozen = json.dumps({"unet": dict(config.unet), "text": dict(config.text_encoder)}, sort_keys=True)
    return trace_cache.abstract_tree(["stage2", frozen], lambda: _abstract_stage2(frozen))


@functools.lru_cache(maxsize=8)
def _abstract_stage2(frozen: str) -> dict:
    import jax

    from latentdiff.nn.text_encoder import build_text_encoder, init_tokens
    from latentdiff.nn.unet import build_unet, init_inputs

    c = config_utils.from_json(frozen)
    encoder = build_text_encoder(c.text)
    unet = build_unet({**dict(c.unet), "attention_impl": "xla"})
    size = 2 ** (len(c.unet.channel_mult) - 1)

    def init() -> dict:
        tokens = init_tokens(c.text, 1)
        cond = encoder.init(jax.random.key(0), tokens).get("params", {})  # kind "none": no params
        inputs = init_inputs(c.unet, batch=1, size=size, context_len=1)
        if inputs["context"] is not None:
            inputs["context"] = encoder.apply({"params": cond}, tokens)[:, :1]
        return {"unet": unet.init(jax.random.key(0), **inputs)["params"], "cond": cond}

    return jax.eval_shape(init)


def has_checkpoints(workdir: str) -> bool:
    """True when workdir/checkpoints holds at least one entry (a training run saved something)."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and bool(os.listdir(directory))


def has_converted_params(workdir: str) -> bool:
    return os.path.isfile(os.path.join(workdir, PARAMS_DIR, EMA_FILE))


def load_converted_params(workdir: str, config: ml_collections.ConfigDict, *, use_ema: bool) -> dict:
    """{'params': {'unet', 'cond'}, 'scale_factor': float, 'step': int} of a converted workdir (shape-checked)."""
    path = os.path.join(workdir, PARAMS_DIR, EMA_FILE if use_ema else LIVE_FILE)
    if not os.path.isfile(path):
        if not use_ema:
            raise FileNotFoundError(
                f"{workdir!r} holds only one set of weights ({PARAMS_DIR}/{EMA_FILE}; the source had no separate "
                "EMA copy): sample with --ema"
            )
        raise FileNotFoundError(f"{path!r} not found; convert the model with `latentdiff convert`")
    meta = params_io.read_metadata(path)
    if meta.get("format") != CONVERTED_FORMAT or "scale_factor" not in meta:
        raise UserError(f"{path!r} is not a converted-params file of this version (format {CONVERTED_FORMAT!r})")
    params = params_io.load_params(path, abstract_stage2(config))
    return {"params": params, "scale_factor": float(meta["scale_factor"]), "step": int(meta.get("step", "0"))}


def restore_stage2_params(workdir: str, config: ml_collections.ConfigDict) -> dict:
    """{'params', 'ema_params', 'scale_factor', 'step'} of the newest readable checkpoint of a stage-2 workdir (host
    arrays): a subtree restore against the model's abstract params; no optimizer or train state is built."""
    import jax
    import jax.numpy as jnp

    abstract = abstract_stage2(config)
    subset = {"params": abstract, "ema_params": abstract, "scale_factor": jax.ShapeDtypeStruct((), jnp.float32)}
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1000, async_save=False)
    try:
        step, restored = ckpt.restore_latest_subtree(subset)  # a damaged newest checkpoint falls back to the previous
    finally:
        ckpt.close()
    if step is None:
        raise FileNotFoundError(f"{workdir!r} has no checkpoint yet; train it first (train.py --workdir {workdir})")
    return {**jax.device_get(restored), "step": step}


def stage2_scale_factor(workdir: str) -> float:
    """The latent scale factor of a stage-2 workdir (its newest checkpoint's, or its converted params'), read alone."""
    if not has_checkpoints(workdir) and has_converted_params(workdir):
        return float(params_io.read_metadata(os.path.join(workdir, PARAMS_DIR, EMA_FILE))["scale_factor"])
    import jax
    import jax.numpy as jnp

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1000, async_save=False)
    try:
        step, restored = ckpt.restore_latest_subtree({"scale_factor": jax.ShapeDtypeStruct((), jnp.float32)})
    finally:
        ckpt.close()
    if step is None:
        raise FileNotFoundError(f"{workdir!r} has no checkpoint yet; train it first (train.py --workdir {workdir})")
    return float(jax.device_get(restored["scale_factor"]))


def read_first_stage(workdir: str) -> tuple[Any, int]:
    """(FirstStage with host variables, step) of the newest readable checkpoint of a stage-1 workdir, read-only: the
    stage-1 workdir is an input and nothing is written into it. A subtree restore of the generator params and model
    state against the autoencoder's abstract variables (no optimizer, discriminator or train state is built). Used
    by stage 2 (which copies it into its own workdir) and `latentdiff encode`."""
    import jax
    import jax.numpy as jnp

    from latentdiff.first_stage import FirstStage, abstract_autoencoder_variables
    from latentdiff.nn.autoencoder import build_autoencoder

    config = config_utils.load_workdir_config(workdir)
    if config.stage != "autoencoder":
        raise UserError(f"{workdir!r} is a {config.stage!r} workdir, not a stage-1 autoencoder workdir")
    abstract = abstract_autoencoder_variables(config.autoencoder)
    model_state = {name: tree for name, tree in abstract.items() if name != "params"}
    generator = {"autoencoder": abstract["params"], "logvar": jax.ShapeDtypeStruct((), jnp.float32)}
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1000, async_save=False)
    try:
        step, restored = ckpt.restore_latest_subtree({"gen_params": generator, "model_state": model_state})
    finally:
        ckpt.close()
    if step is None:
        raise FileNotFoundError(f"stage-1 workdir {workdir!r} has no checkpoint; train it first")
    variables = {"params": restored["gen_params"]["autoencoder"], **dict(restored["model_state"] or {})}
    module = build_autoencoder(config.autoencoder)
    return FirstStage(config=config.autoencoder, module=module, variables=variables), step
