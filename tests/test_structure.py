"""The core's shape: no module of headstart/ imports Prefect, only those that compute with
TensorFlow import it, and no two modules of headstart/ import each other in a loop."""

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import headstart

PROJECT = Path(__file__).resolve().parents[1]
CORE_MODULES = sorted(module.name for module in pkgutil.walk_packages(headstart.__path__, "headstart."))
# The modules whose work is TensorFlow's: the Keras switch, the network graph, the TF Hub export,
# the classifier. Every other core module imports TensorFlow only inside the functions that use it.
NEEDS_TENSORFLOW = {"headstart.keras", "headstart.backbone.mobilenet", "headstart.backbone.hub_module", "headstart.model"}


def test_the_core_modules_are_the_ones_this_test_knows():
    assert NEEDS_TENSORFLOW <= set(CORE_MODULES)
    assert {"headstart.config", "headstart.features.extraction", "headstart.runs", "headstart.inference"} <= set(CORE_MODULES)


def test_importing_a_core_module_pulls_in_no_prefect_and_tensorflow_only_where_needed():
    probe = "import importlib, json, sys; importlib.import_module(sys.argv[1]); print(json.dumps(['prefect' in sys.modules, 'tensorflow' in sys.modules]))"
    children = {name: subprocess.Popen([sys.executable, "-c", probe, name], cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for name in CORE_MODULES}
    imported = {}
    for name, child in children.items():
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, f"{name}: {err[-2000:]}"
        imported[name] = json.loads(out.strip().splitlines()[-1])
    assert [name for name, (prefect, _) in imported.items() if prefect] == []
    assert {name for name, (_, tensorflow) in imported.items() if tensorflow} == NEEDS_TENSORFLOW


def _core_imports(path: Path, module: str) -> set[str]:
    """The core modules this file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {target for target in targets if target in CORE_MODULES and target != module}
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, visiting, done = [], [], set()

    def visit(node):
        if node in visiting:
            cycles.append(visiting[visiting.index(node):] + [node])
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


def test_no_import_cycle_inside_the_core():
    files = {name: PROJECT / (name.replace(".", "/") + ".py") for name in CORE_MODULES}
    files = {name: path if path.exists() else path.with_suffix("") / "__init__.py" for name, path in files.items()}
    graph = {name: _core_imports(path, name) for name, path in files.items()}
    assert graph["headstart.features.extraction"]  # the graph sees imports at all
    assert _cycles(graph) == []


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
])
def test_the_cycle_check_finds_cycles(graph, cycle):
    assert _cycles(graph) == [cycle]
