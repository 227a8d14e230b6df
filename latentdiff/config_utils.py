"""Config files: loading `configs/NAME.py:VARIANT`, required fields, JSON round trip for workdirs.

Every config file defines `get_config(arg: str) -> ml_collections.ConfigDict` with named variants. All defaults live
in the config files; code reads fields by attribute and never supplies its own default.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import ml_collections

from latentdiff import atomic_files
from latentdiff.errors import UserError


class ConfigError(UserError):
    """A config that cannot run: names the field and the fix."""


def load_config(spec: str) -> ml_collections.ConfigDict:
    """'configs/ldm_txt2img_kl8.py:tiny' -> the ConfigDict that file's get_config('tiny') returns (without ':VARIANT',
    get_config() with its own default)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found; pass --config configs/NAME.py:VARIANT")
    module_spec = importlib.util.spec_from_file_location(f"latentdiff_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(arg)")
    return module.get_config(arg) if arg else module.get_config()


def check_variant(arg: str, variants: dict[str, Any], path: str) -> Any:
    """The value for a named variant, or a one-line error listing the valid names."""
    if arg not in variants:
        raise ConfigError(f"{path}: unknown variant {arg!r}; choose one of {sorted(variants)}")
    return variants[arg]


def check_overrides(argv: list[str], flag: str = "config") -> None:
    """One-line errors for --config.FIELD=VALUE overrides naming a field the config does not have (absl's own
    message for that is a traceback). The config file itself comes from --config=SPEC / --config SPEC."""
    spec = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag}="):
            spec = arg.split("=", 1)[1]
        elif arg == f"--{flag}" and i + 1 < len(argv):
            spec = argv[i + 1]
    if spec is None:
        return
    config = load_config(spec)
    for arg in argv:
        if arg.startswith(f"--{flag}."):
            parent_of(config, arg[len(flag) + 3 :].split("=", 1)[0])


def parent_of(config: ml_collections.ConfigDict, dotted: str) -> tuple[ml_collections.ConfigDict, str]:
    """(the ConfigDict holding field `dotted`, its last name); ConfigError naming the fields there if it is not one."""
    node: Any = config
    walked: list[str] = []
    parts = dotted.split(".")
    for part in parts:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(walked) or "the top level"
            options = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(
                f"unknown config field {dotted!r} ({part!r} is not in {where}; fields there: {', '.join(options)})"
            )
        parent, node = node, node[part]
        walked.append(part)
    return parent, parts[-1]


def apply_overrides(config: ml_collections.ConfigDict, assignments: list[str]) -> None:
    """Applies "FIELD=VALUE" assignments (dotted fields, as after --config.) in place, parsed by the field's type as
    train.py's flags do: bool true/false, int, float, str, tuples as Python literals ("(1, 2)"). ConfigError (one
    line) for an unknown field or a value that does not parse."""
    for assignment in assignments:
        dotted, sep, text = assignment.partition("=")
        if not sep:
            raise ConfigError(f"config override {assignment!r} has no '=': write FIELD=VALUE")
        parent, name = parent_of(config, dotted)
        current = parent[name]
        try:
            if isinstance(current, bool):
                if text.lower() not in ("true", "false"):
                    raise ValueError("not true or false")
                value: Any = text.lower() == "true"
            elif isinstance(current, (tuple, list)):
                value = ast.literal_eval(text)
                value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
            elif current is None or isinstance(current, str):
                value = text
            else:
                value = type(current)(text)
        except (ValueError, SyntaxError) as error:
            raise ConfigError(
                f"config field {dotted}={text!r}: not a {type(current).__name__} ({error}); "
                f"the current value is {current!r}"
            ) from None
        parent[name] = value


def require(config: ml_collections.ConfigDict, *fields: str) -> None:
    """Raises ConfigError naming each dotted field that is still None (a placeholder)."""
    for field in fields:
        node: Any = config
        for part in field.split("."):
            node = getattr(node, part)
        if node is None or node == "":
            raise ConfigError(f"config field {field} is required; set it with --config.{field}=VALUE")


def to_json(config: ml_collections.ConfigDict) -> str:
    """Stable JSON of a config (saved in each workdir as config.json)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def _tuplify(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _tuplify(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of to_json; lists come back as tuples (module fields are tuples)."""
    return ml_collections.ConfigDict(_tuplify(json.loads(text)))


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes workdir/config.json atomically."""
    os.makedirs(workdir, exist_ok=True)
    atomic_write_text(os.path.join(workdir, "config.json"), to_json(config))


def require_local_path(path: str, what: str) -> None:
    """ValueError for a URL (gs://, s3://...): workdirs are read and written through the local filesystem, where a
    URL would silently become a local folder named 'gs:'. Mount the bucket instead (README, Cloud TPU pod section)."""
    if "://" in path:
        raise UserError(
            f"{what} {path!r} is a URL, but workdirs are read and written as local paths; mount the bucket on every "
            "host (e.g. gcsfuse --implicit-dirs BUCKET /mnt/gcs) and pass the mounted path (/mnt/gcs/...)"
        )


def read_json_file(path: str, what: str) -> Any:
    """The parsed JSON file at `path`; a file that is not valid JSON is a one-line ConfigError naming it."""
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path} ({what}) is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; restore or fix the file"
        ) from None


# Config fields added after workdirs were first written, with the value every older workdir ran with: the one
# migration of old config.json files. load_workdir_config fills them in, so no other module needs a fallback.
ADDED_FIELDS = {
    ("text_encoder", "attention_impl"): "xla",  # the attention kernels came later; XLA's is what older runs used
    ("first_stage", "latents"): "",  # precomputed latents came later: older stage-2 runs encoded on the fly
    ("first_stage", "dtype"): "",  # '' = the frozen stage-1 model's own dtype, as before the field existed
    ("data", "folder_heldout"): "",  # a held-out second folder came later: older runs had none
}


def migrate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds ADDED_FIELDS that an older config lacks (in sections it has), and a stage-2 config's init_from / freeze
    (fine-tuning came later: none) and evaluation section (evaluation during training came later: off, as older runs
    trained), in place; returns it."""
    for (section, field), value in ADDED_FIELDS.items():
        if section in config and field not in config[section]:
            config[section][field] = value
    if config.get("stage") == "ldm" and "init_from" not in config:  # fine-tuning came later: older runs started fresh
        config.init_from = ""
        config.freeze = ()
    if config.get("stage") == "ldm" and "evaluation" not in config:
        from latentdiff.config_blocks import no_evaluation_block

        config.evaluation = no_evaluation_block()
    return config


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (older ones migrated: ADDED_FIELDS)."""
    require_local_path(workdir, "workdir")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{workdir!r} has no config.json; is it a latentdiff workdir (train.py --workdir)?")
    return migrate_config(ml_collections.ConfigDict(_tuplify(read_json_file(path, "the workdir's config"))))


def atomic_write_text(path: str, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    atomic_files.write_text(path, text)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Binary twin of atomic_write_text."""
    atomic_files.write_bytes(path, data)
