"""The house rules of docs/architecture.md, held against the code: every module named there, arrows that only point
down between packages, no import cycle, no import of ofa inside a function, no module past 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "ofa"
# package -> the packages of ofa it may import (docs/architecture.md, "Packages, and what each may import")
ALLOWED = {
    "io": set(),
    "model": set(),
    "data": {"io"},
    "train": {"io", "model", "data"},
    "deploy": {"io", "model"},
    "pipeline": {"io", "model", "data", "train", "deploy"},
    "latency": {"deploy"},  # a module, the command line run on a target machine
}
MODULES = ("io", "latency")  # the entries of ALLOWED that are modules of ofa, not packages
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(LIBRARY.rglob("*.py"))}


def imports(path: Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    """The ofa modules `path` imports (a package's face when the name is not a module of it), with their lines."""
    tree = ast.parse(path.read_text())
    known = modules()
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] in ("ofa", "stages")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if not base.startswith("ofa"):
                continue
            for alias in node.names:
                found.append((f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base, node.lineno))
    return found


def package_of(module: str) -> str | None:
    """io, model, data, train, deploy, pipeline or latency; None for ofa itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_design_document_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(ROOT)) for p in sorted(LIBRARY.rglob("*.py"))
               if p.name != "__init__.py" and f"`{p.relative_to(ROOT)}`" not in text]
    assert not missing, f"docs/architecture.md does not name {', '.join(missing)}"
    packages = sorted(p.name for p in LIBRARY.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(k for k in ALLOWED if k not in MODULES)
    for package in ALLOWED:
        assert f"`ofa.{package}`" in text


@pytest.mark.parametrize("module", sorted(m for m in modules() if package_of(m)))
def test_each_package_imports_only_the_packages_below_it(module):
    own = package_of(module)
    wrong = [(name, line) for name, line in imports(modules()[module])
             if package_of(name) not in (own, *ALLOWED[own])]
    assert not wrong, f"{module} imports {wrong}: {own} may import {sorted(ALLOWED[own]) or 'nothing'} of ofa"


def test_no_module_of_ofa_imports_ofa_inside_a_function():
    late = [(m, name, line) for m, path in modules().items()
            for name, line in sorted(set(imports(path)) - set(imports(path, top_level_only=True)))]
    assert not late, f"imports of ofa inside a function (put them at the top; an import cycle is not dodged): {late}"


def test_no_import_cycle():
    graph = {m: {name for name, _ in imports(p, top_level_only=True)} for m, p in modules().items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(m):] + [m])}")
        if m in done:
            return
        for n in sorted(graph.get(m, ())):
            visit(n, [*path, m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])


def test_stage_scripts_are_thin_and_use_the_pipeline_alone():
    for script in sorted((ROOT / "stages").glob("*.py")):
        names = {name for name, _ in imports(script)}
        assert names and all(n.startswith("ofa.pipeline.") for n in names), f"{script.name} imports {names}"
        assert len(script.read_text().splitlines()) <= 20, script.name


def test_no_module_is_longer_than_a_few_screens():
    lines = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in LIBRARY.rglob("*.py")}
    long = {path: n for path, n in lines.items() if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"


def test_the_checks_see_what_they_check():
    """The import reader resolves relative imports to modules and faces, so the rules above are not vacuous."""
    loop = imports(LIBRARY / "train" / "loop.py", top_level_only=True)
    assert {"ofa.data.augment", "ofa.model", "ofa.train.distributed", "ofa.train.evaluation"} <= {n for n, _ in loop}
    context = {n for n, _ in imports(LIBRARY / "pipeline" / "context.py")}
    assert {"ofa.train", "ofa.train.distributed", "ofa.pipeline.checkpoint", "ofa.io"} <= context
