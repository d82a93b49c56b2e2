"""The import direction between the package's layers, read from the source (every import,
including those inside functions, which run as surely as the module's own).

From the bottom up: the foundations (errors, geometry, symmetry, I/O, the entry, parameters, CTF,
grids, …), the predictions format and the reconstruction, the methods (each in its folder, with
the refinement), the judge (metrics, evaluation, tables, plots), the command line on top. A layer
imports only layers below it: no method imports the judge, nothing imports the command line, and
no two modules import each other, directly or round a longer cycle.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cryopose"

#: The judge: what scores predictions. A method must not import it (it would learn from the test).
JUDGE = {
    "cryopose.evaluate",
    "cryopose.metrics",
    "cryopose.metric_table",
    "cryopose.leaderboard",
    "cryopose.sensitivity",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str, modules: dict) -> str | None:
    """``cryopose.io.star.read_particles_star`` → ``cryopose.io.star`` (the longest module prefix)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, modules: dict) -> set[str]:
    """The cryopose modules ``module`` imports anywhere in its source."""
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
        for name in names:
            if name.startswith("cryopose"):
                target = _resolve(name, modules)
                if target is None:
                    continue
                # Importing a.b.c runs a.b's __init__ first: that is imported too. A module's own
                # packages are left out (Python runs them before it whatever it imports).
                parts = target.split(".")
                for n in range(2, len(parts) + 1):
                    candidate = ".".join(parts[:n])
                    if candidate in modules and candidate != module and not module.startswith(candidate + "."):
                        found.add(candidate)
    return found


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {m: imports_of(m, modules) for m in modules}


def test_the_graph_is_read(graph):
    """The reader sees imports (a test of the test): the CLI imports the evaluation, a method the
    predictions format."""
    assert "cryopose.evaluate" in graph["cryopose.cli"]
    assert "cryopose.predictions" in graph["cryopose.methods.random"]


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components: each must be one module."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_method_imports_the_judge(graph):
    methods = [m for m in graph if m.startswith("cryopose.methods")] + ["cryopose.refine", "cryopose.predictions"]
    offenders = {m: sorted(graph[m] & JUDGE) for m in methods if graph[m] & JUDGE}
    assert not offenders, f"methods importing the judge: {offenders}"


def test_nothing_imports_the_command_line(graph):
    offenders = sorted(m for m, deps in graph.items() if "cryopose.cli" in deps and m != "cryopose.__main__")
    assert not offenders, f"modules importing the CLI: {offenders}"


def test_the_entry_and_the_io_do_not_import_torch():
    """An entry can be validated and its files read without torch (a light install, a login node)."""
    import subprocess
    import sys

    code = "import sys, cryopose.entry, cryopose.io; assert 'torch' not in sys.modules, 'torch imported'"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


#: The layers, from the bottom (README "Layout"); a module may import its own layer and those below.
LAYERS = [
    {
        "errors",
        "interrupt",
        "guard",
        "parameters",
        "geometry",
        "symmetry",
        "grids",
        "ctf",
        "masks",
        "preprocess",
        "augment",
        "io",
        "io.star",
        "io.mrc",
        "io.atomic",
        "entry",
        "provenance",
        "device",
        "reconstruct_kernels",
    },
    {"predictions", "pose_import", "data", "simulate", "download", "reconstruct", "matching"},
    {"methods", "refine"},
    {"metrics", "metric_table", "evaluate", "leaderboard", "sensitivity", "plots"},
    {"cli"},
    {"", "__main__"},  # the package's public API re-exports from every layer; `python -m cryopose`
]


def _layer(module: str) -> int:
    name = module.removeprefix("cryopose").removeprefix(".")
    if name.startswith("methods."):
        name = "methods"
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to the README's list)")


def test_each_layer_imports_only_itself_and_below(graph):
    upward = sorted(
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m, deps in graph.items()
        for d in deps
        if _layer(d) > _layer(m)
    )
    assert not upward, "imports against the layers:\n" + "\n".join(upward)
