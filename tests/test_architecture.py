"""The shape of the package: the commands sit in `commands/` on a flat library and never import each
other (the CLI aside), the library never imports a command and has no import cycle, the device is
asked about in one module, `report` reaches nothing on the model's side, and every function reads in
one screen."""

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


def closure(name: str) -> set[str]:
    """Every module of ours that `name` imports, directly or through others (lazy imports too)."""
    edges, seen, todo = graph(), set(), [name]
    while todo:
        for dep in edges[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


MODEL_LIBRARIES = {"torch", "transformers", "peft", "bitsandbytes"}
# config asks transformers only for the names it accepts (optimizers, schedulers, Hub kernels), and only
# while it checks a config that names them: it holds no model code, and every command reads a config.
NAMES_ONLY = {"config"}


def libraries(path: Path) -> set[str]:
    """The top-level names of what `path` imports from outside, anywhere in it (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def torch_side() -> set[str]:
    """Our modules on the model's side: each one whose source imports torch, transformers, peft or
    bitsandbytes anywhere (lazy imports too; NAMES_ONLY aside), and each module that imports one of
    those, directly or through others."""
    edges = graph()
    side = {name for name, path in modules().items() if libraries(path) & MODEL_LIBRARIES} - NAMES_ONLY
    while grown := {name for name, deps in edges.items() if deps & side} - side:
        side |= grown
    return side


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


def test_the_model_side_is_what_loads_runs_or_trains_a_model():
    side = torch_side()
    assert side >= {"modeling", "generation", "training", "step_graphs", "summarizer", "runtime", "batching"}
    assert side.isdisjoint({"config", "metrics", "files", "layout", "predictor", "report_page", "errors"})


def test_report_reaches_no_module_on_the_models_side():
    """`report` re-scores text and draws a page: it needs no torch, so it imports nothing that does
    (tests/test_report.py runs it and finds no torch loaded)."""
    assert sorted(closure("commands.report") & torch_side()) == []


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
