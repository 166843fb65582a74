"""docs/FORMATS.md section 3 is the code's `create_dataset`, and stays so.

The documented signature block (the ```python block of section 3) is parsed as a Python `def`
and compared with `inspect.signature(model.input_pipeline.create_dataset)`: parameter names,
order, kinds (positional or keyword-only), defaults (by value: the doc writes `180` where the code
writes `record_schema.IMAGE_SIZE`) and annotations. The `# features[...]` / `# label` lines of the
block are compared with the element spec of a dataset built on a tiny data folder. Either side
drifting fails here: change the code and the doc together (docs/FORMATS.md says how).
"""

import ast
import inspect
import pathlib
import re

import pytest
import tensorflow as tf

import record_schema
from model.input_pipeline import StreamStart, create_dataset
from tests import record_helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
FORMATS = REPO / "docs" / "FORMATS.md"
SECTION = "## 3. "

# Defaults the doc spells as a call: the value types of the signature.
VALUE_TYPES = {"StreamStart": StreamStart}
KINDS = {"positional": inspect.Parameter.POSITIONAL_OR_KEYWORD, "keyword-only": inspect.Parameter.KEYWORD_ONLY}


def section_3() -> str:
    text = FORMATS.read_text(encoding="utf-8")
    start = text.index("\n" + SECTION)
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def signature_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", section_3(), flags=re.S)
    found = [b for b in blocks if b.lstrip().startswith("create_dataset(")]
    assert len(found) == 1, "docs/FORMATS.md section 3 must hold one ```python block starting create_dataset("
    return found[0]


def documented_def() -> ast.FunctionDef:
    """The block's `create_dataset(...) -> T` as a parsed `def` (the comment lines after it dropped)."""
    code = "\n".join(line for line in signature_block().splitlines() if not line.lstrip().startswith("#"))
    tree = ast.parse("def " + code.strip() + ": ...")
    (function,) = tree.body
    assert function.name == "create_dataset"
    return function


def documented_parameters() -> list[tuple[str, str, object, str]]:
    """(name, kind, default or inspect.Parameter.empty, annotation source) per documented parameter."""
    args = documented_def().args
    assert not args.posonlyargs and not args.vararg and not args.kwarg, "unexpected parameter kinds in the doc"
    positional_defaults = [inspect.Parameter.empty] * (len(args.args) - len(args.defaults)) + [
        _default(d) for d in args.defaults]
    rows = [(a.arg, "positional", d, ast.unparse(a.annotation) if a.annotation else "")
            for a, d in zip(args.args, positional_defaults)]
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        rows.append((a.arg, "keyword-only", inspect.Parameter.empty if d is None else _default(d),
                     ast.unparse(a.annotation) if a.annotation else ""))
    return rows


def _default(node: ast.expr):
    """A documented default: a literal, or a call of one of VALUE_TYPES with literal arguments."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in VALUE_TYPES:
        return VALUE_TYPES[node.func.id](*map(ast.literal_eval, node.args),
                                         **{k.arg: ast.literal_eval(k.value) for k in node.keywords})
    return ast.literal_eval(node)


def _annotation(text) -> str:
    """An annotation as source, normalised (the code's are strings: `from __future__ import annotations`)."""
    if text is inspect.Parameter.empty:
        return ""
    return ast.unparse(ast.parse(text if isinstance(text, str) else inspect.formatannotation(text), mode="eval"))


def code_parameters() -> list[tuple[str, str, object, str]]:
    kind_name = {v: k for k, v in KINDS.items()}
    return [(p.name, kind_name.get(p.kind, str(p.kind)), p.default, _annotation(p.annotation))
            for p in inspect.signature(create_dataset).parameters.values()]


def test_the_documented_signature_is_the_codes():
    documented, code = documented_parameters(), code_parameters()
    assert [row[0] for row in documented] == [row[0] for row in code], "parameter names or order differ"
    for doc_row, code_row in zip(documented, code):
        name = doc_row[0]
        assert doc_row[1] == code_row[1], f"{name}: documented {doc_row[1]}, the code's is {code_row[1]}"
        assert doc_row[2] == code_row[2] and type(doc_row[2]) is type(code_row[2]), (
            f"{name}: documented default {doc_row[2]!r}, the code's is {code_row[2]!r}")
        assert _annotation(doc_row[3] or inspect.Parameter.empty) == code_row[3], (
            f"{name}: documented type {doc_row[3]!r}, the code's is {code_row[3]!r}")
    returns = documented_def().returns
    assert _annotation(ast.unparse(returns) if returns else inspect.Parameter.empty) == _annotation(
        inspect.signature(create_dataset).return_annotation), "return type differs"


def test_every_parameter_is_explained_in_the_section():
    """A parameter in the signature but in no bullet of the section is undocumented."""
    prose = section_3().replace(signature_block(), "")
    missing = [name for name, *_ in code_parameters() if f"`{name}" not in prose]
    assert not missing, f"docs/FORMATS.md section 3 does not explain {missing}"


def documented_outputs() -> dict[str, tuple[str, int]]:
    """'images' / 'mask' / 'product_id' / 'label' -> (dtype name, rank) from the block's comment lines."""
    outputs = {}
    for line in signature_block().splitlines():
        match = re.match(r'#\s*(?:features\["(\w+)"\]|(label)):\s*(\w+)\s+\[([^\]]*)\]', line.strip())
        if match:
            outputs[match.group(1) or match.group(2)] = (match.group(3), len(match.group(4).split(",")))
    return outputs


@pytest.mark.parametrize("crop_size", [None, 24])
def test_the_documented_output_is_what_the_dataset_yields(tmp_path, crop_size):
    data_dir = record_helpers.write_data_dir(str(tmp_path / "data"))
    dataset = create_dataset(str(pathlib.Path(data_dir) / record_schema.shard_pattern("train")), batch_size=4,
                             training=True, image_size=32, crop_size=crop_size, seed=0)
    features, label = dataset.element_spec
    actual = {name: (spec.dtype.name, spec.shape.rank) for name, spec in features.items()}
    actual["label"] = (label.dtype.name, label.shape.rank)
    assert documented_outputs() == actual
    side = crop_size or 32
    assert features[record_schema.IMAGES].shape.as_list() == [4, record_schema.MAX_IMAGES, side, side, 3]
    images, _ = next(iter(dataset))
    assert images[record_schema.IMAGES].dtype == tf.uint8
