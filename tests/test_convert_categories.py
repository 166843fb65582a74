"""The class table (beam_convert/categories.py): category_names.csv in, labels.csv out."""

import pytest

import record_schema
from beam_convert import categories as categories_lib
from tests.convert_helpers import CATEGORIES_CSV


def test_read_categories_parses_quoted_commas():
    categories = categories_lib.read_categories(CATEGORIES_CSV.read_text("utf-8"), "category_names.csv")
    assert len(categories) == 5270
    assert [c.category_id for c in categories] == sorted(c.category_id for c in categories)
    assert len({c.level1 for c in categories}) == 49
    assert any('VELO ENFANT (10" - 12"' in c.level3 for c in categories)


@pytest.mark.parametrize("text, message", [
    ("id,a,b,c\n1,x,y,z\n", "header"),
    ("category_id,category_level1,category_level2,category_level3\nx,a,b,c\n", ":2: category_id 'x'"),
    ("category_id,category_level1,category_level2,category_level3\n1,a,b\n", ":2: 3 fields"),
    ("category_id,category_level1,category_level2,category_level3\n1,a,b,c\n1,a,b,c\n", "appears twice"),
])
def test_read_categories_errors_name_the_line(text, message):
    with pytest.raises(ValueError, match=message):
        categories_lib.read_categories(text, "cats.csv")


def test_labels_csv_round_trips_through_a_csv_reader():
    categories = [categories_lib.Category(2, "A, B", 'say "x"', "c"), categories_lib.Category(9)]
    text = categories_lib.labels_csv(categories)
    assert text.splitlines()[0] == ",".join(record_schema.LABELS_HEADER)
    assert text.splitlines()[1] == '0,2,"A, B","say ""x""",c'
