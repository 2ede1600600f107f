"""The shape of the code, as the README's Architecture section draws it: runner/ is packages in layers, each
importing only the layers below it; the contract imports only pydantic and pyyaml; the controller takes nothing
from runner/ but the contract; no import circles; product code only in the product; small modules."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

from tests.conftest import ROOT

PRODUCT = ("runner", "controller")
MAX_LINES = 420
# runner/'s packages, lowest first: a package may import the packages of lower layers, never its own layer's
# neighbours or anything above. The modules at runner/'s top (job, preview, __main__) and quickstart/ orchestrate:
# they may import any package, and no package imports them.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("api",),
    ("data", "store"),
    ("model",),
    ("parallel",),
    ("report",),
    ("train",),
    ("merge",),
)
TOP = "top"


def package_of(module: str) -> str:
    """runner.train.plan -> "train"; runner.job, runner.__main__, runner.quickstart... -> TOP."""
    parts = module.split(".")
    packages = {p for layer in LAYERS for p in layer}
    return parts[1] if len(parts) > 1 and parts[1] in packages else TOP


def modules() -> dict[str, Path]:
    out = {}
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: frozenset[str] = frozenset()) -> set[str]:
    """Every module `name` imports, at module level or inside a function (both make a dependency). `known`:
    the product's modules, to tell `from package import submodule` from `from module import name`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from runner import data` imports runner.data.dataset; `from x import f`, x
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


def product_graph() -> dict[str, set[str]]:
    mods = modules()
    known = frozenset(mods)
    # A package's own modules may import it back: Python runs the package's __init__ first either way.
    return {name: {m for m in imports_of(name, path, known) if m in mods and m != name and not name.startswith(m + ".")}
            for name, path in mods.items()}


def test_each_package_imports_only_the_layers_below_it():
    layer = {p: i for i, names in enumerate(LAYERS) for p in names}
    wrong = []
    for name, deps in product_graph().items():
        if not name.startswith("runner"):
            continue
        mine = package_of(name)
        for dep in sorted(deps):
            theirs = package_of(dep)
            if theirs == mine:
                continue
            if theirs == TOP or (mine != TOP and layer[theirs] >= layer[mine]):
                wrong.append(f"{name} ({mine}) imports {dep} ({theirs})")
    assert not wrong, "imports against the layering (tests/test_layout.py LAYERS):\n" + "\n".join(wrong)


def test_every_runner_module_lives_in_a_package():
    top = sorted(n for n in modules() if n.startswith("runner.") and n.count(".") == 1 and package_of(n) == TOP
                 and n != "runner.quickstart")
    assert top == ["runner.__main__", "runner.job", "runner.preview"], f"modules at runner/'s top: {top}"
    for name, path in modules().items():
        if path.name == "__init__.py" and name.startswith("runner"):
            doc = ast.get_docstring(ast.parse(path.read_text()))
            assert doc, f"{path}: a package says what it owns in its docstring"


def test_the_contract_imports_only_pydantic_yaml_and_the_standard_library():
    allowed = {"pydantic", "yaml", "runner", "__future__", *sys.stdlib_module_names}
    for name, path in modules().items():
        if name == "runner.api" or name.startswith("runner.api."):
            outside = {m for m in imports_of(name, path) if m.split(".")[0] not in allowed}
            outside |= {m for m in imports_of(name, path) if m.startswith("runner.") and not m.startswith("runner.api")}
            assert not outside, f"{name} imports {sorted(outside)}; the contract may import only pydantic and yaml"


def test_the_controller_takes_only_the_contract_from_the_runner():
    for name, path in modules().items():
        if name.startswith("controller"):
            taken = {m for m in imports_of(name, path) if m.split(".")[0] == "runner"}
            wrong = {m for m in taken if m != "runner" and not m.startswith("runner.api")}
            assert not wrong, f"{name} imports {sorted(wrong)} from runner/; only runner.api is the contract"


def test_no_import_circle():
    graph = product_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_product_holds_no_benchmark_or_doc_generation_and_no_large_module():
    for name, path in modules().items():
        leaf = name.rsplit(".", 1)[-1]
        assert leaf not in ("bench", "prequantize", "reference"), f"{path}: benchmark/doc code belongs outside runner/"
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it (limit ~{MAX_LINES})"
    for name, path in modules().items():
        bench = {m for m in imports_of(name, path) if m.split(".")[0] in ("bench", "tests")}
        assert not bench, f"{name} imports {sorted(bench)}: the product must not depend on benchmarks or tests"


STORE_SCHEMES = {"hf", "s3", "gs", "local", "file"}  # runner/api/uris.py's table; what a store branch compares to
SCHEME_OWNERS = ("runner/store/", "runner/api/uris.py")  # the store package, and the parser's scheme table


def _scheme_branches(path: Path) -> list[str]:
    """Comparisons that pick a store by its scheme: `x.scheme == "s3"`, `a.scheme != b.scheme`, `"hf" in (...)`,
    `uri.startswith("s3://")` - each a place where adding a store would mean editing this file."""
    def literals(node: ast.AST) -> set[str]:
        values = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return {v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)}

    def is_scheme(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "scheme"

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            named = set().union(*(literals(s) for s in sides))
            others = [s for s in sides if not is_scheme(s)]
            # `url.scheme in ("http", "https")` is a URL's, not a store's; `a.scheme == b.scheme` is a store's
            urls = others and all(isinstance(s, (ast.Constant, ast.Tuple, ast.List, ast.Set)) for s in others)
            if named & STORE_SCHEMES or (any(map(is_scheme, sides)) and not urls):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "removeprefix")
              and any(v.split("://")[0] in STORE_SCHEMES and "://" in v for a in node.args for v in literals(a))):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_scheme_branch_outside_the_store():
    """Everything outside runner/store asks the store (runner.store.backend_for) instead of branching on a
    scheme, so a new store is one module and one registry line (and a parser entry in runner/api/uris.py)."""
    found = []
    for name, path in modules().items():
        rel = path.relative_to(ROOT).as_posix()
        if name.startswith("runner") and not rel.startswith(SCHEME_OWNERS):
            found += _scheme_branches(path)
    assert not found, "scheme branches outside runner/store:\n" + "\n".join(found)
    probe = ROOT / "runner" / "store" / "local.py"  # the check itself finds a branch where there is one
    assert _scheme_branches(probe), "the scheme-branch check found nothing in a Backend that has one"
