"""The house rules, checked on the source: the package's import graph is acyclic, and the core
(objectives, backbones, drift, build, trainer, checkpoint, config, generator, normalizer,
timeconv, ...) imports no workload (toy, images, policy, envs, datasets, eval) and no
application layer (cli, serve)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: setuptools' package-dir: import package -> folder
PACKAGE_DIRS = {"jumpflow": "jumpflow", "jumpflow.policy": "policy", "jumpflow.envs": "envs",
                "jumpflow.datasets": "datasets", "jumpflow.eval": "eval", "jumpflow.configs": "configs"}
WORKLOADS = ("jumpflow.toy", "jumpflow.images", "jumpflow.policy", "jumpflow.envs", "jumpflow.datasets",
             "jumpflow.eval", "jumpflow.cli", "jumpflow.serve")


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        root = REPO / folder
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "jumpflow" and parts and parts[0] in ("policy", "envs", "datasets", "eval", "configs"):
                continue
            out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every ``jumpflow`` module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:          # `from pkg import submodule` or a symbol
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


def _is_core(module: str) -> bool:
    return module.startswith("jumpflow") and not module.startswith(WORKLOADS) and not module.startswith(
        "jumpflow.configs")


def test_the_scan_sees_the_package():
    assert "jumpflow.trainer" in MODULES and "jumpflow.policy.chunk_policy" in MODULES
    assert "jumpflow.checkpoint" in GRAPH["jumpflow.trainer"] and "jumpflow.build" in GRAPH["jumpflow.trainer"]


def test_import_graph_is_acyclic():
    """Package ``__init__`` files importing their own children are the one allowed back edge
    (a child importing its parent package runs the parent first, which is Python's order)."""
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(GRAPH.get(m, ())):
            if m.startswith(n + ".") or n.startswith(m + "."):
                continue                                 # parent <-> child package edges
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_core_imports_no_workload():
    bad = {m: sorted(n for n in deps if n.startswith(WORKLOADS)) for m, deps in GRAPH.items() if _is_core(m)}
    bad = {m: v for m, v in bad.items() if v}
    assert not bad, bad
    core = [m for m in MODULES if _is_core(m)]
    assert {"jumpflow.trainer", "jumpflow.build", "jumpflow.generator", "jumpflow.objectives.meanflow"} <= set(core)
