"""The design rules of the package, checked on its source: short functions, a CLI without torch
logic, no import cycles, and no module hidden behind a public name."""

import ast
from pathlib import Path

import ddtool

PACKAGE = Path(ddtool.__file__).parent
MODULES = {f"ddtool.{p.stem}" if p.stem != "__init__" else "ddtool": p for p in sorted(PACKAGE.glob("*.py"))}
#: The longest a function may be, from its ``def`` line to its last line.
MAX_LINES = 60


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_no_function_is_longer_than_a_screen():
    long = [f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in MODULES.values() for node in ast.walk(_tree(path))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, long


def test_the_cli_holds_no_torch_logic():
    """cli.py parses and prints: it neither imports torch nor names it."""
    tree = _tree(MODULES["ddtool.cli"])
    imports = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imports += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and not node.level]
    assert not [m for m in imports if m == "torch" or m.startswith("torch.")]
    assert not [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id == "torch"]


def _imports(name: str, path: Path) -> set[str]:
    """The ddtool modules ``name`` imports anywhere in its file, function bodies included."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(filter(None, [package.rsplit(".", node.level - 1)[0], node.module]))
            for alias in node.names:  # `from . import parallel` imports a module; `from .x import f`, module x
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in MODULES and m != name}


def test_no_import_cycle_even_through_function_level_imports():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}  # the package imports its modules:
    assert "ddtool.parallel" in graph["ddtool.distillation"]  # a module importing the package closes a cycle

    def cycle_from(start, path):
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return path + [nxt]
            if nxt not in path:
                found = cycle_from(start, path + [nxt])
                if found:
                    return found
        return None

    cycles = [c for c in (cycle_from(m, [m]) for m in graph) if c]
    assert not cycles, cycles


def test_no_module_is_hidden_by_a_public_name():
    """``ddtool.evaluate`` is a function: a module of that name could not be imported as
    ``import ddtool.evaluate as m``."""
    assert not {name.rpartition(".")[2] for name in MODULES} & set(ddtool.__all__)
