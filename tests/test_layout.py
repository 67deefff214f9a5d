"""The import graph runs one way: no module imports itself back through others (imports inside functions count: a
lazy import is still an arrow), and the packages form a stack whose arrows never point up (a package may import only
those below it). The study runner stays out of the report, and no package outgrows its job."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["common", "qwen_mini", "lora", "data", "ledger", "training", "models", "forecasting", "study", "reporting",
            "accounting", "bench"]  # bottom to top
STUDY_RUNNER = {"study.run", "study.jobs", "study.worker", "study.search", "study.cli", "study.estimate"}


def project_modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if parts[0] in {".venv", "tests", ".git"} or parts[0].startswith("."):
            continue
        name = ".".join(parts)[:-3].removesuffix(".__init__")
        modules[name] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file (function bodies included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1] if package else []
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle_and_passes_a_chain():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_relative_imports_resolve_to_the_module_they_name(tmp_path):
    modules = {"pkg": tmp_path / "pkg/__init__.py", "pkg.a": tmp_path / "pkg/a.py", "pkg.b": tmp_path / "pkg/b.py",
               "other": tmp_path / "other.py"}
    (tmp_path / "pkg").mkdir()
    modules["pkg.a"].write_text("from .b import x\nfrom . import b\ndef f():\n    import other\n")
    assert imports_of("pkg.a", modules["pkg.a"], modules) == {"pkg.b", "pkg", "other"}


def test_no_module_imports_itself_back():
    assert cycles(graph()) == []


def test_packages_import_only_the_packages_below_them():
    rank = {p: i for i, p in enumerate(PACKAGES)}
    upward = sorted(f"{name} -> {target}" for name, targets in graph().items() for target in targets
                    if name.split(".")[0] in rank and target.split(".")[0] in rank
                    and rank[target.split(".")[0]] > rank[name.split(".")[0]])
    assert upward == []


def test_the_report_reads_studies_without_importing_the_runner():
    reaching = {name: targets for name, targets in graph().items() if name.split(".")[0] == "reporting"}
    assert reaching and not {t for targets in reaching.values() for t in targets} & STUDY_RUNNER


@pytest.mark.parametrize("package, limit", [("study", 3000)])
def test_a_package_stays_within_its_size(package, limit):
    lines = sum(len(p.read_text().splitlines()) for p in (ROOT / package).glob("*.py"))
    assert lines <= limit, f"{package}/ is {lines} lines"
