"""The import graph of clip_ray is its architecture; these tests hold it to clip_ray/layers.py.

Every import counts, at module level or inside a function, absolute or relative: a lower
layer never imports a higher one, no modules import each other in a cycle, every module
sits in a layer, and no module reaches for another's private names. Only `ast` reads the
code, so nothing is imported and the check takes well under a second.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from clip_ray.layers import DATA_LAYERS, LAYERS
from repo_paths import REPO_ROOT

Layers = tuple[tuple[str, ...], ...]


def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under root/package (a package is its __init__)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, str | None]]:
    """(imported module, line, name imported by `from` or None) for each in-package import, anywhere in the file.

    A target that resolves to no module of the package comes back prefixed with '?'."""
    package = module.split(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package, up level - 1 more
                here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, node.lineno, None) if sub in modules else (base, node.lineno, alias.name))
    ours = [(t, line, n) for t, line, n in found if t == package or t.startswith(package + ".")]
    return [(t if t in modules else "?" + t, line, n) for t, line, n in ours]


def layer_of(module: str, layers: Layers) -> tuple[int, str] | None:
    """(layer index, matching prefix) of the longest prefix covering `module`, or None."""
    matches = [(len(p), i, p) for i, layer in enumerate(layers) for p in layer if module == p or module.startswith(p + ".")]
    return max(matches)[1:] if matches else None


def find_cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """(a shortest cycle path, first node repeated last; the whole group) per strongly connected group (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [(shortest_cycle(graph, group), group) for group in groups]


def shortest_cycle(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """The shortest path from the group's first module back to itself, staying inside the group (BFS)."""
    start, parent, queue = group[0], {}, [group[0]]
    for node in queue:
        for nxt in sorted(graph[node]):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return path[::-1] + [start]
            if nxt in group and nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"no cycle through {start}")


def check_layering(root: Path, layers: Layers, sibling_layers: Layers = ()) -> list[str]:
    """Every violation of `layers` in the package under `root` (a sys.path entry), as readable lines.

    `sibling_layers` are finer layers inside one package where, besides never importing
    upwards, modules under different prefixes of the same layer must not import each other."""
    package = layers[0][0].split(".")[0]
    modules = package_modules(root, package)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    violations = []
    for module, path in modules.items():
        where = layer_of(module, layers)
        if where is None and module != package:
            violations.append(f"{module} is in no layer: place it in {package}.layers")
        for target, line, name in imports_of(module, path, modules):
            at = f"{module} (line {line})"
            if target.startswith("?"):
                violations.append(f"{at} imports {target[1:]}, which is no module of {package}")
                continue
            if target != module:
                graph[module].add(target)
            if name and name.startswith("_") and not name.startswith("__") and target != module:
                violations.append(f"{at} imports the private name {name} from {target}")
            theirs = layer_of(target, layers)
            if where and theirs and theirs[0] > where[0]:
                violations.append(f"{at} imports {target}: layer {where[0]} {where[1]} imports higher layer {theirs[0]} {theirs[1]}")
            mine, other = layer_of(module, sibling_layers), layer_of(target, sibling_layers)
            if mine and other and other[0] > mine[0]:
                violations.append(f"{at} imports {target}: sub-layer {mine[1]} imports higher sub-layer {other[1]}")
            elif mine and other and other[0] == mine[0] and other[1] != mine[1]:
                violations.append(f"{at} imports {target}: siblings {mine[1]} and {other[1]} must not import each other")
    for cycle, group in find_cycles(graph):
        more = f" (one of the cycles among {len(group)} modules: {', '.join(group)})" if len(group) >= len(cycle) else ""
        violations.append(f"import cycle: {' -> '.join(cycle)}{more}")
    return violations


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_clip_ray_respects_its_layers():
    violations = check_layering(REPO_ROOT, LAYERS, DATA_LAYERS)
    assert not violations, f"{len(violations)} layering violations:\n" + "\n".join(violations)


def test_worker_imports_nothing_from_the_driver():
    modules = package_modules(REPO_ROOT, "clip_ray")
    bad = [f"{m} (line {line}) imports {t}" for m, path in modules.items() if m.startswith("clip_ray.worker")
           for t, line, _ in imports_of(m, path, modules) if t.lstrip("?") == "clip_ray.driver" or t.lstrip("?").startswith("clip_ray.driver.")]
    assert not bad, "\n".join(bad)


def test_the_checker_catches_an_injected_cycle(tmp_path):
    root = write_package(tmp_path / "fake", {
        "fakepkg/__init__.py": "",
        "fakepkg/a.py": "def f():\n    import fakepkg.b\n",
        "fakepkg/b.py": "from . import a\n",
    })
    cycles = [v for v in check_layering(root, (("fakepkg",),)) if v.startswith("import cycle")]
    assert cycles == ["import cycle: fakepkg.a -> fakepkg.b -> fakepkg.a"]

    real = tmp_path / "real"
    shutil.copytree(REPO_ROOT / "clip_ray", real / "clip_ray", ignore=shutil.ignore_patterns("__pycache__"))
    with open(real / "clip_ray" / "config" / "model.py", "a") as f:
        f.write("\n\ndef _injected():\n    from clip_ray.cli import main\n    return main\n")
    violations = check_layering(real, LAYERS, DATA_LAYERS)
    assert any("clip_ray.config.model" in v and "imports clip_ray.cli: layer 1" in v for v in violations), violations
    assert any(v.startswith("import cycle") and "clip_ray.config.model" in v and "clip_ray.cli" in v for v in violations), violations


def test_the_checker_catches_an_upward_import_and_a_private_name(tmp_path):
    write_package(tmp_path, {
        "fakepkg/__init__.py": "",
        "fakepkg/low.py": "def f():\n    from .high import _private\n    return _private\n",
        "fakepkg/high.py": "_private = 1\n",
        "fakepkg/data/__init__.py": "",
        "fakepkg/data/base.py": "from fakepkg.data import stream\n",
        "fakepkg/data/stream.py": "import fakepkg.data.demo\n",
        "fakepkg/data/demo.py": "",
        "fakepkg/stray.py": "",
    })
    layers = (("fakepkg.low",), ("fakepkg.high", "fakepkg.data"))
    violations = check_layering(tmp_path, layers, (("fakepkg.data.base",), ("fakepkg.data.stream", "fakepkg.data.demo")))
    assert sorted(violations) == sorted([
        "fakepkg.low (line 2) imports the private name _private from fakepkg.high",
        "fakepkg.low (line 2) imports fakepkg.high: layer 0 fakepkg.low imports higher layer 1 fakepkg.high",
        "fakepkg.data.base (line 1) imports fakepkg.data.stream: sub-layer fakepkg.data.base imports higher sub-layer fakepkg.data.stream",
        "fakepkg.data.stream (line 1) imports fakepkg.data.demo: siblings fakepkg.data.stream and fakepkg.data.demo must not import each other",
        "fakepkg.stray is in no layer: place it in fakepkg.layers",
    ])
