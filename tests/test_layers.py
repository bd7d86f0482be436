"""The package layout of docs/architecture.md, read from the source with `ast`: every import of
every module of stcli/ (lazy ones inside functions included) goes downwards, jobs -> components
-> infra, and the modules import each other without a cycle."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stcli"
RANK = {"infra": 0, "components": 1, "jobs": 2}  # a module may import its own rank or a lower one
FACADE = {"stcli", "stcli.__main__"}  # the package root and `python -m stcli`: above every layer


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def imports(module: str) -> list[tuple[str, int]]:
    """(imported stcli module, line) for every import statement of `module`: `from a import b`
    names module a.b where b is a module, else a."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "stcli"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "stcli":
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append((sub if sub in MODULES else source, node.lineno))
    return found


GRAPH = {m: sorted({target for target, _ in imports(m) if target != m}) for m in MODULES}


def test_every_module_is_in_a_layer():
    """stcli/ holds the facade and three sub-packages, nothing flat beside them."""
    stray = [m for m in MODULES if m not in FACADE and layer(m) is None]
    assert not stray, f"modules outside jobs/, components/, infra/: {stray}"
    assert all((PACKAGE / name / "__init__.py").is_file() for name in RANK)


def test_every_import_names_a_module_that_exists():
    missing = [(m, t) for m in MODULES for t, _ in imports(m) if t not in MODULES]
    assert not missing, missing


def test_imports_go_downwards_only():
    upward = []
    for module in MODULES:
        if module in FACADE:
            continue
        for target, line in imports(module):
            if target in FACADE or RANK[layer(target)] > RANK[layer(module)]:
                upward.append(f"{MODULES[module].relative_to(ROOT)}:{line} ({layer(module)}) imports "
                              f"{target} ({layer(target) or 'the package root'})")
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    state, stack = {}, []  # state: 1 on the current path, 2 done

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) in (["a", "b", "c", "a"],)
    assert find_cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None


MODULE_STRING = re.compile(r"^stcli(\.\w+)+$")


@pytest.mark.parametrize("folder", ["stcli", "tests", "benchmarks"])
def test_module_strings_name_modules_that_exist(folder):
    """Strings that name a module (registry modules, monkeypatch targets, importlib) follow the
    layout: each `"stcli.x.y"` is a module, or an attribute of one."""
    wrong = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and MODULE_STRING.match(str(node.value)):
                parts = node.value.split(".")
                if not any(".".join(parts[:k]) in MODULES for k in range(len(parts), 1, -1)):
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not wrong, wrong


def test_registry_modules_are_components():
    """The registries (infra) name the modules that fill them as strings, imported on demand:
    each is a component module."""
    from stcli.infra import registry

    for reg in (v for v in vars(registry).values() if isinstance(v, registry.Registry)):
        for module in reg.modules:
            assert module in MODULES and layer(module) == "components", (reg, module)
            assert importlib.util.find_spec(module) is not None


def test_public_names_survive_the_modules():
    """`from stcli import load, sample` are the API's functions even after the sample job's
    module is imported (it is stcli.jobs.sample, so it does not rebind stcli.sample)."""
    code = ("import stcli.jobs.sample, stcli.jobs.api as api\n"
            "from stcli import __version__, load, sample\n"
            "assert sample is api.sample and load is api.load and callable(sample), sample\n"
            "print(__version__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(),
                                           re.M).group(1)
