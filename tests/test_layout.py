"""The layout is the architecture (BUILD_NOTES "Layout"): the two halves meet only at
record_schema, and inside model/ each role imports only the roles below it. Read from the
source's import statements, so a new import that runs back up a layer fails here."""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

ENTRY_POINT = 7  # a package's __main__: a command, above every role

# model/'s roles, bottom to top: a module may import its own role and the roles below it.
MODEL_LAYERS = {
    "model.errors": 0, "model.config": 0, "model.model_dir": 0,
    "model.atomic": 1, "model.signals": 1,
    "model.input_pipeline": 3, "model.network": 3,
    "model.export": 4, "model.data_service": 4,  # the service distributes the input pipeline: above it
    "model.training": 5, "model.evaluation": 5,
    "model.cli": 6,
    "model.predict": ENTRY_POINT,  # a command (python -m model.predict) in a module of its own
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
    return {n for n in names if n.split(".")[0] in ("model", "beam_convert", "record_schema", "sample_data")}


def role(name: str) -> str | None:
    for prefix in sorted(MODEL_LAYERS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return None


def rank(name: str) -> int:
    return ENTRY_POINT if name.endswith(".__main__") else MODEL_LAYERS[role(name)]


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


def test_the_halves_meet_only_at_record_schema():
    assert not [p for p in CONVERT_FILES if any(n.startswith("model") for n in imports_of(p))]
    assert not [p for p in MODEL_FILES if any(n.startswith("beam_convert") for n in imports_of(p))]


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
