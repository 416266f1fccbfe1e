"""The import rule of docs/ARCHITECTURE.md, checked on the source: every import of the package,
function-local and lazy ones included, points to a lower layer (or within its own folder), and
no two modules import each other, directly or through others."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Lower rank = lower layer. A module may import a module of a lower rank, or one in its own group.
LAYERS = [
    # (group, rank, module prefixes)
    ("leaf", 0, ("vpns_fast._version", "vpns_fast._extension", "vpns_fast._C", "vpns_fast._source_tree",
                 "vpns_fast.files", "vpns_fast.errors", "vpns_fast.models", "vpns_fast.data", "vpns_fast.console")),
    ("kernels", 1, ("vpns_fast.kernels",)),
    ("ops", 2, ("vpns_fast.ops",)),
    ("environment", 3, ("vpns_fast.environment",)),
    ("nn", 4, ("vpns_fast.nn",)),
    ("pruning", 5, ("vpns_fast.pruning",)),
    ("training", 6, ("vpns_fast.training",)),
    ("deploy", 6, ("vpns_fast.deploy",)),
    ("cli", 7, ("vpns_fast.cli", "vpns_fast.demo", "vpns_fast.__main__")),
    ("package", 8, ("vpns_fast",)),
]


def layer_of(module: str) -> tuple[str, int]:
    for group, rank, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            if group == "package" and module != "vpns_fast":
                break
            return group, rank
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: place it in one")


def package_modules() -> dict[str, pathlib.Path]:
    files = {}
    for path in sorted((ROOT / "vpns_fast").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts).removesuffix(".__init__")] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        files[("vpns_fast.kernels." + path.stem).removesuffix(".__init__")] = path
    return files


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Every package module ``name`` imports, wherever the import statement is."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule; `from pkg import attr` imports pkg.
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "vpns_fast" or t.startswith("vpns_fast."))
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``"a -> b"`` for every import of a module in another group of the same or a higher rank."""
    found = []
    for name in sorted(graph):
        group, rank = layer_of(name)
        for target in sorted(graph[name]):
            target_group, target_rank = layer_of(target)
            if target_group != group and target_rank >= rank:
                found.append(f"{name} ({group}) -> {target} ({target_group})")
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state and nxt in graph:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


MODULES = package_modules()
KNOWN = set(MODULES) | {"vpns_fast._C"}  # the compiled extension has no .py source
GRAPH = {name: imports_of(name, path, KNOWN) - {name} for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    assert len(MODULES) > 30
    for name in MODULES:
        layer_of(name)


def test_imports_point_downward():
    assert not upward_imports(GRAPH), "imports upward or sideways:\n" + "\n".join(upward_imports(GRAPH))


def test_no_import_cycles():
    assert not import_cycles(GRAPH), "import cycles:\n" + "\n".join(import_cycles(GRAPH))


def test_the_checker_finds_planted_faults():
    # Edges the parser must see: a top-level one and a function-local one.
    assert "vpns_fast.nn.masked_layers" in GRAPH["vpns_fast.pruning.masking"]
    assert "vpns_fast.deploy.sparse_cpu" in GRAPH["vpns_fast.deploy.runtime"]
    assert upward_imports({"vpns_fast.ops.conv_dispatch": {"vpns_fast.nn.masked_layers"}})
    assert upward_imports({"vpns_fast.training.trainer": {"vpns_fast.deploy.export"}})  # peers stay apart
    assert not upward_imports({"vpns_fast.deploy.export": {"vpns_fast.deploy.slim", "vpns_fast.kernels.prompt"}})
    a, b = "vpns_fast.pruning.a", "vpns_fast.pruning.b"
    assert import_cycles({a: {b}, b: {a}})
    assert not import_cycles({a: {b}, b: set()})


def test_a_source_tree_exposes_kernels_and_nothing_else(tmp_path):
    """Run from a checkout with PYTHONPATH=. and no install (as on a machine without a registry):
    ``vpns_fast.kernels`` resolves to the top-level ``kernels/`` and ``bench`` / ``tests`` do not
    become ``vpns_fast.<name>``. ``-S`` skips site-packages' .pth files, so the editable install's
    finder is out of the picture; torch comes through PYTHONPATH."""
    import os
    import subprocess
    import sys
    import sysconfig

    code = (
        "import importlib.util, vpns_fast, vpns_fast.kernels.threshold as t;"
        "print(t.__file__);"
        "print(importlib.util.find_spec('vpns_fast.bench'), importlib.util.find_spec('vpns_fast.tests'))"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]]))
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    kernels_file, specs = done.stdout.splitlines()
    assert pathlib.Path(kernels_file) == ROOT / "kernels" / "threshold.py"
    assert specs == "None None"


MAX_CLASS_LINES, MAX_FUNCTION_LINES = 350, 120


def oversized_definitions() -> list[str]:
    found = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{name}.{node.name}: {length} lines (limit {limit})")
    return found


def test_no_class_or_function_too_long_to_read():
    assert not oversized_definitions(), "\n".join(oversized_definitions())


def test_importing_the_package_leaves_the_trainer_and_exporter_unloaded():
    """They are lazy attributes of ``vpns_fast`` for import time; an eager import anywhere undoes that."""
    import subprocess
    import sys

    code = ("import sys, vpns_fast; lazy = ['vpns_fast.training.trainer', 'vpns_fast.deploy.export'];"
            "print([m for m in lazy if m in sys.modules]); print(vpns_fast.export.__module__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "vpns_fast.deploy.export"]
