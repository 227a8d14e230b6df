"""The import rules of DESIGN.md / README "Architecture", enforced by an AST scan of every import in latentdiff/
(module level and inside functions):

1. no import cycles between library modules;
2. nn/ imports only nn/ and errors; diffusion/ imports only diffusion/ and errors (the samplers take the denoiser as
   a callable);
3. nothing imports train/ except train/ itself and the programs that run training or read its checkpoints
   (ENTRY_POINTS);
4. no library module over MAX_LINES lines;
5. no file of the project patches sys.path (the package is installed: `pip install -e .`, `make install`).
The `latentdiff` command (latentdiff/cli.py) imports its programs by name when they run: those imports are edges
of the graph too (`cli_edges`). `test_the_rules_catch_violations` shows each rule failing on a graph that breaks it.
"""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "latentdiff"
MAX_LINES = 450
# Programs (console entry points and the tools behind them; a package with all its modules) that may import train/.
ENTRY_POINTS = {
    "latentdiff.cli",
    "latentdiff.demo",
    "latentdiff.tools.preflight",
    "latentdiff.tools.count_params",
}
# Where the project's own Python files live (checked for sys.path patching).
PROJECT_DIRS = ("latentdiff", "tests", "eval", "bench", "configs", ".")


def library_modules() -> dict[str, str]:
    """Module name -> file path of every .py file under latentdiff/ (a package is its __init__)."""
    modules = {}
    for directory, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, str]) -> str | None:
    """The library module an import names: itself, or the nearest enclosing module that exists."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: str, module: str, modules: dict[str, str]) -> set[str]:
    """Library modules `path` imports anywhere in its body (relative imports resolved)."""
    found = set()
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{alias.name}" for alias in node.names] or [base]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                target = _resolve(name, modules)
                if target and target != module and target != PACKAGE:
                    found.add(target)
    return found


def cli_edges(modules: dict[str, str]) -> set[str]:
    """The modules the `latentdiff` command imports by name (the string literals of latentdiff.cli.COMMANDS)."""
    tree = ast.parse(open(modules["latentdiff.cli"]).read())
    table = next(
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "COMMANDS"
    )
    return {_resolve(entry.elts[0].value, modules) for entry in table.values}


def import_graph() -> dict[str, set[str]]:
    modules = library_modules()
    graph = {module: imports_of(path, module, modules) for module, path in modules.items()}
    graph["latentdiff.cli"] |= cli_edges(modules)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            for bottom in ("latentdiff.nn", "latentdiff.diffusion"):
                if _inside(module, bottom) and not (_inside(target, bottom) or target == "latentdiff.errors"):
                    out.append(f"{module} -> {target}: {bottom} imports only itself and latentdiff.errors")
            train = "latentdiff.train"
            entry_point = any(_inside(module, entry) for entry in ENTRY_POINTS)
            if _inside(target, train) and not (_inside(module, train) or entry_point):
                out.append(f"{module} -> {target}: only train/ and the entry points import train/")
    return out


def size_violations(lines: dict[str, int]) -> list[str]:
    return [
        f"{module}: {count} lines, over {MAX_LINES}" for module, count in sorted(lines.items()) if count > MAX_LINES
    ]


def test_no_cycles_and_every_layer_imports_only_downwards():
    graph = import_graph()
    assert len(graph) > 60 and "latentdiff.pipeline" in graph["latentdiff.sample_cli"]  # the scan sees imports
    assert "latentdiff.workdir" in graph["latentdiff.pipeline"]  # ... including those inside functions
    assert {"latentdiff.train.cli", "latentdiff.evaluation.fid"} <= graph["latentdiff.cli"]  # ... and the commands
    assert cycles(graph) == []
    assert layer_violations(graph) == []


def test_no_library_module_is_over_the_size_limit():
    lines = {module: sum(1 for _ in open(path)) for module, path in library_modules().items()}
    assert size_violations(lines) == []


def test_the_rules_catch_violations():
    bad = {
        "latentdiff.pipeline": {"latentdiff.convert.workdir"},
        "latentdiff.convert.workdir": {"latentdiff.pipeline"},
        "latentdiff.nn.unet": {"latentdiff.data.tokenizer"},
        "latentdiff.diffusion.samplers": {"latentdiff.nn.unet"},
        "latentdiff.generation": {"latentdiff.train.ldm"},
        "latentdiff.demo": {"latentdiff.train.ldm"},
    }
    assert cycles(bad) == [["latentdiff.convert.workdir", "latentdiff.pipeline"]]
    assert [v.split(":")[0] for v in layer_violations(bad)] == [
        "latentdiff.diffusion.samplers -> latentdiff.nn.unet",
        "latentdiff.generation -> latentdiff.train.ldm",
        "latentdiff.nn.unet -> latentdiff.data.tokenizer",
    ]
    assert size_violations({"latentdiff.new_module": MAX_LINES + 1, "latentdiff.train.ldm": MAX_LINES}) == [
        f"latentdiff.new_module: {MAX_LINES + 1} lines, over {MAX_LINES}"
    ]


def sys_path_patches(text: str) -> bool:
    return "sys.path.insert" in text or "sys.path.append" in text or "sys.path[" in text


def test_no_file_patches_sys_path():
    found = []
    for top in PROJECT_DIRS:
        directory = os.path.join(ROOT, top)
        names = [f for f in os.listdir(directory) if f.endswith(".py")] if top == "." else None
        walk = [(directory, [], names)] if names is not None else os.walk(directory)
        for folder, _, files in walk:
            for name in files:
                path = os.path.join(folder, name)
                if name.endswith(".py") and path != os.path.abspath(__file__):
                    if sys_path_patches(open(path, encoding="utf-8").read()):
                        found.append(os.path.relpath(path, ROOT))
    assert found == []
    assert sys_path_patches("sys.path.insert(0, ROOT)")  # the check can fail


def architecture_block() -> str:
    """The tree of README.md's "Architecture" section."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("## Architecture") :]
    return section[section.index("```") + 3 : section.index("```", section.index("```") + 3)]


def test_the_readme_tree_names_every_module():
    block = architecture_block()
    missing = []
    for module, path in sorted(library_modules().items()):
        name = os.path.basename(path)
        shown = name if name != "__init__.py" or module == PACKAGE else module.rpartition(".")[2] + "/"
        if not re.search(rf"(?<![\w/]){re.escape(shown)}", block):
            missing.append(os.path.relpath(path, ROOT))
    assert missing == []
    assert not re.search(r"(?<![\w/])no_such_module\.py", block)  # the check can fail
