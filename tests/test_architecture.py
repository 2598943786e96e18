"""The shape of the package: commands sit on a library and never import each other, the library
has no import cycle, and every function reads in one screen."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "samsum_qlora"
COMMANDS = {"train", "evaluate", "preprocess", "bench", "report", "merge"}


def imports() -> dict[str, set[str]]:
    """module -> the samsum_qlora modules it imports, anywhere in it (lazy imports too)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("samsum_qlora"):
                parts = node.module.split(".")
                if len(parts) > 1:
                    found.add(parts[1])
                else:
                    found |= {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("samsum_qlora.")}
        graph[path.stem] = found - {path.stem}
    return graph


def test_no_module_but_the_cli_imports_a_command():
    offenders = {m: sorted(deps & COMMANDS) for m, deps in imports().items() if m != "cli" and deps & COMMANDS}
    assert offenders == {}


def test_the_library_has_no_import_cycle():
    graph = imports()

    def reaches(start, target, seen=()):
        return any(d == target or (d not in seen and reaches(d, target, (*seen, d))) for d in graph.get(start, ()))

    cycles = sorted(m for m in graph if reaches(m, m))
    assert cycles == []


def test_every_function_is_shorter_than_60_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 >= 60:
                long.append(f"{path.name}:{node.name}")
    assert long == []
