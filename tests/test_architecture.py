"""The shape of the package: the commands sit in `commands/` on a flat library and never import each
other (the CLI aside), the library never imports a command and has no import cycle, the device is
asked about in one module, transformers' (peft's, accelerate's) private surface is named in one
module (hf_compat), `report` reaches nothing on the model's side, and every function reads in one
screen."""

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


def model_side_graph() -> dict[str, set[str]]:
    """graph(), where NAMES_ONLY modules reach hf_compat only for the names it checks (below)."""
    return {name: deps - {"hf_compat"} if name in NAMES_ONLY else deps for name, deps in graph().items()}


def closure(name: str) -> set[str]:
    """Every module of ours that `name` imports, directly or through others (lazy imports too)."""
    edges, seen, todo = model_side_graph(), set(), [name]
    while todo:
        for dep in edges[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


MODEL_LIBRARIES = {"torch", "transformers", "peft", "bitsandbytes"}
# config asks transformers only for the names it accepts (optimizers, schedulers, Hub kernels), and only
# while it checks a config that names them (through hf_compat's Hub-kernel name checks): it holds no
# model code, and every command reads a config.
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
    edges = model_side_graph()
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


def test_only_choices_reads_the_free_memory_and_decides():
    """Decide once: the free GPU memory is read, and an automatic choice made, in choices.py only."""
    reading = sorted(n for n, p in modules().items() if re.search(r"\bfree_memory\(\)|mem_get_info\(", p.read_text()))
    assert reading == ["choices", "runtime"]  # runtime defines the read, choices alone calls it
    deciding = sorted(n for n, p in modules().items() if re.search(r"^def should_\w+\(", p.read_text(), re.M))
    assert deciding == ["choices"]


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


# What transformers, peft and accelerate keep private (or undocumented) and the package leans on:
# named in samsum_qlora/hf_compat.py alone, so that an upgrade is checked in one place.
LIBRARY_SURFACE = re.compile(
    r"(?<!hf_compat\.)\b(_attn_implementation|apply_rotary_pos_emb|_n_gpu|_track_num_input_tokens|_prepare_inputs"
    r"|_load_best_model|loss_is_scaled_for_ga|model_accepts_loss_kwargs|training_bar|use_kernels|is_loaded_in_4bit"
    r"|cast_input_dtype_enabled|_original_forward|KERNELS_M(IN|AX)_VERSION|is_kernels_available)\b|inspect\.signature"
)
# (module, the line's text): where Python itself needs the name outside hf_compat
SURFACE_ALLOWED = {
    # an override must be a method of the subclass, under the Trainer's name; hf_compat lists it
    # (OVERRIDDEN_TRAINER_METHODS) and tests/test_hf_compat.py checks the Trainer still calls it
    ("training", "def _track_num_input_tokens(self, inputs):"),
    # ReadableProgress is a ProgressCallback: it writes through the bar its base class keeps on self
    # (hf_compat.PROGRESS_BAR, checked there)
    ("training", "if not state.is_world_process_zero or self.training_bar is None:"),
    ("training", "self.training_bar.write("),
    ("training", "self.training_bar.write(format_log(state.global_step, state.max_steps, logs))"),
}


def test_only_hf_compat_names_the_libraries_private_surface():
    found = set()
    for name, path in modules().items():
        if name == "hf_compat":
            continue
        for line in path.read_text().splitlines():
            if LIBRARY_SURFACE.search(line):
                found.add((name, line.split("  #")[0].strip()))
    assert found - SURFACE_ALLOWED == set()


def defined_names(trees) -> set[str]:
    """Every name the package defines: functions, classes, class attributes, attributes set on self."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            body = node.body if isinstance(node, ast.ClassDef) else [node]
            for stmt in body:
                targets = stmt.targets if isinstance(stmt, ast.Assign) else getattr(stmt, "target", None)
                for t in targets if isinstance(targets, list) else [targets] if targets else []:
                    for e in t.elts if isinstance(t, ast.Tuple) else [t]:
                        if isinstance(e, ast.Name) and isinstance(node, ast.ClassDef):
                            names.add(e.id)
                        elif isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self":
                            names.add(e.attr)
    return names


def private_names_used(tree) -> set[str]:
    """`x._name`, and `getattr(x, "_name")` and its kin: the private attributes a module reaches for."""
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
            if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                used.add(node.args[1].value)
    return {n for n in used if n.startswith("_") and not n.startswith("__")}


# other libraries' private names, none of transformers, peft or accelerate, with the reason
OTHER_PRIVATE = {
    "_foreach_copy_": "torch's fused list copy (step_graphs), stable across releases",
    "_foreach_add_": "torch's fused list add (step_graphs), stable across releases",
    "_instances": "tqdm's open bars, closed when the CLI is interrupted (commands.cli)",
}


def test_no_module_but_hf_compat_reaches_for_another_librarys_private_attribute():
    """A private attribute used outside hf_compat is one the package defines itself, or one of
    OTHER_PRIVATE."""
    trees = {name: ast.parse(path.read_text()) for name, path in modules().items()}
    ours = defined_names(trees.values()) | set(OTHER_PRIVATE)
    reached = {name: sorted(private_names_used(tree) - ours) for name, tree in trees.items() if name != "hf_compat"}
    assert {name: used for name, used in reached.items() if used} == {}
