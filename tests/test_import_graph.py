"""The import graph of ``src/`` (function-level imports included), built from the source with ``ast``:
it has no cycle (issue #14), and every import goes sideways or down the layer order that
docs/architecture.md states in its ``layers`` block (issue #23): a back-edge fails like a cycle does.
"""

from __future__ import annotations

import ast
from pathlib import Path

import re
import subprocess
import sys

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (packages by their ``__init__``)."""
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(root: Path, prefix: str) -> dict[str, set[str]]:
    """Module -> the modules under ``prefix`` it imports anywhere in its body (functions included).
    ``from a.b import c`` points at ``a.b.c`` when that is a module, else at ``a.b``."""
    modules = module_names(root)

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                hit = known(target)
                if hit and hit != mod and hit.startswith(prefix):
                    graph[mod].add(hit)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def write_package(root: Path, files: dict[str, str]) -> Path:
    """A package ``pkg`` under ``root`` with the given ``{relative path: source}`` files."""
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_graph_builder_sees_function_level_and_relative_imports(tmp_path):
    pkg = write_package(tmp_path, {
        "__init__.py": "", "sub/__init__.py": "", "a.py": "from pkg.sub import b\n",
        "sub/b.py": "def f():\n    from .. import c\n",  # function-level, relative
        "c.py": "import pkg.a\nimport os\n",
        "d.py": "from pkg import a\n"})  # imports into the cycle, not part of it
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert cycles(graph) == [{"pkg.a", "pkg.sub.b", "pkg.c"}]
    (pkg / "c.py").write_text("import os\n")
    assert cycles(import_graph(tmp_path, "pkg")) == []


def test_src_has_no_import_cycle():
    found = cycles(import_graph(SRC, "compresslab"))
    assert not found, ("import cycles in src/ (break them: see docs/architecture.md, 'Layers'): "
                       + "; ".join(" <-> ".join(sorted(c)) for c in found))


def test_the_graph_covers_the_package():
    graph = import_graph(SRC, "compresslab")
    assert len(graph) > 100 and "compresslab.pipeline" in graph["compresslab.cli"]
    assert "compresslab.compress.codecs.sparse" in graph


# ---- the layer order ---------------------------------------------------------------------------
def read_layers(text: str) -> dict[str, int]:
    """``{top-level module or package: layer}`` from the fenced ```` ```layers ```` block of a page:
    one line per layer, ``<number>  <name> <name> ...``, higher numbers above lower ones."""
    match = re.search(r"```layers\n(.*?)```", text, re.S)
    assert match, "docs/architecture.md has no ```layers block"
    layers = {}
    for line in match.group(1).splitlines():
        number, *names = line.split()
        for name in names:
            layers[name.rstrip("/").removesuffix(".py")] = int(number)
    return layers


def layer_violations(graph: dict[str, set[str]], layers: dict[str, int], prefix: str) -> list[str]:
    """Every import that goes up the layer order (``a -> b`` with b's layer above a's), and every
    module whose top-level name has no layer (a new package must be placed in the order)."""
    def top(module: str) -> str:
        return module[len(prefix) + 1:].split(".")[0] if module != prefix else ""

    found = []
    for mod in sorted(m for m in graph if m.startswith(prefix + ".")):
        if top(mod) not in layers:
            found.append(f"{mod}: {top(mod)!r} has no layer in the docs' layers block")
            continue
        for target in sorted(graph[mod]):
            if target != prefix and top(target) in layers and layers[top(target)] > layers[top(mod)]:
                found.append(f"{mod} (layer {layers[top(mod)]}) imports {target} (layer {layers[top(target)]})")
    return found


def test_src_imports_only_sideways_or_down_the_documented_layers():
    layers = read_layers(ARCHITECTURE.read_text(encoding="utf-8"))
    found = layer_violations(import_graph(SRC, "compresslab"), layers, "compresslab")
    assert not found, "imports against docs/architecture.md's layer order:\n" + "\n".join(found)


def test_a_planted_back_edge_fails_the_layer_check(tmp_path):
    pkg = write_package(tmp_path, {"__init__.py": "", "low/__init__.py": "", "high.py": "from pkg.low import leaf\n",
                                   "low/leaf.py": "import os\n"})
    layers = read_layers("```layers\n1  high\n0  low/\n```")
    assert layer_violations(import_graph(tmp_path, "pkg"), layers, "pkg") == []
    (pkg / "low" / "leaf.py").write_text("def f():\n    from ..high import thing\n")  # function-level, relative
    assert layer_violations(import_graph(tmp_path, "pkg"), layers, "pkg") == [
        "pkg.low.leaf (layer 0) imports pkg.high (layer 1)"]
    (pkg / "new.py").write_text("")
    assert "pkg.new: 'new' has no layer in the docs' layers block" in layer_violations(
        import_graph(tmp_path, "pkg"), layers, "pkg")


@pytest.mark.parametrize("low,high", [("compresslab.measure.core", "compresslab.track.results"),
                                      ("compresslab.compress.codecs.ort_int8", "compresslab.deploy.export"),
                                      ("compresslab.runtime.ort", "compresslab.measure.backends")])
def test_the_back_edges_issue_23_removed_would_fail_again(low, high):
    graph = import_graph(SRC, "compresslab")
    assert high not in graph[low]
    graph[low].add(high)
    assert layer_violations(graph, read_layers(ARCHITECTURE.read_text(encoding="utf-8")), "compresslab")


def test_hydra_plugins_load_without_lightning():
    """Hydra imports every plugin before it sets up a job's logging; Lightning imported then gives its
    logger a handler of its own (propagate=False), and the job's log file loses Lightning's lines
    (the DDP ranks' "GLOBAL_RANK" lines among them). The plugins must stay light."""
    code = ("import sys, hydra_plugins.compresslab_optuna_sweeper, hydra_plugins.compresslab_slurm_launcher; "
            "print(sorted(m for m in ('pytorch_lightning', 'lightning_fabric', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
