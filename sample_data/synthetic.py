"""Synthetic Cdiscount-like BSON for tests, the demo and benchmarks.

Not shipped to Dataflow workers (setup.py leaves sample_data out).

The real train.bson is 58 GB and cannot ship with the repo; this writes files with the same layout
(mongodump: concatenated BSON documents `{_id, imgs: [{picture}], category_id}` in that field
order, ascending non-contiguous int32 `_id`, 180x180 RGB JPEGs of ~6 KB, 1.7 images a product)
whose classes are meant to be learnable by a small CNN in minutes on a CPU.

Classes
  * Regular classes: one visual cue each, a (shape, colour) pair drawn at a random position,
    scale, rotation and colour jitter over a noisy textured background, so a model has to learn
    the cue rather than memorise pixels. Every image of the product shows the same cue.
  * Split classes come in pairs that share two cues drawn with shapes no regular class uses.
    The "same" class of a pair shows one cue on all its images, the "mixed" class shows both.
    Each image alone is equally likely under both classes (each cue has probability 1/2 and the
    image counts have the same distribution), so averaging per-image predictions is at chance;
    only a model that compares the images of a product can tell them apart (an XOR).

Category ids are the first `num_classes` rows of data/category_names.csv, so
`--categories=data/category_names.csv` works on synthetic files; `write_categories_csv` writes
the small equivalent. Output is a pure function of the arguments: every picture is rendered from
its own seed, which the product plan fixes before any pixel is drawn.

    python -m sample_data.synthetic --output=/tmp/train.bson --products=10000 \
        [--classes=20] [--split_classes=4] [--seed=0] [--unlabelled] [--categories_out=PATH]

(from the repository root: this package is not installed, see sample_data/__init__.py).
"""

import collections
import csv
import functools
import io
import math
import os
import pathlib
import random
import sys
import time
from typing import Iterator, NamedTuple, Sequence

import bson
import numpy as np
from PIL import Image, ImageChops, ImageDraw

from beam_convert import categories as categories_lib

IMAGE_SIZE = 180
DEFAULT_CATEGORIES_CSV = pathlib.Path(__file__).resolve().parent.parent / "data" / "category_names.csv"
CATEGORIES_HEADER = categories_lib.CATEGORIES_HEADER  # of the file write_categories_csv writes

# The default number of classes, and how many of them are split classes (see Classes above).
DEFAULT_CLASSES = 20
DEFAULT_SPLIT_CLASSES = 4

# Images per product in the real train.bson: about 60% / 20% / 10% / 10%, mean 1.7.
IMAGES_PER_PRODUCT = {1: 0.6, 2: 0.2, 3: 0.1, 4: 0.1}

# Share of products that are relistings of a recent product of the same class with the very same
# pictures. In the real data 7.8M of the 12.4M training images are unique (~63%); relisting only
# originals keeps the groups of products that share a picture small (stars around one original),
# so a split that keeps such groups together still has thousands of groups to spread.
DUPLICATE_FRACTION = 0.35
_RELIST_WINDOW = 20

REGULAR_SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "hstripes", "vstripes")
SPLIT_SHAPES = ("star", "chevron")
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 170, 55),
    "blue": (40, 70, 215),
    "yellow": (230, 205, 30),
    "magenta": (195, 45, 195),
    "cyan": (35, 195, 205),
    "orange": (240, 130, 25),
    "white": (240, 240, 240),
}
# The two cues of a split pair differ only in colour: the easiest difference for a small CNN,
# so the only hard part of a split class is the one it is there to test.
_SPLIT_COLOUR_PAIRS = (("red", "blue"), ("green", "yellow"), ("magenta", "cyan"), ("orange", "white"))
MAX_SPLIT_CLASSES = 2 * len(SPLIT_SHAPES) * len(_SPLIT_COLOUR_PAIRS)
# Regular classes beyond this reuse cues cyclically: still fine for conversion benchmarks, but
# classes that share a cue cannot be told apart.
DISTINCT_REGULAR_CLASSES = len(REGULAR_SHAPES) * len(COLOURS)


class Cue(NamedTuple):
    shape: str
    colour: str


class ProductPlan(NamedTuple):
    """Everything about a product except its pixels; `pictures` are (cue, render seed) pairs."""

    product_id: int
    label: int  # class index in this module's order; labels.csv numbers classes by sorted id
    category_id: int
    pictures: tuple  # of (Cue, int)
    copy_of: int | None  # product_id this is a relisting of


# ---------------------------------------------------------------------------------------------
# Classes


@functools.lru_cache(maxsize=None)
def _categories(path: str) -> tuple[categories_lib.Category, ...]:
    with open(path, newline="", encoding="utf-8") as f:
        return tuple(categories_lib.categories_in_file_order(f.read(), path))


def category_ids(num_classes: int, categories_csv=DEFAULT_CATEGORIES_CSV) -> list[int]:
    """The first `num_classes` real category ids, in file order (class index = position)."""
    categories = _categories(str(categories_csv))
    if not 1 <= num_classes <= len(categories):
        raise ValueError(f"num_classes={num_classes}: expected 1..{len(categories)}")
    return [category.category_id for category in categories[:num_classes]]


def _check_classes(num_classes: int, num_split_classes: int) -> None:
    if num_split_classes % 2 or not 0 <= num_split_classes <= MAX_SPLIT_CLASSES:
        raise ValueError(
            f"num_split_classes={num_split_classes}: expected an even number in 0..{MAX_SPLIT_CLASSES}"
        )
    if num_split_classes > num_classes:
        raise ValueError(f"num_split_classes={num_split_classes} > num_classes={num_classes}")


def class_cues(
    num_classes: int = DEFAULT_CLASSES, num_split_classes: int = DEFAULT_SPLIT_CLASSES
) -> list[tuple[Cue, ...]]:
    """The cues of each class (label order): one for a regular class, the pair's two for a split one.

    Regular classes come first, split pairs last as (same, mixed). Consecutive regular classes
    differ in both shape and colour, so a handful of classes already needs both to be learnt.
    """
    _check_classes(num_classes, num_split_classes)
    shapes, colours = REGULAR_SHAPES, list(COLOURS)
    cues = []
    for i in range(num_classes - num_split_classes):
        j = i % DISTINCT_REGULAR_CLASSES
        # Distinct for j < 64: equal shapes need j = j' + 8k, then colours differ by k mod 8.
        cues.append((Cue(shapes[j % len(shapes)], colours[(j + j // len(shapes)) % len(colours)]),))
    for p in range(num_split_classes // 2):
        shape = SPLIT_SHAPES[p % len(SPLIT_SHAPES)]
        pair = tuple(Cue(shape, c) for c in _SPLIT_COLOUR_PAIRS[p // len(SPLIT_SHAPES)])
        cues += [pair, pair]
    return cues


def split_class_pairs(
    num_classes: int = DEFAULT_CLASSES,
    num_split_classes: int = DEFAULT_SPLIT_CLASSES,
    categories_csv=DEFAULT_CATEGORIES_CSV,
):
    """[(same_category_id, mixed_category_id), ...] for each split pair."""
    _check_classes(num_classes, num_split_classes)
    ids = category_ids(num_classes, categories_csv)[num_classes - num_split_classes :]
    return list(zip(ids[0::2], ids[1::2]))


def split_category_ids(
    num_classes: int = DEFAULT_CLASSES,
    num_split_classes: int = DEFAULT_SPLIT_CLASSES,
    categories_csv=DEFAULT_CATEGORIES_CSV,
):
    """The category ids whose evidence is split across a product's images."""
    return [cid for pair in split_class_pairs(num_classes, num_split_classes, categories_csv) for cid in pair]


SPLIT_CATEGORY_IDS = tuple(split_category_ids()) if DEFAULT_CATEGORIES_CSV.exists() else ()
"""Split-class ids for the defaults (20 classes, 4 split); empty outside a source checkout."""


def images_per_product_distributions(split_share: float) -> tuple[dict, dict]:
    """(regular, split) image-count distributions whose mixture is IMAGES_PER_PRODUCT.

    Split products need >= 2 images, so they take the target conditioned on >= 2 and regular
    products make up for it with more single-image products. Past split_share 0.4 the target
    cannot be met; regular products then get single images only.
    """
    multi = {k: v for k, v in IMAGES_PER_PRODUCT.items() if k >= 2}
    split = {k: v / sum(multi.values()) for k, v in multi.items()}
    if split_share >= 1:
        return {1: 1.0}, split
    regular = {
        k: max(0.0, v - split_share * split.get(k, 0.0)) / (1 - split_share)
        for k, v in IMAGES_PER_PRODUCT.items()
    }
    total = sum(regular.values())
    return {k: v / total for k, v in regular.items()}, split


# ---------------------------------------------------------------------------------------------
# Product plans (no pixels)


def _draw(rng: random.Random, distribution: dict) -> int:
    return rng.choices(list(distribution), weights=list(distribution.values()))[0]


def _split_cue_indices(rng: random.Random, n: int, mixed: bool) -> list[int]:
    """Which of the pair's two cues each picture shows.

    "same": all pictures show cue 0 or all cue 1. "mixed": each picture is an independent fair
    coin, redrawn until both cues appear. Both give every picture cue 1 with probability 1/2 and
    the same joint law for any single position, which is what makes the pair an XOR.
    """
    if not mixed:
        return [rng.randrange(2)] * n
    while True:
        picks = [rng.randrange(2) for _ in range(n)]
        if 0 < sum(picks) < n:
            return picks


def plan_products(
    num_products: int,
    *,
    num_classes: int = DEFAULT_CLASSES,
    seed: int = 0,
    num_split_classes: int = DEFAULT_SPLIT_CLASSES,
    duplicate_fraction: float = DUPLICATE_FRACTION,
    categories_csv=DEFAULT_CATEGORIES_CSV,
    first_id: int = 0,
) -> Iterator[ProductPlan]:
    """The products `write_bson` renders: classes, ids, image counts, cues, seeds, copies.

    Cheap (no pixels), so tests and analyses can check the design on many products.
    """
    cues = class_cues(num_classes, num_split_classes)
    ids = category_ids(num_classes, categories_csv)
    first_split = num_classes - num_split_classes
    regular_counts, split_counts = images_per_product_distributions(num_split_classes / num_classes)
    rng = random.Random(seed)
    recent = collections.defaultdict(lambda: collections.deque(maxlen=_RELIST_WINDOW))
    product_id = first_id  # files meant to be converted together need disjoint ids
    for _ in range(num_products):
        label = rng.randrange(num_classes)
        if recent[label] and rng.random() < duplicate_fraction:
            source = rng.choice(recent[label])
            yield ProductPlan(product_id, label, ids[label], source.pictures, source.product_id)
        else:
            if label < first_split:
                n = _draw(rng, regular_counts)
                shown = [cues[label][0]] * n
            else:
                n = _draw(rng, split_counts)
                mixed = (label - first_split) % 2 == 1
                shown = [cues[label][i] for i in _split_cue_indices(rng, n, mixed)]
            pictures = tuple((cue, rng.getrandbits(63)) for cue in shown)
            plan = ProductPlan(product_id, label, ids[label], pictures, None)
            recent[label].append(plan)
            yield plan
        # The real file skips ids (deleted products): 82 products span 0..101.
        product_id += 1 + (rng.randrange(1, 4) if rng.random() < 0.15 else 0)


# ---------------------------------------------------------------------------------------------
# Pictures


@functools.lru_cache(maxsize=1)
def _textures() -> tuple[Image.Image, Image.Image]:
    """A large smooth background field and a large grain field, cut up at random offsets.

    Rendering them per picture would cost more than the JPEG encode; crops of a 1024 px field
    are distinct enough (offsets, plus the object and jitter on top) and cost nothing.
    """
    rng = np.random.default_rng(20171)
    grey = rng.uniform(70, 175, size=(14, 14, 1))
    tint = rng.uniform(-28, 28, size=(14, 14, 3))
    low = np.clip(grey + tint, 0, 255).astype(np.uint8)
    background = Image.fromarray(low).resize((1024, 1024), Image.BICUBIC)
    # Grain around 128, added with offset -128: what makes pictures ~6 KB like the real ones
    # instead of ~2 KB flat drawings, and stops a model from keying on exact pixel values.
    grain = np.clip(rng.normal(128, 9, size=(512, 512, 3)), 0, 255).astype(np.uint8)
    return background, Image.fromarray(grain)


_UNIT_POLYGONS = {
    "square": [[(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]],
    "diamond": [[(0, -1), (1, 0), (0, 1), (-1, 0)]],
    "triangle": [[(0, -1), (0.9, 0.65), (-0.9, 0.65)]],
    "cross": [
        [(-1, -0.25), (1, -0.25), (1, 0.25), (-1, 0.25)],
        [(-0.25, -1), (0.25, -1), (0.25, 1), (-0.25, 1)],
    ],
    "hstripes": [[(-1, y), (1, y), (1, y + 0.38), (-1, y + 0.38)] for y in (-0.95, -0.19, 0.57)],
    "vstripes": [[(x, -1), (x + 0.38, -1), (x + 0.38, 1), (x, 1)] for x in (-0.95, -0.19, 0.57)],
    "star": [[(r * math.sin(k * math.pi / 5), -r * math.cos(k * math.pi / 5)) for k, r in enumerate([1.0, 0.42] * 5)]],
    "chevron": [[(-1, 0.35), (0, -0.75), (1, 0.35), (1, 0.95), (0, -0.15), (-1, 0.95)]],
}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, angle: float, fill):
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(3, round(0.32 * radius)))
    else:
        cos, sin = math.cos(angle), math.sin(angle)
        for polygon in _UNIT_POLYGONS[shape]:
            points = [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in polygon]
            draw.polygon(points, fill=fill)


@functools.lru_cache(maxsize=8192)
def render_picture(cue: Cue, seed: int) -> bytes:
    """One 180x180 RGB JPEG showing `cue`; a pure function of its arguments.

    Cached because relistings reuse pictures of recent products: same bytes, no second encode.
    """
    rng = random.Random(seed)
    background, grain = _textures()
    ox, oy = rng.randrange(1024 - IMAGE_SIZE), rng.randrange(1024 - IMAGE_SIZE)
    image = background.crop((ox, oy, ox + IMAGE_SIZE, oy + IMAGE_SIZE))
    radius = rng.uniform(24, 60)
    margin = 0.75 * radius
    cx, cy = rng.uniform(margin, IMAGE_SIZE - margin), rng.uniform(margin, IMAGE_SIZE - margin)
    # +-20 degrees: enough to stop template matching, not enough to turn a square into a diamond
    # or horizontal stripes into vertical ones.
    angle = math.radians(rng.uniform(-20, 20))
    fill = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[cue.colour])
    _draw_shape(ImageDraw.Draw(image), cue.shape, cx, cy, radius, angle, fill)
    gx, gy = rng.randrange(512 - IMAGE_SIZE), rng.randrange(512 - IMAGE_SIZE)
    image = ImageChops.add(image, grain.crop((gx, gy, gx + IMAGE_SIZE, gy + IMAGE_SIZE)), 1.0, -128)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=rng.randint(72, 82))
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# Documents and files


def to_document(plan: ProductPlan, *, labelled: bool = True) -> dict:
    """The BSON document, fields in the real file's order: _id, imgs, category_id."""
    pictures = [{"picture": bson.binary.Binary(render_picture(cue, seed))} for cue, seed in plan.pictures]
    doc = {"_id": plan.product_id, "imgs": pictures}
    if labelled:
        doc["category_id"] = plan.category_id
    return doc


def write_bson(
    path,
    num_products: int,
    *,
    num_classes: int = DEFAULT_CLASSES,
    seed: int = 0,
    labelled: bool = True,
    num_split_classes: int = DEFAULT_SPLIT_CLASSES,
    duplicate_fraction: float = DUPLICATE_FRACTION,
    categories_csv=DEFAULT_CATEGORIES_CSV,
    first_id: int = 0,
) -> dict:
    """Writes a mongodump-style file of `num_products` products; returns a summary of what is in it.

    `labelled=False` gives the same products without `category_id` (a test file whose answers
    are the labelled run with the same arguments). Written to a temporary name and renamed, so an
    interrupted run never leaves a file that looks complete.
    """
    start = time.perf_counter()
    histogram = collections.Counter()
    digests = set()
    images = 0
    path = os.fspath(path)
    partial = path + ".partial"
    plans = plan_products(
        num_products,
        num_classes=num_classes,
        seed=seed,
        num_split_classes=num_split_classes,
        duplicate_fraction=duplicate_fraction,
        first_id=first_id,
        categories_csv=categories_csv,
    )
    try:
        with open(partial, "wb") as f:
            for plan in plans:
                doc = to_document(plan, labelled=labelled)
                f.write(bson.encode(doc))
                pictures = [img["picture"] for img in doc["imgs"]]
                histogram[len(pictures)] += 1
                images += len(pictures)
                digests.update(hash(p) for p in pictures)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    ids = category_ids(num_classes, categories_csv)
    return {
        "path": path,
        "products": num_products,
        "images": images,
        "unique_images": len(digests),
        "images_per_product": {str(k): histogram[k] for k in sorted(histogram)},
        "labelled": labelled,
        "num_classes": num_classes,
        "category_ids": ids,
        "split_category_ids": split_category_ids(num_classes, num_split_classes, categories_csv),
        "bytes": os.path.getsize(path),
        "seconds": round(time.perf_counter() - start, 2),
    }


def write_categories_csv(path, category_ids: Sequence[int], categories_csv=DEFAULT_CATEGORIES_CSV) -> None:
    """A category_names.csv with only `category_ids`, sorted, names taken from the real file.

    Ids the real file does not know get placeholder names rather than an error, so any id list
    works; the csv module quotes the real names that contain commas.
    """
    known = {}
    if os.path.exists(categories_csv):
        known = {c.category_id: (c.level1, c.level2, c.level3) for c in _categories(str(categories_csv))}
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CATEGORIES_HEADER)
        for cid in sorted(set(category_ids)):
            writer.writerow([cid, *known.get(cid, ("SYNTHETIC", "SYNTHETIC", f"SYNTHETIC {cid}"))])


# ---------------------------------------------------------------------------------------------
# Command line


def _define_flags():
    # Defined only when run as a program: importing this module from the demo or a benchmark
    # must not collide with their own flags.
    from absl import flags

    flags.DEFINE_string("output", None, "BSON file to write.", required=True)
    flags.DEFINE_integer("products", None, "Number of products.", required=True, lower_bound=1)
    flags.DEFINE_integer("classes", DEFAULT_CLASSES, "Classes: the first rows of data/category_names.csv.",
                         lower_bound=1)
    flags.DEFINE_integer("split_classes", DEFAULT_SPLIT_CLASSES, "How many of them are split classes (even).",
                         lower_bound=0)
    flags.DEFINE_integer("seed", 0, "Random seed; the output is a pure function of the flags.")
    flags.DEFINE_bool("unlabelled", False, "Omit category_id, like the real test.bson.")
    flags.DEFINE_float("duplicate_fraction", DUPLICATE_FRACTION, "Share of products that relist pictures.")
    flags.DEFINE_string("categories_out", None, "Also write a category_names.csv of the classes here.")
    return flags.FLAGS


def _main(argv) -> None:
    from absl import flags

    del argv
    FLAGS = flags.FLAGS
    try:
        summary = write_bson(
            FLAGS.output,
            FLAGS.products,
            num_classes=FLAGS.classes,
            seed=FLAGS.seed,
            labelled=not FLAGS.unlabelled,
            num_split_classes=FLAGS.split_classes,
            duplicate_fraction=FLAGS.duplicate_fraction,
        )
    except (ValueError, OSError) as e:
        sys.exit(f"sample_data.synthetic: {e}")
    if FLAGS.categories_out:
        write_categories_csv(FLAGS.categories_out, summary["category_ids"])
    print(
        f"wrote {summary['products']} products, {summary['images']} images ({summary['unique_images']} unique), "
        f"images per product {summary['images_per_product']}, {summary['num_classes']} classes "
        f"({len(summary['split_category_ids'])} split), {'labelled' if summary['labelled'] else 'unlabelled'}, "
        f"{summary['bytes']} bytes to {summary['path']} in {summary['seconds']} s"
    )


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(_main)
