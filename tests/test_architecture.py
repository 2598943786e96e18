"""The shape of the package: the commands sit in `commands/` on a flat library and never import each
other (the CLI aside), the library never imports a command and has no import cycle, the device is
asked about in one module, and every function reads in one screen."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "samsum_qlora"
COMMANDS = PACKAGE / "commands"


def modules() -> dict[str, Path]:
    """'train' for the library's train.py, 'commands.train' for a command's."""
    found = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    found |= {f"commands.{p.stem}": p for p in COMMANDS.glob("*.py") if p.stem != "__init__"}
    return found


def imported(path: Path) -> dict[str, set[str]]:
    """samsum_qlora module -> the names imported from it, anywhere in `path` (lazy imports too);
    a module imported whole maps to {'*'}."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("samsum_qlora"):
            module = node.module.removeprefix("samsum_qlora").removeprefix(".")
            if module in ("", "commands"):  # from samsum_qlora(.commands) import a, b
                for alias in node.names:
                    found.setdefault(f"{module}.{alias.name}".lstrip("."), set()).add("*")
            else:
                found.setdefault(module, set()).update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("samsum_qlora."):
                    found.setdefault(alias.name.removeprefix("samsum_qlora."), set()).add("*")
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imported(path) if m in known} - {name} for name, path in known.items()}


def is_command(name: str) -> bool:
    return name.startswith("commands.")


def test_every_command_lives_in_commands_and_the_cli_knows_each():
    commands = {n for n in modules() if is_command(n)} - {"commands.cli"}
    assert commands >= {"commands.train", "commands.evaluate", "commands.bench", "commands.report"}
    assert graph()["commands.cli"] >= commands  # the CLI reaches every command


def test_no_command_imports_another_and_the_library_imports_none():
    offenders = {
        name: sorted(d for d in deps if is_command(d))
        for name, deps in graph().items()
        if name != "commands.cli" and any(is_command(d) for d in deps)
    }
    assert offenders == {}


def test_bench_imports_no_private_function():
    """bench times what the commands run through the library's public functions, never a copy or
    a private helper of theirs."""
    private = {m: sorted(n for n in names if n.startswith("_")) for m, names in imported(COMMANDS / "bench.py").items()}
    assert {m: n for m, n in private.items() if n} == {}


def test_the_library_has_no_import_cycle():
    edges = graph()

    def reaches(start, target, seen=()):
        return any(d == target or (d not in seen and reaches(d, target, (*seen, d))) for d in edges.get(start, ()))

    assert sorted(m for m in edges if reaches(m, m)) == []


def test_only_runtime_asks_whether_there_is_a_gpu():
    asking = sorted(n for n, p in modules().items() if re.search(r"cuda\.is_available\(", p.read_text()))
    assert asking == ["runtime"]


def test_no_model_family_attribute_outside_the_model_modules():
    """A Llama-only attribute (`.model.norm`, `.model.layers`, `.lm_head`) breaks other families."""
    pattern = re.compile(r"\.model\.(norm|layers|embed_tokens)\b|\.lm_head\b")
    offenders = sorted(
        n for n, p in modules().items() if n not in ("chat", "modeling") and pattern.search(p.read_text())
    )
    assert offenders == []


def test_every_function_is_shorter_than_60_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 >= 60:
                long.append(f"{path.name}:{node.name}")
    assert long == []
