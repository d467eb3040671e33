"""The package's import graph, drawn from the source with ast: no circle, nothing importing upward, engines
independent of each other, no private name imported from another module.

Every module sits on a layer; a module may import only from layers strictly below its own (so two modules
of one layer, such as the two engines, never import each other). Imports inside functions count too.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Source folders of the installed packages (pyproject's package-dir mapping).
PACKAGES = {"mixrecipe": REPO / "mixrecipe", "mixrecipe.kernels": REPO / "kernels"}

# Bottom (0) to top. The docstring of each module says what it does; docs/architecture.md draws the core.
LAYERS = {
    "mixrecipe.kernels._common": 0,
    "mixrecipe.kernels.mixup": 1, "mixrecipe.kernels.cross_entropy": 1, "mixrecipe.kernels.aot": 1,
    "mixrecipe.kernels.augment": 1, "mixrecipe.kernels.resize": 1,
    "mixrecipe.kernels": 2,
    "mixrecipe.checks": 2,  # argument rules, shared by every entry point
    # Pure helpers: settings, float64 semantics, the CPU switch, the draws, metric math.
    "mixrecipe.config": 3, "mixrecipe.reference": 3, "mixrecipe.backend": 3,
    "mixrecipe.metrics": 3, "mixrecipe.draws": 3,
    # The ops, and what the runner needs that knows nothing of mixing.
    "mixrecipe.ops": 4, "mixrecipe.models": 4, "mixrecipe.plots": 4, "mixrecipe.distributed": 4,
    "mixrecipe.outputs": 4,
    "mixrecipe.loss": 5, "mixrecipe.policy": 5, "mixrecipe.data": 5, "mixrecipe.scoring": 5,
    "mixrecipe": 6,  # the public API (__init__)
    # Integrations with other libraries, and the recipe's factories.
    "mixrecipe.fastai": 7, "mixrecipe.lightning": 7, "mixrecipe.transforms": 7, "mixrecipe.factories": 7,
    "mixrecipe.gpu_data": 7,  # device-resident data sets: the fused crop/flip + normalize + mix
    "mixrecipe.gpu_decode": 7,  # data.decoder=device: batched JPEG decode + one crop/resize/flip kernel
    "mixrecipe.engine": 8,
    "mixrecipe.torch_engine": 9, "mixrecipe.fastai_engine": 9,
    "mixrecipe.lifecycle": 10,
    "mixrecipe.cli": 11, "mixrecipe.evaluate": 11,
    "mixrecipe.train": 12,
}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def _imports(name: str, path: Path, known) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import statement in the file."""
    is_package = path.stem == "__init__"
    package = name if is_package else name.rsplit(".", 1)[0]
    edges = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            edges += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = [alias.name for alias in node.names]
            for n in names:  # ``from . import ops``: the submodule is what is imported
                if f"{target}.{n}" in known:
                    edges.append((f"{target}.{n}", []))
            rest = [n for n in names if f"{target}.{n}" not in known]
            if rest:
                edges.append((target, rest))
    return [(t, n) for t, n in edges if t in known and t != name]


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    missing = sorted(set(graph) - set(LAYERS))
    assert not missing, f"give these modules a layer in tests/test_layout.py: {missing}"


def test_imports_only_point_down(graph):
    upward = [f"{src} (layer {LAYERS[src]}) imports {dst} (layer {LAYERS[dst]})"
              for src, edges in graph.items() for dst, _ in edges
              if src in LAYERS and dst in LAYERS and LAYERS[dst] >= LAYERS[src]]
    assert not upward, "\n".join(upward)


def test_no_import_circle(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for dst, _ in graph[node]:
            if state.get(dst) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dst):] + [dst]))
            if dst not in state:
                visit(dst, path + [dst])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_engines_import_neither_each_other_nor_the_lifecycle(graph):
    engines = ("mixrecipe.torch_engine", "mixrecipe.fastai_engine")
    for engine in engines:
        targets = {dst for dst, _ in graph[engine]}
        assert not targets & (set(engines) | {"mixrecipe.lifecycle", "mixrecipe.cli", "mixrecipe.train"})


def test_no_private_name_is_imported_from_another_module(graph):
    private = [f"{src} imports {n} from {dst}" for src, edges in graph.items() for dst, names in edges
               for n in names if n.startswith("_")]
    assert not private, "\n".join(private)


def test_the_checker_sees_relative_and_lazy_imports(graph):
    # Guards the test itself: lazy (in-function) and relative imports are edges too.
    assert "mixrecipe.models" in {dst for dst, _ in graph["mixrecipe.lifecycle"]}  # imported in prepare()
    assert "mixrecipe.ops" in {dst for dst, _ in graph["mixrecipe.data"]}  # ``from . import ops``
    assert "mixrecipe.kernels" in {dst for dst, _ in graph["mixrecipe.ops"]}
