"""From one decoded BSON document to a product to write, or a reason not to: pure functions."""

import dataclasses
from typing import Mapping, Optional, Sequence, Union

import record_schema
from beam_convert.jpeg_check import check_jpeg

# Reasons a product is not converted: the keys of metadata.json "rejected" and of the Beam counters.
CORRUPT_BSON = "corrupt_bson"
BAD_ID = "bad_id"
BAD_IMGS = "bad_imgs"
NO_IMAGES = "no_images"
BAD_PICTURE = "bad_picture"
MISSING_CATEGORY = "missing_category_id"  # in a labelled file
UNEXPECTED_CATEGORY = "unexpected_category_id"  # in an unlabelled file
UNKNOWN_CATEGORY = "unknown_category_id"
DUPLICATE_ID = "duplicate_id"
# ... plus the reasons of jpeg_check: not_jpeg, truncated_jpeg, bad_jpeg, image_too_large.


@dataclasses.dataclass(frozen=True)
class Product:
    product_id: int
    category_id: int  # record_schema.UNLABELLED for test data
    label: int
    images: tuple[bytes, ...]
    dropped_images: int  # beyond max_images: kept out of the record, counted, not rejected


@dataclasses.dataclass(frozen=True)
class Rejection:
    product_id: Optional[int]
    reason: str
    detail: str


def to_product(
    document: Mapping,
    *,
    labels: Optional[Mapping[int, int]],
    max_images: int = record_schema.MAX_IMAGES,
) -> Union[Product, Rejection]:
    """Validates a document. `labels` maps category_id -> class index; None for an unlabelled file.

    A file is labelled or not as a whole (job.FileSummary.labelled): a document that is not like
    the file's majority is rejected, MISSING_CATEGORY in a labelled file, UNEXPECTED_CATEGORY in
    an unlabelled one (its label is not trusted, nor is the product taken for a test product).
    """
    product_id = document.get("_id")
    if not isinstance(product_id, int) or isinstance(product_id, bool):
        return Rejection(None, BAD_ID, f"_id is {type(product_id).__name__}: {product_id!r:.40}")
    imgs = document.get("imgs")
    if not isinstance(imgs, list):
        return Rejection(product_id, BAD_IMGS, f"imgs is {type(imgs).__name__}, expected a list")
    if not imgs:
        return Rejection(product_id, NO_IMAGES, "imgs is empty")
    pictures = []
    for index, entry in enumerate(imgs[:max_images]):
        picture = entry.get("picture") if isinstance(entry, Mapping) else None
        if not isinstance(picture, bytes):
            return Rejection(product_id, BAD_PICTURE, f"imgs[{index}] has no binary 'picture'")
        problem = check_jpeg(picture)
        if problem:
            reason, detail = problem
            return Rejection(product_id, reason, f"imgs[{index}]: {detail}")
        pictures.append(bytes(picture))

    if labels is None:
        if document.get("category_id") is not None:
            return Rejection(product_id, UNEXPECTED_CATEGORY,
                             f"category_id {document['category_id']!r:.40} in a file whose documents mostly have none")
        category_id = label = record_schema.UNLABELLED
    else:
        category_id = document.get("category_id")
        if not isinstance(category_id, int) or isinstance(category_id, bool):
            return Rejection(product_id, MISSING_CATEGORY, f"category_id is {category_id!r:.40}")
        label = labels.get(category_id)
        if label is None:
            return Rejection(product_id, UNKNOWN_CATEGORY, f"category_id {category_id} is not in the categories")
    return Product(product_id, category_id, label, tuple(pictures), max(0, len(imgs) - max_images))


def split_key(image_digests: Sequence[int]) -> int:
    """The product's smallest image digest (record_schema.image_digest).

    Products that share their images (relisted products: identical image sets) have the same
    key, so they land on the same side of the split. Each product has exactly one key, so a
    generic picture shared across thousands of products cannot chain groups together the way
    a transitive (union-find) grouping over shared images would.
    """
    return min(image_digests)


def choose_split(key: int, val_fraction: float) -> str:
    # The digest is already uniform: its unsigned value decides, independently of worker count.
    return "val" if (key % 2**64) < val_fraction * 2**64 else "train"
