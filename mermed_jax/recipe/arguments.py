"""Config files and their `key=value` arguments.

Configs are code (configs/*.py); each starts from `schema.paper_recipe()` and changes what it
needs. `get_config("variant=S/16,global_batch=256")`-style arguments override fields by dotted
name or by a short alias listed in ALIASES.
"""

import ast
import importlib.util
import pathlib
from collections.abc import Mapping

import ml_collections

# Short names accepted in config arguments.
ALIASES = {
    "variant": "model.variant",
    "batch": "global_batch",
    "memory": "memory.size",
    "partition": "memory.partition_size",
    "shards": "memory.num_shards",
}


def parse_arguments(arg: str | None) -> dict[str, str]:
    """'key=value,key=value' as {key: raw value}: what a config pops its own options from (a data
    root, a sweep part) before apply_arguments sets the rest as fields."""
    parsed: dict[str, str] = {}
    for item in arg.split(",") if arg else ():
        if "=" not in item:
            raise ValueError(f"config argument {item!r}: expected key=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        parsed[key] = raw
    return parsed


def apply_arguments(config: ml_collections.ConfigDict, arg: str | Mapping[str, str] | None) -> ml_collections.ConfigDict:
    """Applies 'key=value,key=value', or parse_arguments' mapping (values parsed as Python literals,
    else strings)."""
    for key, raw in (arg if isinstance(arg, Mapping) else parse_arguments(arg)).items():
        path = ALIASES.get(key, key)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = config
        *parents, leaf = path.split(".")
        for p in parents:
            if p not in node:
                raise KeyError(f"config argument {key!r}: no config section {p!r}")
            node = node[p]
        if leaf not in node:
            raise KeyError(f"config argument {key!r}: unknown key {path!r}")
        node[leaf] = value
    return config


def load_config_file(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """Imports a config file and calls its get_config(arg), as config_flags does for the CLIs."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"mermed_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
