"""The layout is the architecture, and this file is its one description: MODEL_LAYERS holds
model/'s roles, bottom to top, and each role imports only its own role and the roles below it;
the two halves meet only at the shared top-level
modules (SHARED) (BUILD_NOTES "Layout" says why). Read from the
source's import statements, so a new import that runs back up a layer fails here. The package
docstrings describe the same structure in words, and are checked to name every module on disk."""

import ast
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# The top-level modules both halves import, and that import neither: the record (record_schema)
# and the stop on SIGINT/SIGTERM (stop_signals). setup.py ships them beside the two packages.
SHARED = ("record_schema", "stop_signals")

ENTRY_POINT = 7  # model/commands/: every command's CLI, above every role
LAUNCHER = 8  # what a user runs (a package's __main__, python -m model.predict): hands a command to launch

# model/'s roles, bottom to top: a module may import its own role and the roles below it.
MODEL_LAYERS = {
    "model.errors": 0, "model.config": 0, "model.model_dir": 0,
    "model.atomic": 1, "model.signals": 1,
    "model.input_pipeline": 3, "model.network": 3,
    "model.export": 4, "model.data_service": 4,  # the service distributes the input pipeline: above it
    "model.training": 5, "model.evaluation": 5,
    "model.cli": 6,
    "model.commands": ENTRY_POINT,
    "model.predict": LAUNCHER,  # python -m model.predict: runs model/commands/predict.py
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path) -> set[str]:
    """Every project module named by an import in the file (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in ("model", "beam_convert", "sample_data", *SHARED)}


def role(name: str) -> str | None:
    for prefix in sorted(MODEL_LAYERS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return None


def rank(name: str) -> int:
    return LAUNCHER if name.endswith(".__main__") else MODEL_LAYERS[role(name)]


MODEL_FILES = sorted((REPO / "model").rglob("*.py"))
CONVERT_FILES = sorted((REPO / "beam_convert").rglob("*.py"))


def upward(name: str, imported: set[str]) -> list[str]:
    """The imports of module `name` that run up, or across to another role of the same layer."""
    return sorted(m for m in imported if role(m) and role(m) != role(name) and rank(m) >= rank(name))


def test_every_model_module_has_a_role():
    assert [n for n in map(module_name, MODEL_FILES) if n != "model" and role(n) is None] == []


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_model_imports_only_its_own_role_and_the_roles_below(path):
    name = module_name(path)
    if role(name) is None:
        return  # model/__init__.py
    assert upward(name, imports_of(path)) == [], f"{name} imports up or across a layer"


def test_the_halves_meet_only_at_the_shared_modules():
    assert not [p for p in CONVERT_FILES if any(n.startswith("model") for n in imports_of(p))]
    assert not [p for p in MODEL_FILES if any(n.startswith("beam_convert") for n in imports_of(p))]


@pytest.mark.parametrize("name", SHARED)
def test_a_shared_module_imports_neither_half_and_is_shipped(name):
    assert imports_of(REPO / f"{name}.py") == set()
    setup = ast.parse((REPO / "setup.py").read_text())
    (shipped,) = [k.value for k in ast.walk(setup) if isinstance(k, ast.keyword) and k.arg == "py_modules"]
    assert name in ast.literal_eval(shipped)


def test_a_launcher_only_hands_a_command_to_launch():
    """A command's flags and body live in model/commands/, beside the other commands."""
    launchers = [p for p in MODEL_FILES if role(module_name(p)) and rank(module_name(p)) == LAUNCHER]
    assert len(launchers) >= 2  # model/predict.py, model/data_service/__main__.py
    for path in launchers:
        assert {role(m) for m in imports_of(path)} - {None} <= {"model.cli", "model.commands"}, path


def test_no_import_cycle_in_model():
    modules = {module_name(p): p for p in MODEL_FILES}
    graph = {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}
    # A package __init__ is imported with any of its modules: edges to it are not dependencies.
    graph = {name: {m for m in edges if modules[m].name != "__init__.py"} for name, edges in graph.items()}
    done, active = set(), []

    def visit(name):
        if name in active:
            pytest.fail("import cycle: " + " -> ".join(active[active.index(name):] + [name]))
        if name in done:
            return
        active.append(name)
        for imported in sorted(graph[name]):
            visit(imported)
        active.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


@pytest.mark.parametrize("name,imported", [
    ("model.evaluation.evaluate", "model.training.loop"),  # evaluation on the train loop
    ("model.input_pipeline.shards", "model.cli"),  # the input side on the command line
    ("model.network.multi_image", "model.input_pipeline.dataset"),  # across one layer
    ("model.input_pipeline.dataset", "model.data_service.stream"),  # back up
])
def test_the_rule_catches_what_it_exists_to_stop(name, imported):
    assert upward(name, {imported, "model.errors", "record_schema"}) == [imported]


# The docstrings describe the structure in words; the check below keeps them naming what is on
# disk, so a module added, moved or renamed without its package's docstring fails here.
PACKAGES = sorted(p.parent for top in ("model", "beam_convert") for p in (REPO / top).rglob("__init__.py"))


def modules_of(package: pathlib.Path) -> list[str]:
    """The package's modules (`foo.py` -> foo, `__main__` included) and its subpackages."""
    files = [p.stem for p in package.glob("*.py") if p.name != "__init__.py"]
    return sorted(files + [p.parent.name for p in package.glob("*/__init__.py")])


def docstring(package: pathlib.Path) -> str:
    return ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""


def unnamed(names: list[str], text: str) -> list[str]:
    """The names that do not appear in text as a word of their own (`create_dataset` does not
    name `dataset`, "multi-image" does not name `multi_image`)."""
    return [n for n in names if not re.search(rf"(?<!\w){re.escape(n)}(?!\w)", text)]


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_each_package_docstring_names_its_modules(package):
    missing = unnamed(modules_of(package), docstring(package))
    assert not missing, f"{package.relative_to(REPO)}/__init__.py: its docstring does not name {missing}"


def test_the_model_docstring_names_every_role():
    roles = [name.removeprefix("model.") for name in MODEL_LAYERS]
    missing = unnamed(roles, docstring(REPO / "model"))
    assert not missing, f"model/__init__.py's docstring does not name the roles {missing}"


def test_the_docstring_check_catches_a_module_left_out():
    text = "create_dataset, the multi-image model, shards"
    assert unnamed(["dataset", "multi_image", "shards"], text) == ["dataset", "multi_image"]


LONGEST_FUNCTION = 60  # lines, decorators and docstring included
LONG_REASON = "# longer than 60 lines:"  # on the line above the def, with the measured reason


def long_functions(path: pathlib.Path, root: pathlib.Path = REPO) -> list[str]:
    """The functions of a file over LONGEST_FUNCTION lines that give no reason for it."""
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = node.end_lineno - first + 1
            if length > LONGEST_FUNCTION and not lines[first - 2].strip().startswith(LONG_REASON):
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_a_screen_without_a_reason():
    assert [f for path in MODEL_FILES + CONVERT_FILES for f in long_functions(path)] == []


def test_the_length_rule_catches_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(LONGEST_FUNCTION))
    path = tmp_path / "probe.py"
    path.write_text(f"def long():\n{body}\n\n\n{LONG_REASON} measured\ndef excused():\n{body}\n")
    assert long_functions(path, root=tmp_path) == ["probe.py:1 long (61 lines)"]
