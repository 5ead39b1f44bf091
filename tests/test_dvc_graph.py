"""DVC sees the real graph: each stage's code deps are exactly the project files it imports.

The import closure of a stage is computed from the source (every `import`/`from … import` of
`pipeline` or `stages`, at any depth, function-level ones included) starting from the module
its command runs (`python -m stages.<name>`). A stage that imports a file it does not list
would not re-run when that file changes; one that lists a file it does not import re-runs for
nothing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_ROOT

PACKAGES = ("pipeline", "stages")
PIPELINES = {"dvc.yaml": PROJECT_ROOT, "presets/dvc.yaml": PROJECT_ROOT}  # file → folder its paths are relative to


def module_file(module: str) -> Path | None:
    """`pipeline.store.reader` → pipeline/store/reader.py (or a package's __init__.py); None outside the project."""
    if module.split(".")[0] not in PACKAGES:
        return None
    path = PROJECT_ROOT.joinpath(*module.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    raise AssertionError(f"import of {module!r} names no file of the project")


def runtime_nodes(node: ast.AST):
    """Every node under `node` except the bodies of `if TYPE_CHECKING:` (never run)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (grandchild for orelse in child.orelse for grandchild in [orelse, *runtime_nodes(orelse)])
            continue
        yield child
        yield from runtime_nodes(child)


def imported_modules(path: Path, type_checking: bool = False) -> set[str]:
    """Every project module `path` imports at run time, anywhere in the file (and, with
    `type_checking`, under `if TYPE_CHECKING:` too)."""
    modules = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree) if type_checking else runtime_nodes(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
            # `from pipeline import store` imports the module pipeline.store.
            modules.update(f"{node.module}.{alias.name}" for alias in node.names
                           if module_file_or_none(f"{node.module}.{alias.name}") is not None)
    return {module for module in modules if module.split(".")[0] in PACKAGES}


def module_file_or_none(module: str) -> Path | None:
    try:
        return module_file(module)
    except AssertionError:
        return None


def import_closure(module: str) -> set[str]:
    """Project files (relative paths) that running `module` executes: it, its imports, theirs…,
    and the package __init__ files on the way (where they hold more than a docstring and a
    version)."""
    seen: set[Path] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, then c
            path = module_file(".".join(parts[:depth]))
            if path is None or path in seen:
                continue
            seen.add(path)
            pending.extend(imported_modules(path))
    return {str(path.relative_to(PROJECT_ROOT)) for path in seen if not _trivial(path)}


def _trivial(path: Path) -> bool:
    """A package __init__ with nothing but a docstring and assignments runs nothing worth a dep."""
    if path.name != "__init__.py":
        return False
    tree = ast.parse(path.read_text())
    return all(isinstance(node, (ast.Expr, ast.Assign)) for node in tree.body)


def stages_of(pipeline_file: str) -> list[tuple[str, str, list[str]]]:
    """(stage name, command, code deps relative to the project root) of every stage."""
    definition = yaml.safe_load((PROJECT_ROOT / pipeline_file).read_text())
    found = []
    for name, stage in definition["stages"].items():
        body = stage.get("do", stage)
        working_dir = PIPELINES[pipeline_file] / Path(pipeline_file).parent / body.get("wdir", ".")
        deps = [str((working_dir / dep).resolve().relative_to(PROJECT_ROOT)) for dep in body.get("deps", [])
                if isinstance(dep, str) and dep.endswith(".py")]
        found.append((name, body["cmd"], deps))
    return found


ALL_STAGES = [(file, *stage) for file in PIPELINES for stage in stages_of(file)]


@pytest.mark.parametrize("pipeline_file, stage, command, deps", ALL_STAGES, ids=[f"{f}:{s}" for f, s, _, _ in ALL_STAGES])
def test_a_stage_depends_on_exactly_the_code_it_imports(pipeline_file, stage, command, deps):
    match = re.search(r"python -m (stages\.\w+)", command)
    assert match, f"{pipeline_file}:{stage}: command does not run a stages module: {command}"
    closure = import_closure(match.group(1))
    missing, extra = sorted(closure - set(deps)), sorted(set(deps) - closure)
    assert not missing and not extra, f"{pipeline_file}:{stage}: deps lack {missing}; deps list but never import {extra}"


def test_the_closure_sees_function_level_imports_and_skips_type_checking_ones(tmp_path):
    """The check would fail if a stage gained an import without its dep: imports count at any
    depth, except under `if TYPE_CHECKING:`, which never runs."""
    closure = import_closure("stages.train")
    assert "pipeline/heads/pixel_ensemble/training.py" in closure and "stages/train.py" in closure and "stages/__init__.py" in closure
    source = tmp_path / "module.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pipeline import store\n"
        "def f():\n    from pipeline import pictures\n    import pipeline.sources.hooks\n"
    )
    assert imported_modules(source) == {"pipeline", "pipeline.pictures", "pipeline.sources.hooks"}


def import_cycle(modules: dict[str, Path]) -> list[str] | None:
    """The first import cycle among `modules` (dotted name → file), as [a, b, …, a]; None for a DAG.
    Imports under `if TYPE_CHECKING:` count: they tie the two modules' designs together all the same."""
    graph = {module: {name for name in imported_modules(path, type_checking=True) if name != module}
             for module, path in modules.items()}
    visiting, done = [], set()

    def visit(module):
        if module in done:
            return None
        if module in visiting:
            return visiting[visiting.index(module):] + [module]
        visiting.append(module)
        for imported in sorted(graph.get(module, ())):
            cycle = visit(imported)
            if cycle:
                return cycle
        visiting.pop()
        done.add(module)
        return None

    return next((cycle for cycle in map(visit, graph) if cycle), None)


def test_no_import_cycles_inside_the_library():
    """pipeline/ modules, those of its packages included, form a DAG (function-level imports
    count: they hid the one there was; so do type-checking ones: they hid pipeline.store's
    layouts ⇄ reader)."""
    modules = {}
    for path in sorted((PROJECT_ROOT / "pipeline").rglob("*.py")):
        parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    cycle = import_cycle(modules)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_check_sees_a_cycle_through_a_type_checking_import_inside_a_package(tmp_path):
    (tmp_path / "layouts.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.store.reader import FeatureStore\n")
    (tmp_path / "reader.py").write_text("from pipeline.store.layouts import NATIVE\n")
    modules = {"pipeline.store.layouts": tmp_path / "layouts.py", "pipeline.store.reader": tmp_path / "reader.py"}
    assert import_cycle(modules) == ["pipeline.store.layouts", "pipeline.store.reader", "pipeline.store.layouts"]
    (tmp_path / "layouts.py").write_text("from pipeline.store.schema import StoreSchema\n")
    assert import_cycle(modules) is None


# The library's layers, lowest first: a package (or top-level module) of pipeline/ imports only
# from itself and from lower layers, so data flows down the code layout (docs/contributing.md). The
# directions that went wrong once: heads → evaluation (the IoU accumulator, now pipeline/metrics.py),
# sources → store (the head's feature description, now passed as plain values) and sources → data
# (file hashing, now pipeline/runtime/hashing.py).
LAYERS = [
    {"runtime", "sizes"},
    {"config"},
    {"metrics", "pictures"},
    {"sources"},
    {"data"},
    {"store"},
    {"extraction", "heads"},
    {"evaluation", "pretrain", "inspection"},
    {"prediction", "refine", "suggestion", "fewshot"},
    {"synthetic"},
    {"benchmark"},
]


def library_modules() -> dict[str, Path]:
    """Every module of pipeline/ by dotted name (packages by their own name, not `….__init__`)."""
    modules = {}
    for path in sorted((PROJECT_ROOT / "pipeline").rglob("*.py")):
        parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def upward_imports(modules: dict[str, Path]) -> list[str]:
    """'a imports b' for each import of `modules` that does not point to a lower layer.

    Raises:
        AssertionError: a module of a package that LAYERS does not place.
    """
    rank = {part: level for level, parts in enumerate(LAYERS) for part in parts}
    upward = []
    for module, path in modules.items():
        if module == "pipeline":
            continue
        part = module.split(".")[1]  # pipeline.heads.selection → heads; pipeline.sizes → sizes
        assert part in rank, f"{module}: pipeline/{part} has no place in LAYERS; add it where its imports put it"
        for imported in sorted(imported_modules(path)):
            imported_part = imported.split(".")[1] if imported.startswith("pipeline.") else None
            if imported_part not in (None, part) and rank[imported_part] >= rank[part]:
                upward.append(f"{module} imports {imported}")
    return upward


def test_every_import_points_down_the_layers():
    upward = upward_imports(library_modules())
    assert not upward, "imports that do not point down the layers: " + "; ".join(upward)


@pytest.mark.parametrize("module, imported", [
    ("pipeline.heads.selection", "pipeline.evaluation.scoring"),
    ("pipeline.sources.loading", "pipeline.store.schema"),
    ("pipeline.sources.checkpoints", "pipeline.data.folders"),
])
def test_the_layer_rule_refuses_the_imports_that_went_up(tmp_path, module, imported):
    source = tmp_path / "module.py"
    source.write_text(f"from {imported} import something\n")
    assert upward_imports({module: source}) == [f"{module} imports {imported}"]


def rewrite_code_deps(pipeline_file: str) -> None:
    """Replaces each stage's `.py` deps in `pipeline_file` by its import closure (other deps and
    comments stay as they are): `PYTHONPATH=. python tests/test_dvc_graph.py` after changing imports."""
    path = PROJECT_ROOT / pipeline_file
    commands = {name: command for name, command, _ in stages_of(pipeline_file)}
    lines, out, stage = path.read_text().splitlines(keepends=True), [], None
    for line in lines:
        match = re.match(r"^  (\w+):\s*$", line)
        if match and match.group(1) in commands:
            stage = match.group(1)
        if line.strip().startswith("- ") and line.rstrip().endswith(".py"):
            indent = line[: len(line) - len(line.lstrip())]
            if stage is not None:
                module = re.search(r"python -m (stages\.\w+)", commands[stage]).group(1)
                first = [module.replace(".", "/") + ".py", "stages/__init__.py"]
                rest = sorted(import_closure(module) - set(first))
                out.extend(f"{indent}- {dep}\n" for dep in first + rest)
                stage = None  # written once, where its first `.py` dep was
            continue
        out.append(line)
    path.write_text("".join(out))


if __name__ == "__main__":
    for pipeline_file in PIPELINES:
        rewrite_code_deps(pipeline_file)
