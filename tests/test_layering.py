"""The package's layers (docs/DESIGN.md §3): a module imports only from its own layer and the layers below.

Read from the source with ``ast``, so an import inside a function counts as much as one at the top.
"""

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dist_cl"

LAYERS = ("config", "runtime", "data", "learn", "selection", "evaluate", "plan", "report", "", "cli")
"""Bottom to top; "" stands for the package's top-level modules (the trainer), under the commands (cli)."""


def layer(dotted: str, package: Path) -> str:
    """The layer of module ``dotted`` (e.g. dist_cl.plan.planner -> plan; dist_cl.trainer -> "")."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and (package / parts[1]).is_dir() else ""


def imports(path: Path, package: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every dist_cl module that ``path`` imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: dist_cl imports absolutely"
            if node.module == "dist_cl":  # from dist_cl import trainer
                found += [(node.lineno, f"dist_cl.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.startswith("dist_cl.")]


def upward_imports(package: Path) -> list[str]:
    """Every import of a module from a higher layer, as 'file:line (its layer) imports module (layer)'."""
    wrong = []
    for path in sorted(package.rglob("*.py")):
        own = layer(".".join(("dist_cl", *path.relative_to(package).with_suffix("").parts)), package)
        for line, name in imports(path, package):
            if LAYERS.index(layer(name, package)) > LAYERS.index(own):
                wrong.append(f"{path.relative_to(package.parent)}:{line} ({own or 'top'}) imports {name} "
                             f"({layer(name, package) or 'top'})")
    return wrong


def test_every_sub_package_has_a_layer():
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} == set(LAYERS) - {""}


def test_no_import_runs_up_the_layers():
    assert upward_imports(PACKAGE) == []


@pytest.mark.parametrize("module,higher", [
    ("config/__init__.py", "dist_cl.trainer"),
    ("runtime/seeding.py", "dist_cl.data.pairs"),
    ("learn/losses.py", "dist_cl.selection.scoring"),
    ("selection/scoring.py", "dist_cl.plan.planner"),
    ("evaluate/embed.py", "dist_cl.report.console"),
    ("trainer.py", "dist_cl.cli.torchrun"),
])
def test_an_upward_import_is_found(tmp_path, module, higher):
    """The check itself: a copy of the package with one import added that runs up the layers fails it."""
    copy = tmp_path / "dist_cl"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + f"\n\ndef late():\n    import {higher}  # noqa\n")
    found = upward_imports(copy)
    assert len(found) == 1 and found[0].startswith(f"dist_cl/{module}:") and found[0].endswith(
        f"imports {higher} ({layer(higher, copy) or 'top'})")
