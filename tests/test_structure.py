"""The core's shape: its folders are the pipeline's stages, each importing only the stages below
it (the order is declared once, here); no import cycle; no module of headstart/ imports Prefect;
only the modules that compute with TensorFlow import it when they load."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
CORE = PROJECT / "headstart"

# The wings of headstart/, lowest first: a module may import its own wing and the ones before it.
WING_ORDER = (
    "errors",
    "config",
    "infra",
    "data",
    "backbone",
    "features",
    "training",
    "evaluation",
    "registry",
    "edge",
    "serving",
    "promotion",
    "reporting",
)
# The modules whose work is TensorFlow's: the Keras switch, the network graph, the TF Hub export,
# the classifier. Every other core module imports TensorFlow only inside the functions that use it.
NEEDS_TENSORFLOW = {
    "headstart.infra.keras",
    "headstart.backbone.mobilenet",
    "headstart.backbone.hub_module",
    "headstart.training.head",
}
TENSORFLOW_PACKAGES = {"tensorflow", "tf_keras", "tensorflow_hub"}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PROJECT).with_suffix("").parts).removesuffix(".__init__")


SOURCES = {_module_name(path): path for path in sorted(CORE.rglob("*.py"))}


def _imports(tree: ast.Module, top_level_only: bool) -> set[str]:
    """Every module named by the file's import statements (at its top only, or anywhere)."""
    nodes = _run_when_loaded(tree.body) if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return found


def _run_when_loaded(statements: list[ast.stmt]) -> list[ast.stmt]:
    """The statements a module runs as it loads: its top level, into `with`, `try` and `if`
    blocks, but not into functions, classes or `if TYPE_CHECKING:`."""
    found = []
    for statement in statements:
        found.append(statement)
        if isinstance(statement, ast.If) and "TYPE_CHECKING" in ast.unparse(statement.test):
            continue
        if isinstance(statement, (ast.With, ast.Try, ast.If)):
            found += _run_when_loaded(statement.body)
            found += _run_when_loaded(getattr(statement, "orelse", []) + getattr(statement, "finalbody", []))
            for handler in getattr(statement, "handlers", []):
                found += _run_when_loaded(handler.body)
    return found


TREES = {name: ast.parse(path.read_text()) for name, path in SOURCES.items()}
GRAPH = {
    name: {target for target in _imports(tree, False) if target in SOURCES and target != name}
    for name, tree in TREES.items()
}


def _wing(module: str) -> str:
    return module.split(".")[1] if module != "headstart" else "errors"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, visiting, done = [], [], set()

    def visit(node):
        if node in visiting:
            cycles.append(visiting[visiting.index(node) :] + [node])
            return
        if node in done:
            return
        visiting.append(node)
        for target in sorted(graph[node]):
            visit(target)
        visiting.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    return cycles


def test_the_core_is_wings_with_few_modules_at_its_top():
    top_level = sorted(path.name for path in CORE.glob("*.py"))
    assert len(top_level) <= 4, top_level
    folders = {path.name for path in CORE.iterdir() if path.is_dir() and path.name != "__pycache__"}
    assert folders <= set(WING_ORDER), f"declare the new wing in WING_ORDER: {sorted(folders - set(WING_ORDER))}"
    assert {_wing(module) for module in SOURCES} <= set(WING_ORDER)


def test_no_module_imports_a_wing_above_its_own():
    assert GRAPH["headstart.features.extraction"]  # the graph sees imports at all
    upward = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in sorted(targets)
        if WING_ORDER.index(_wing(target)) > WING_ORDER.index(_wing(module))
    ]
    assert upward == []


def test_no_import_cycle_inside_the_core():
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize(
    "graph, cycle",
    [
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ],
)
def test_the_cycle_check_finds_cycles(graph, cycle):
    assert _cycles(graph) == [cycle]


def test_the_wing_check_finds_an_upward_import():
    module, target = "headstart.features.engines", "headstart.edge.int8.quantization"
    assert WING_ORDER.index(_wing(target)) > WING_ORDER.index(_wing(module))


def test_outside_its_wing_the_edge_is_reached_through_its_entry():
    """headstart/edge/__init__.py names what the rest of the core, the tasks and the flows use; the
    modules behind it are the wing's workings (tests and benchmarks may study them)."""
    import headstart.edge

    assert headstart.edge.__all__ and all(hasattr(headstart.edge, name) for name in headstart.edge.__all__)
    callers = [
        path
        for path in [*CORE.rglob("*.py"), *(PROJECT / "tasks").glob("*.py"), *(PROJECT / "flows").glob("*.py")]
        if CORE / "edge" not in path.parents
    ]
    inward = []
    for path in callers:
        where = path.relative_to(PROJECT)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "headstart.edge":
                inward += [f"{where}: {alias.name}" for alias in node.names if alias.name not in headstart.edge.__all__]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("headstart.edge."):
                inward.append(f"{where}: {node.module}")
            elif isinstance(node, ast.Import):
                inward += [f"{where}: {alias.name}" for alias in node.names if alias.name.startswith("headstart.edge.")]
    assert inward == []


def _loads_at_import(module: str, top_level: dict[str, set[str]], seen: set[str]) -> set[str]:
    """The outside packages a module's loading pulls in, through its top-level imports and those of
    the core modules it imports at its top."""
    if module in seen:
        return set()
    seen.add(module)
    found = {target.split(".")[0] for target in top_level[module] if not target.startswith("headstart")}
    for target in top_level[module]:
        if target in SOURCES:
            found |= _loads_at_import(target, top_level, seen)
        parent = target.rpartition(".")[0]
        if parent in SOURCES and target not in SOURCES:  # `from headstart.x import name`
            found |= _loads_at_import(parent, top_level, seen)
    # A package's __init__ loads with each of its modules.
    package = module.rpartition(".")[0]
    if package in SOURCES:
        found |= _loads_at_import(package, top_level, seen)
    return found


def test_no_core_module_imports_prefect_and_only_the_tensorflow_ones_load_it():
    anywhere = {name: _imports(tree, False) for name, tree in TREES.items()}
    assert [
        name
        for name, targets in anywhere.items()
        if any(t.split(".")[0] in ("prefect", "prefect_dask") for t in targets)
    ] == []
    top_level = {name: _imports(tree, True) for name, tree in TREES.items()}
    loading = {name: _loads_at_import(name, top_level, set()) for name in SOURCES}
    assert {name for name, packages in loading.items() if packages & TENSORFLOW_PACKAGES} == NEEDS_TENSORFLOW


def test_loading_the_core_without_its_tensorflow_modules_pulls_in_neither_prefect_nor_tensorflow():
    """The static check above, confirmed once by Python itself in one fresh interpreter."""
    light = sorted(set(SOURCES) - NEEDS_TENSORFLOW)
    probe = (
        "import importlib, json, sys\nfor name in sys.argv[1:]: importlib.import_module(name)\n"
        "heavy = ('prefect', 'tensorflow', 'tf_keras', 'tensorflow_hub')\n"
        "print(json.dumps(sorted(p for p in heavy if p in sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *light], cwd=PROJECT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
