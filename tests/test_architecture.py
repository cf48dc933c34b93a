"""The package's imports run one way: no circles, and no module imports from a layer above its own.

Read from the source with `ast` (nothing is imported), deferred imports inside functions included. The
layer order is written once, here, and docs/architecture.md shows it as a picture.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ppow_plugin"

# Lowest first. A module may import from its own layer and the layers before it; a subpackage is one layer.
LAYERS: list[tuple[str, ...]] = [
    ("ppow_plugin.errors", "ppow_plugin.quiet"),
    ("ppow_plugin.recipe_file", "ppow_plugin.config_objective", "ppow_plugin.config"),
    ("ppow_plugin.distributed", "ppow_plugin.devices"),
    ("ppow_plugin.host", "ppow_plugin.outputs"),  # outputs: the one output-folder guard (knows the target cache)
    ("ppow_plugin.method",),
    ("ppow_plugin.drafters",),
    ("ppow_plugin.data",),
    ("ppow_plugin.evaluation",),
    ("ppow_plugin.training",),
    ("ppow_plugin.cli", "ppow_plugin.doctor"),
]
# The host and DeepSpeed each enter through one seam.
SEAMS = {"eagle": "ppow_plugin.host.eagle_compat", "deepspeed": "ppow_plugin.distributed"}


def module_names(package: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package's own name maps to its __init__)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(package: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Module -> the package's modules it imports; module -> top-level third-party names it imports."""
    modules = module_names(package)
    internal: dict[str, set[str]] = {m: set() for m in modules}
    external: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target.split(".")[0] != package.name:
                    external[name].add(target.split(".")[0])
                    continue
                while target not in modules:  # `import ppow_plugin.x.y` of a name inside a module
                    target = target.rpartition(".")[0]
                if target != name:
                    internal[name].add(target)
    return internal, external


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
    return sorted(cycles)


def layer_of(module: str, layers: list[tuple[str, ...]] = LAYERS) -> int | None:
    for i, members in enumerate(layers):
        if any(module == m or module.startswith(m + ".") for m in members):
            return i
    return None


def upward_imports(graph: dict[str, set[str]], layers: list[tuple[str, ...]] = LAYERS) -> list[str]:
    bad = []
    for importer, targets in sorted(graph.items()):
        for target in sorted(targets):
            if target == "ppow_plugin":
                continue  # the package itself: __version__
            mine, theirs = layer_of(importer, layers), layer_of(target, layers)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{importer} imports {target} (layer {theirs} > {mine})")
    return bad


def test_every_module_has_a_layer():
    graph, _ = import_graph(PACKAGE)
    missing = [m for m in graph if m != "ppow_plugin" and layer_of(m) is None]
    assert not missing, f"add these modules to LAYERS: {missing}"


def test_no_import_circles():
    graph, _ = import_graph(PACKAGE)
    assert find_cycles(graph) == []


def test_no_module_imports_from_a_higher_layer():
    graph, _ = import_graph(PACKAGE)
    assert upward_imports(graph) == []


@pytest.mark.parametrize("library", sorted(SEAMS))
def test_host_and_deepspeed_enter_through_one_module(library):
    _, external = import_graph(PACKAGE)
    importers = sorted(m for m, libs in external.items() if library in libs)
    assert importers == [SEAMS[library]]


def test_the_checks_catch_a_circle_an_upward_import_and_a_deferred_one(tmp_path):
    """Can fail: a package with a circle through a deferred import and an upward import is flagged."""
    pkg = tmp_path / "ppow_plugin"
    (pkg / "method").mkdir(parents=True)
    (pkg / "host").mkdir()
    for init in (pkg, pkg / "method", pkg / "host"):
        (init / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("from ppow_plugin.host import bridge\n")  # base imports host: upward
    (pkg / "host" / "bridge.py").write_text("from ppow_plugin.errors import X\n")
    (pkg / "method" / "a.py").write_text("from . import b\n")
    (pkg / "method" / "b.py").write_text("def f():\n    from ppow_plugin.method.a import g\n")  # deferred
    graph, _ = import_graph(pkg)
    assert find_cycles(graph) == [["ppow_plugin.errors", "ppow_plugin.host.bridge"],
                                  ["ppow_plugin.method.a", "ppow_plugin.method.b"]]
    assert upward_imports(graph) == ["ppow_plugin.errors imports ppow_plugin.host.bridge (layer 3 > 0)"]


@pytest.mark.parametrize("old, new", [("trainer", "training.trainer"), ("gen_data", "data.generate"),
                                      ("eagle_compat", "host.eagle_compat"), ("eval_report", "evaluation.eval_report")])
def test_module_names_from_before_the_layout_still_import_with_a_warning(old, new):
    import importlib
    import sys

    sys.modules.pop(f"ppow_plugin.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"ppow_plugin.{old} has moved to ppow_plugin.{new}"):
        module = importlib.import_module(f"ppow_plugin.{old}")
    assert module is importlib.import_module(f"ppow_plugin.{new}")


def test_names_of_the_old_flat_data_and_drafters_modules_forward_with_a_warning():
    from ppow_plugin import data, drafters
    from ppow_plugin.data import samples
    from ppow_plugin.drafters import adapters

    with pytest.warns(DeprecationWarning, match="has moved to ppow_plugin.data.samples.tokenize_conversation"):
        assert data.tokenize_conversation is samples.tokenize_conversation
    with pytest.warns(DeprecationWarning):
        assert drafters.ADAPTERS is adapters.ADAPTERS
    with pytest.raises(AttributeError):
        data.no_such_name  # noqa: B018
