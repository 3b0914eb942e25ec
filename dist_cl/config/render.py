"""The config as people read it: ``--print-config``'s annotated YAML, and the hyperparameters that TensorBoard's
hparams tab lists.

Both are views of a resolved config for a reader, not rules about it, so they share this module: the hparams
are the keys that say what a run learns, changed from their defaults (``changed_keys``).
"""

import ast
import dataclasses
import inspect
import typing

import yaml

from dist_cl.config import schema
from dist_cl.config.schema import FREE_FORM, Config, flatten


def field_docs() -> dict[str, str]:
    """Every config key's docstring (the string literal under its field in dist_cl.config.schema), by dotted key."""
    classes = {node.name: node for node in ast.parse(inspect.getsource(schema)).body
               if isinstance(node, ast.ClassDef)}
    docs: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        body = classes[cls.__name__].body
        for stmt, following in zip(body, body[1:] + [None]):
            if not isinstance(stmt, ast.AnnAssign):
                continue
            name = stmt.target.id
            is_doc = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
            docs[prefix + name] = " ".join(following.value.value.split()) if is_doc else ""
            field_type = typing.get_type_hints(cls)[name]
            if dataclasses.is_dataclass(field_type):
                walk(field_type, f"{prefix}{name}.")

    walk(Config, "")
    return docs


def describe(cfg: Config) -> str:
    """The resolved config as YAML, each key followed by its docstring as a comment (``--print-config``)."""
    docs, lines = field_docs(), []

    def emit(tree: dict, prefix: str, indent: str) -> None:
        for key, value in tree.items():
            doc = docs[prefix + key]
            if isinstance(value, dict) and key not in FREE_FORM:
                lines.append(f"{indent}{key}:  # {doc}")
                emit(value, f"{prefix}{key}.", indent + "  ")
            else:
                shown = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
                lines.append(f"{indent}{key}: {shown}  # {doc}")

    emit(cfg.to_dict(), "", "")
    return "\n".join(lines)


NOT_HYPERPARAMETERS = ("run.", "checkpoint.", "dist.", "data.num_workers", "data.path")
"""Keys that say where and how a run is kept, not what it learns: left out of TensorBoard's hparams."""


def changed_keys(cfg: Config) -> dict:
    """The dotted hyperparameter keys whose value differs from the default, with their values (hparams)."""
    defaults = flatten(Config().to_dict())
    return {key: value for key, value in flatten(cfg.to_dict()).items()
            if defaults.get(key) != value and not key.startswith(NOT_HYPERPARAMETERS)}
