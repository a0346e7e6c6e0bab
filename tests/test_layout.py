"""The repository's shape: no import cycles between fastvader's modules."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the package it installs as (setup.py installs kernels/ as fastvader.kernels)
SOURCE_PACKAGES = {"fastvader": "fastvader", "kernels": "fastvader.kernels"}


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every module under the source folders."""
    modules = {}
    for folder, package in SOURCE_PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, (ast.Name, ast.Attribute)) and ast.unparse(test).endswith("TYPE_CHECKING")


def import_time_imports(body: list[ast.stmt]):
    """The import statements that run when the module is imported: at the top level and inside
    top-level if/try/with blocks and class bodies, not inside functions (those run on call), and
    not under ``if TYPE_CHECKING:`` (never run)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from import_time_imports(node.body)
            yield from import_time_imports(node.orelse)
        elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from import_time_imports(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from import_time_imports(node.body)


def _imported_modules(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
                      modules: dict[str, Path]) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    base = node.module or ""
    if node.level:  # relative: resolve against the importing module's package
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    # `from a import b` imports the submodule a.b when there is one, else a name defined in a
    targets = {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return targets & modules.keys()


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the fastvader modules it imports at import time. A package's re-exports from its
    own submodules are edges; the implicit import of a module's parent packages is not."""
    modules = module_files(root)
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = set().union(*(_imported_modules(node, module, path.name == "__init__.py", modules)
                                      for node in import_time_imports(tree.body)))
        graph[module].discard(module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search; a back edge closes a cycle)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if target in path:
                return path[path.index(target):] + [target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        done.add(module)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_module_level_imports_have_no_cycle():
    graph = import_graph(ROOT)
    assert "fastvader.kernels.ops.group_norm" in graph and "fastvader.config" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_cycle_check_counts_if_try_and_reexports_but_not_function_bodies(tmp_path):
    files = {"fastvader/__init__.py": "", "kernels/__init__.py": "", "kernels/ops/__init__.py": "",
             "fastvader/a.py": "try:\n    from fastvader.b import x\nexcept ImportError:\n    pass\n",
             "fastvader/b.py": "def f():\n    from fastvader import a\n",
             "fastvader/c.py": "if TYPE_CHECKING:\n    from fastvader.d import D\n",
             "fastvader/d.py": "import fastvader.c\n"}
    assert find_cycle(import_graph(_write_tree(tmp_path / "none", files))) is None

    in_if = {**files, "fastvader/b.py": "import os\nif os.name:\n    from fastvader import a\n"}
    assert find_cycle(import_graph(_write_tree(tmp_path / "if", in_if))) == ["fastvader.a", "fastvader.b", "fastvader.a"]

    reexport = {**files, "kernels/__init__.py": "from fastvader.kernels.ops import op\n",
                "kernels/ops/__init__.py": "from .. import helper\n"}
    assert find_cycle(import_graph(_write_tree(tmp_path / "reexport", reexport))) == [
        "fastvader.kernels", "fastvader.kernels.ops", "fastvader.kernels"]
