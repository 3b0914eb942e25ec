"""Loading a config: YAML, then dotted command-line overrides, each value checked against its field's type,
then validated once (dist_cl.config.validation) before any process group or data is touched.

Unknown keys are refused with the closest known one; ints are accepted as floats, never the reverse.
"""

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from dist_cl.config.schema import FREE_FORM, Config, ConfigError
from dist_cl.config.validation import validate

_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted as floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(c) for c in typing.get_args(tp))
            raise ConfigError(f"{key}={value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}={value!r}: expected null")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if tp is dict and isinstance(value, dict):
        return value
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(
            f"{key}={value!r} is a {type(value).__name__}; expected {getattr(tp, '__name__', tp)}"
        )
    return value


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted} must be a mapping of {tp.__name__} fields, got {value!r}")
            kwargs[key] = _build(tp, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def parse_overrides(args: list[str]) -> dict:
    """Turn ``["train.lr=0.1", "selection.strategy=sc"]`` into a nested dict (values parsed as YAML)."""
    tree: dict = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like section.key=value, e.g. train.lr=0.01")
        key, raw = arg.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in FREE_FORM:
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                world_size: int | None = None) -> Config:
    """Read YAML (or the defaults), apply dotted overrides, type-check and validate; ``world_size`` adds the
    check that the global batch divides over the ranks."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass --config configs/<name>.yaml")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return config_from_dict(values, overrides, world_size)


def config_from_dict(values: dict, overrides: list[str] | None = None, world_size: int | None = None) -> Config:
    """A validated Config from nested values (a YAML file's, or ``Config.to_dict()`` saved in a checkpoint)."""
    cfg = _build(Config, _merge(values, parse_overrides(overrides or [])), "")
    validate(cfg, world_size)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    """The resolved config as YAML (the run directory's config.yaml), loadable by ``load_config``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

