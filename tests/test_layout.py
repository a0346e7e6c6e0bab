"""The repository's shape: no import cycles between fastvader's modules, and a README whose
package layout and config table match the code."""
import ast
import dataclasses
import re
from pathlib import Path

from fastvader.config import TrainConfig

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


# ---------------------------------------------------------------------------------------------
# the README's "Package layout" block and config table
# ---------------------------------------------------------------------------------------------
COMING = "(coming)"


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n{title}\n")
    end = text.find("\n#", start + len(title) + 2)
    return text[start:end if end != -1 else None]


def parse_layout(block: str) -> dict[str, str]:
    """The layout block's entries: repository path -> description. One entry a line, two spaces
    of indent per folder level; a folder's name ends with '/'."""
    entries: dict[str, str] = {}
    folders: list[str] = []
    for line in block.splitlines():
        if not line.strip():
            continue
        depth, rest = divmod(len(line) - len(line.lstrip(" ")), 2)
        assert not rest and depth <= len(folders), f"layout line indented oddly: {line!r}"
        name, _, description = line.strip().partition(" ")
        folders = folders[:depth]
        entries["".join(folders) + name] = description.strip()
        if name.endswith("/"):
            folders.append(name)
    return entries


def readme_layout() -> dict[str, str]:
    return parse_layout(readme_section("## Package layout").split("```")[1])


def package_folders(root: Path) -> set[str]:
    """Every folder under the source folders that holds Python modules, as 'fastvader/io/'."""
    return {f"{path.parent.relative_to(root).as_posix()}/" for folder in SOURCE_PACKAGES
            for path in (root / folder).rglob("*.py")}


def test_readme_layout_lists_what_exists_and_every_package_folder():
    layout = readme_layout()
    wrong = [f"{path} is missing" for path, about in layout.items() if COMING not in about and not (ROOT / path).exists()]
    wrong += [f"{path} exists: drop {COMING!r}" for path, about in layout.items() if COMING in about and (ROOT / path).exists()]
    wrong += [f"{folder} is not listed" for folder in sorted(package_folders(ROOT) - layout.keys())]
    wrong += [f"fastvader/{f.name} is not listed" for f in sorted((ROOT / "fastvader").glob("*.py"))
              if f"fastvader/{f.name}" not in layout]
    assert not wrong, "README.md 'Package layout' is out of date: " + "; ".join(wrong)


def test_the_layout_parser_nests_by_indent():
    block = "a/\n  b.py   one\n  c/     two\n    d.py three (coming)\ne/\n"
    assert parse_layout(block) == {"a/": "", "a/b.py": "one", "a/c/": "two", "a/c/d.py": "three (coming)", "e/": ""}


def parse_config_table(section: str) -> dict[str, set[str]]:
    """README config table: section -> the field names of its row (backticked words outside
    parentheses; what is inside parentheses is values and notes)."""
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        fields = cells[1]
        while re.search(r"\([^()]*\)", fields):
            fields = re.sub(r"\([^()]*\)", "", fields)
        rows[cells[0].strip("`")] = set(re.findall(r"`([^`]+)`", fields))
    return rows


def test_readme_config_table_lists_every_section_and_field():
    table = parse_config_table(readme_section("### The configuration"))
    config = TrainConfig()
    expected = {section.name: {f.name for f in dataclasses.fields(getattr(config, section.name))}
                for section in dataclasses.fields(TrainConfig)}
    assert table.keys() == expected.keys(), "README config table sections differ from TrainConfig's"
    wrong = {name: {"missing": sorted(expected[name] - table[name]), "not a field": sorted(table[name] - expected[name])}
             for name in expected if table[name] != expected[name]}
    assert not wrong, f"README config table is out of date: {wrong}"


#: a repository path as the README and docs name one: `tests/memory/test_decode.py`,
#: `configs/tiny_<family>.yaml`, `benchmarks/bench_*.py` (not ../shared/... or ~/.cache/...)
DOC_PATH = re.compile(r"(?<![\w./~-])((?:fastvader|kernels|tests|benchmarks|configs|docs)/[\w./*<>-]*)")


def test_paths_named_in_the_readme_and_docs_exist():
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for match in DOC_PATH.finditer(doc.read_text()):
            pattern = re.sub(r"<[^>]*>", "*", match.group(1).rstrip(".,"))
            if not any(ROOT.glob(pattern)):
                missing.append(f"{doc.relative_to(ROOT)}: {match.group(1)}")
    assert not missing, f"paths that do not exist: {missing}"
