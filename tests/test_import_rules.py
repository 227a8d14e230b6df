"""The import rules of DESIGN.md / README "Architecture", enforced by an AST scan of every import in latentdiff/
(module level and inside functions):

1. no import cycles between library modules;
2. nn/ imports only nn/ and errors; diffusion/ imports only diffusion/ and errors (the samplers take the denoiser as
   a callable);
3. nothing imports train/ except train/ itself and the programs that run training or read its checkpoints
   (ENTRY_POINTS);
4. no library module over MAX_LINES lines, except the modules of OVERSIZE, each capped at its size today (a ratchet:
   they may shrink, never grow; split them as they are touched).
`test_the_rules_catch_violations` shows each rule failing on a graph that breaks it.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "latentdiff"
MAX_LINES = 450
# Programs (console entry points and the tools behind them) that may import train/.
ENTRY_POINTS = {
    "latentdiff.demo",
    "latentdiff.encode",
    "latentdiff.tools.preflight",
    "latentdiff.tools.count_params",
}
# Modules over MAX_LINES today, with their line count as a ceiling.
OVERSIZE = {
    "latentdiff.convert.workdir": 825,
    "latentdiff.tools.preflight": 736,
    "latentdiff.data.shapes": 613,
    "latentdiff.evaluation": 603,
    "latentdiff.convert.compvis": 561,
    "latentdiff.train.ldm": 485,
    "latentdiff.metrics": 468,
}


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


def import_graph() -> dict[str, set[str]]:
    modules = library_modules()
    return {module: imports_of(path, module, modules) for module, path in modules.items()}


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
            if _inside(target, train) and not (_inside(module, train) or module in ENTRY_POINTS):
                out.append(f"{module} -> {target}: only train/ and the entry points import train/")
    return out


def size_violations(lines: dict[str, int]) -> list[str]:
    return [
        f"{module}: {count} lines, over {OVERSIZE.get(module, MAX_LINES)}"
        for module, count in sorted(lines.items())
        if count > OVERSIZE.get(module, MAX_LINES)
    ]


def test_no_cycles_and_every_layer_imports_only_downwards():
    graph = import_graph()
    assert len(graph) > 60 and "latentdiff.pipeline" in graph["latentdiff.sample_cli"]  # the scan sees imports
    assert "latentdiff.workdir" in graph["latentdiff.pipeline"]  # ... including those inside functions
    assert cycles(graph) == []
    assert layer_violations(graph) == []


def test_no_library_module_grows_past_its_size():
    lines = {module: sum(1 for _ in open(path)) for module, path in library_modules().items()}
    assert size_violations(lines) == []
    assert all(module in lines for module in OVERSIZE)  # a module that left the list must leave OVERSIZE too


def test_the_rules_catch_violations():
    bad = {
        "latentdiff.pipeline": {"latentdiff.convert.workdir"},
        "latentdiff.convert.workdir": {"latentdiff.pipeline"},
        "latentdiff.nn.unet": {"latentdiff.data.tokenizer"},
        "latentdiff.diffusion.samplers": {"latentdiff.nn.unet"},
        "latentdiff.sampling": {"latentdiff.train.ldm"},
        "latentdiff.demo": {"latentdiff.train.ldm"},
    }
    assert cycles(bad) == [["latentdiff.convert.workdir", "latentdiff.pipeline"]]
    assert [v.split(":")[0] for v in layer_violations(bad)] == [
        "latentdiff.diffusion.samplers -> latentdiff.nn.unet",
        "latentdiff.nn.unet -> latentdiff.data.tokenizer",
        "latentdiff.sampling -> latentdiff.train.ldm",
    ]
    assert size_violations({"latentdiff.new_module": MAX_LINES + 1, "latentdiff.metrics": 468}) == [
        f"latentdiff.new_module: {MAX_LINES + 1} lines, over {MAX_LINES}"
    ]
