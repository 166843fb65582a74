"""The class table: category_names.csv in, labels.csv out."""

import csv
import dataclasses
import io
from typing import Iterable

import record_schema

CATEGORIES_HEADER = ("category_id", "category_level1", "category_level2", "category_level3")


@dataclasses.dataclass(frozen=True)
class Category:
    category_id: int
    level1: str = ""
    level2: str = ""
    level3: str = ""


def read_categories(text: str, source: str) -> list[Category]:
    """Parses category_names.csv, sorted by category_id: the order of labels.csv."""
    return sorted(categories_in_file_order(text, source), key=lambda category: category.category_id)


def categories_in_file_order(text: str, source: str) -> list[Category]:
    """Parses and checks category_names.csv (quoted fields hold commas); errors name the line.

    In the file's order, which sample_data.synthetic numbers its classes by.
    """
    reader = csv.reader(io.StringIO(text))
    header = tuple(next(reader, ()))
    if header != CATEGORIES_HEADER:
        raise ValueError(f"{source}: header is {','.join(header)!r}, expected {','.join(CATEGORIES_HEADER)!r}")
    categories = {}
    for line_number, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(CATEGORIES_HEADER):
            raise ValueError(f"{source}:{line_number}: {len(row)} fields, expected {len(CATEGORIES_HEADER)}")
        try:
            category_id = int(row[0])
        except ValueError:
            raise ValueError(f"{source}:{line_number}: category_id {row[0]!r} is not an integer") from None
        if category_id in categories:
            raise ValueError(f"{source}:{line_number}: category_id {category_id} appears twice")
        categories[category_id] = Category(category_id, *row[1:])
    if not categories:
        raise ValueError(f"{source}: no categories")
    return list(categories.values())


def categories_from_ids(category_ids: Iterable[int]) -> list[Category]:
    """Classes seen in the data, when no categories file is given: no hierarchy."""
    return [Category(category_id) for category_id in sorted(set(category_ids))]


def label_map(categories: list[Category]) -> dict[int, int]:
    return {category.category_id: label for label, category in enumerate(categories)}


def labels_csv(categories: list[Category]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(record_schema.LABELS_HEADER)
    for label, c in enumerate(categories):
        writer.writerow((label, c.category_id, c.level1, c.level2, c.level3))
    return out.getvalue()
