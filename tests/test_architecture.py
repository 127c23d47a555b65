"""The floor plan (docs/architecture.md) as a test: every import inside hpcmega points down or stays in its room,
no module imports itself back through others, and the pure floors never import torch.

Read from the source with ``ast`` (nothing is imported), so it runs in milliseconds. Function-local imports count
the same as top-level ones: a local import does not make an upward arrow or a circle acceptable.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hpcmega"

# Bottom to top. A module may import its own room or any room on a lower floor; rooms that share a floor do not
# import each other. The longest matching name wins ("hpcmega.cli" is its own room above "hpcmega").
FLOORS: list[tuple[str, ...]] = [
    ("hpcmega.errors",),
    ("hpcmega.gpus", "hpcmega.schedules"),
    ("hpcmega.config",),
    ("hpcmega.runs",),
    ("hpcmega.checkpoint",),
    ("hpcmega.data",),
    ("hpcmega.cluster",),
    ("hpcmega.planning",),
    ("hpcmega.models",),
    ("hpcmega.parallel",),
    ("hpcmega.training",),
    ("hpcmega.bench", "hpcmega.inference"),
    ("hpcmega.commands",),
    ("hpcmega.cli", "hpcmega"),
]

# Rooms that never import torch: what `plan`, `submit`, `ls`, `status` and `--help` run on a login node.
TORCH_FREE = ("hpcmega.errors", "hpcmega.gpus", "hpcmega.schedules", "hpcmega.config", "hpcmega.runs",
              "hpcmega.cluster", "hpcmega.planning")
# Rooms that may use torch inside functions but not at import (listing checkpoints and data stays cheap).
TORCH_AT_CALL = ("hpcmega.checkpoint",)
# (module, function) -> why a torch-free room imports torch inside that one function.
TORCH_ALLOWED: dict[tuple[str, str], str] = {
    ("hpcmega.planning.dims", "build_mesh"): "ParallelDims validates without torch; only building the DeviceMesh "
                                             "(on a rank, once torch.distributed is up) needs it",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def room_of(module: str) -> tuple[int, str]:
    found = [(floor, room) for floor, rooms in enumerate(FLOORS) for room in rooms
             if module == room or module.startswith(room + ".")]
    assert found, f"{module} is on no floor: add its folder to FLOORS (and to docs/architecture.md)"
    return max(found, key=lambda fr: len(fr[1]))


def imports_of(module: str) -> list[tuple[str, int, str | None]]:
    """(imported module, line, enclosing function or None) for every import in ``module``, at any depth."""
    path = MODULES[module]
    return _imports_in(str(path), module if path.name == "__init__.py" else module.rpartition(".")[0])


@functools.lru_cache(maxsize=None)
def _imports_in(path: str, package: str) -> list[tuple[str, int, str | None]]:
    found: list[tuple[str, int, str | None]] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(up + ([child.module] if child.module else []))
                for alias in child.names:  # `from hpcmega.runs import files` imports the module hpcmega.runs.files
                    sub = f"{base}.{alias.name}"
                    found.append((sub if sub in MODULES else base, child.lineno, function))
            visit(child, inner)

    visit(ast.parse(Path(path).read_text()), None)
    return found


def hpcmega_edges() -> dict[str, set[str]]:
    return {m: {target for target, _, _ in imports_of(m) if target in MODULES and target != m} for m in MODULES}


def test_every_module_is_on_a_floor():
    for module in MODULES:
        room_of(module)


def test_every_import_points_down_or_stays_in_its_room():
    wrong = []
    for module in MODULES:
        floor, room = room_of(module)
        for target, line, function in imports_of(module):
            if target not in MODULES:
                continue
            t_floor, t_room = room_of(target)
            if t_floor > floor or (t_floor == floor and t_room != room and target != "hpcmega"):
                where = f" (inside {function}())" if function else ""
                wrong.append(f"{module}:{line}{where} imports {target}: floor {floor} ({room}) -> "
                             f"{t_floor} ({t_room})")
    assert not wrong, "imports that run up:\n" + "\n".join(wrong)


def find_circle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(edges):
        if start not in state and (circle := visit(start)):
            return circle
    return None


def test_no_circles():
    circle = find_circle(hpcmega_edges())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_circle_finder_finds_circles():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("text, wrong", [("from hpcmega.commands import plan\n", True),
                                         ("def f():\n    from hpcmega.training.job import run_rank\n", True),
                                         ("from hpcmega.errors import ConfigError\n", False)])
def test_an_upward_import_is_caught(tmp_path, monkeypatch, text, wrong):
    """The checker itself: a planning module importing a command (top level or inside a function) is refused."""
    fake = tmp_path / "probe.py"
    fake.write_text(text)
    monkeypatch.setitem(MODULES, "hpcmega.planning.probe", fake)
    if wrong:
        with pytest.raises(AssertionError, match="hpcmega.planning.probe"):
            test_every_import_points_down_or_stays_in_its_room()
    else:
        test_every_import_points_down_or_stays_in_its_room()


def test_pure_floors_do_not_import_torch():
    wrong = []
    for module in MODULES:
        _, room = room_of(module)
        for target, line, function in imports_of(module):
            if target.split(".")[0] != "torch":
                continue
            if room in TORCH_FREE and (module, function) not in TORCH_ALLOWED:
                wrong.append(f"{module}:{line} imports {target} (torch-free room {room})")
            elif room in TORCH_AT_CALL and function is None:
                wrong.append(f"{module}:{line} imports {target} at import time (room {room})")
    assert not wrong, "\n".join(wrong)


def test_the_torch_allowlist_is_used():
    """An allowlist entry whose import is gone is stale: delete it."""
    used = {(m, f) for m in MODULES for t, _, f in imports_of(m) if t.split(".")[0] == "torch"}
    assert set(TORCH_ALLOWED) <= used, set(TORCH_ALLOWED) - used
