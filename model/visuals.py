"""What a person looks at: the evaluation report (PNG) and the TensorBoard grid of sample products.

Over 400 lines: two pictures, each laid out panel by panel so that nothing overlaps; splitting them would scatter shared layout helpers.

report.png (`write_report`, beside metrics.json): a title naming the model, its fusion, the split,
the product count and top-1/top-5; panels for accuracy by number of images, accuracy per level
of the category tree, accuracy by training frequency of the true class, and the most confused
(true -> predicted) category pairs by name. A bucket without products is marked "no products",
never drawn as a zero bar.

The sample grid (`write_sample_grid`, TensorBoard's Images tab): a row per product labelled with
its product id and category, a column per image slot; real slots framed in green, padded slots
(mask 0) in red, hatched and marked "pad".
"""

from __future__ import annotations

import io
import math
import os

import numpy as np

NAME_CHARS = 40  # category names are long French strings: cut to this with an ellipsis
CONFUSED_PAIRS = 10  # pairs drawn in the report (metrics.json keeps more)
NO_PRODUCTS = "no\nproducts"  # the mark of an empty bucket

# Sample grid geometry and colours (tests count these exact colours).
MIN_SIDE = 96  # smaller images are upscaled by a whole factor (nearest) to at least this side
BORDER = 4  # slot frame, pixels
GAP = 6  # between slots and rows
LABEL_WIDTH = 300  # the text column at the left of each row
REAL_COLOR = (0, 170, 60)
PAD_COLOR = (220, 30, 30)
PAD_FILL = (55, 55, 55)
PAD_HATCH = (95, 95, 95)
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)


# ---------------------------------------------------------------------------------------------
# Names


def class_names(labels) -> list:
    """"category_id level3-name" per class index of a labels.Labels (the grid's row labels)."""
    return [f"{int(c)} {name}".strip() for c, name in zip(labels.category_ids, labels.level3)]


def shorten(name: str, width: int = NAME_CHARS) -> str:
    """`name` cut to at most `width` characters, ending in an ellipsis when cut."""
    name = " ".join(str(name).split())
    return name if len(name) <= width else name[:width - 1].rstrip(" -/,(") + "…"


# ---------------------------------------------------------------------------------------------
# report.png


def write_report(metrics: dict, path: str, *, model_name: str = "", fusion: str = "", split: str = "") -> None:
    """report.png from compute_metrics' dict (see `report_figure`); `path` may be any filesystem
    TensorFlow knows (gs://, ram://...)."""
    import matplotlib.pyplot as plt

    fig = report_figure(metrics, model_name=model_name, fusion=fusion, split=split)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    if "://" in path:
        import tensorflow as tf

        with tf.io.gfile.GFile(path, "wb") as f:
            f.write(buffer.getvalue())
    else:
        with open(path, "wb") as f:
            f.write(buffer.getvalue())


def report_figure(metrics: dict, *, model_name: str = "", fusion: str = "", split: str = ""):
    """The report as a matplotlib Figure (the caller closes it).

    Top row: accuracy by image count (top-1 and top-5, n per bucket), top-1 per tree level, top-1
    by training frequency of the true class. Bottom: the most confused category pairs by name.
    Axes carry labels ("by_image_count", "by_level", "by_class_frequency", "most_confused").
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 10.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.1])
    axes = list(top.subplots(1, 3))
    for ax, label in zip(axes, ("by_image_count", "by_level", "by_class_frequency")):
        ax.set_label(label)
    products = int(metrics.get("products", 0) or 0)
    _image_count_panel(axes[0], metrics.get("by_image_count") or {})
    _level_panel(axes[1], metrics.get("by_level"), products)
    _frequency_panel(axes[2], metrics.get("by_class_frequency"))
    _confused_panel(bottom, metrics.get("most_confused") or [], products)
    fig.suptitle(_title(metrics, model_name, fusion, split), fontsize=14)
    return fig


def _title(metrics: dict, model_name: str, fusion: str, split: str) -> str:
    head = [f"model {model_name}" if model_name else "model (unnamed)"]
    if fusion:
        head.append(f"fusion {fusion}")
    if split:
        head.append(f"{split} split")
    products = int(metrics.get("products", 0) or 0)
    if products:
        scores = f"{products:,} products   top-1 {metrics['top1']:.3f}   top-5 {metrics['top5']:.3f}"
    else:
        scores = "0 products: no accuracy to report"
    lines = ["   ·   ".join(head), scores]
    dup = metrics.get("dup_lookup")
    if dup:
        lines.append(f"duplicate-image lookup: {dup['overridden']:,} products overridden; without it top-1 "
                     f"{dup['top1_without']:.3f} ({dup['top1_gain']:+.3f}), top-5 {dup['top5_without']:.3f} "
                     f"({dup['top5_gain']:+.3f})")
    return "\n".join(lines)


def _value_label(ax, x, y, text, **kwargs):
    ax.annotate(text, (x, y), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                fontsize=8, **kwargs)


def _mark_empty(ax, x, width=0.8, top=1.0):
    """An empty bucket: a hatched grey band and "no products" instead of a zero bar."""
    ax.bar(x, top, width=width, color="none", edgecolor="0.75", hatch="///", linewidth=0, gid="empty")
    ax.text(x, top / 2, NO_PRODUCTS, ha="center", va="center", fontsize=8, color="0.3",
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "0.75"})


def _note(ax, text, title):
    ax.set_title(title, fontsize=11)
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, color="0.3", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_color("0.8")


def _accuracy_axis(ax, ylabel):
    # Head room above 1.0 for the value labels and the legend, so neither covers a bar.
    ax.set_ylim(0, 1.22)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.axhline(1.0, color="0.85", linewidth=0.8, zorder=0)
    ax.set_ylabel(ylabel)
    ax.spines[["top", "right"]].set_visible(False)


def _set_xlim(ax, buckets: int):
    """Room for at least 2.5 buckets, so that one bucket is not a wall of colour."""
    half = max(buckets, 2.5) / 2
    ax.set_xlim((buckets - 1) / 2 - half, (buckets - 1) / 2 + half)


def _int_key(key):
    try:
        return (0, int(key))
    except ValueError:
        return (1, str(key))


def _image_count_panel(ax, counts: dict):
    title = "accuracy by number of images"
    if not counts:
        _note(ax, "no products", title)
        return
    keys = sorted(counts, key=_int_key)
    width = 0.38
    for i, key in enumerate(keys):
        bucket = counts[key]
        if not bucket.get("products"):
            _mark_empty(ax, i)
            continue
        for dx, name, color in ((-width / 2, "top1", "tab:blue"), (width / 2, "top5", "tab:orange")):
            value = bucket[name]
            ax.bar(i + dx, value, width=width, color=color, gid=name,
                   label={"top1": "top-1", "top5": "top-5"}[name] if i == _first_full(keys, counts) else None)
            _value_label(ax, i + dx, value, f"{value:.2f}")
    ticks = []
    for key in keys:
        n = counts[key].get("products", 0)
        unit = "image" if str(key) == "1" else "images"
        ticks.append(f"{key} {unit}\nn={n:,}")
    ax.set_xticks(np.arange(len(keys)), ticks, fontsize=8)
    _set_xlim(ax, len(keys))
    _accuracy_axis(ax, "accuracy")
    ax.set_title(title, fontsize=11)
    if any(counts[k].get("products") for k in keys):
        ax.legend(loc="upper center", ncol=2, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1.0))


def _first_full(keys, counts):
    return next((i for i, k in enumerate(keys) if counts[k].get("products")), -1)


LEVELS = (("level1", "level 1"), ("level2", "level 2"), ("level3", "level 3\n(full path)"),
          ("category", "category\n(= top-1)"))


def _level_panel(ax, by_level, products: int):
    title = "top-1 accuracy per level of the category tree"
    if not by_level:
        _note(ax, "no accuracy per tree level\nin these metrics", title)
        return
    if not products:
        _note(ax, "no products", title)
        return
    levels = [(key, name) for key, name in LEVELS if key in by_level]
    colors = ["#9ecae1", "#6baed6", "#3182bd", "#08519c"][-len(levels):]
    for i, ((key, _), color) in enumerate(zip(levels, colors)):
        value = by_level[key]
        ax.bar(i, value, width=0.6, color=color, gid=key)
        _value_label(ax, i, value, f"{value:.3f}")
    ax.set_xticks(np.arange(len(levels)), [name for _, name in levels])
    _set_xlim(ax, len(levels))
    _accuracy_axis(ax, "top-1 accuracy")
    ax.set_title(title, fontsize=11)


def _frequency_panel(ax, bins):
    title = "top-1 by training images of the true class"
    if bins is None:
        _note(ax, "class frequencies unknown:\nno train_image_digests.npz\nbeside the data", title)
        return
    if not bins:
        _note(ax, "no products", title)
        return
    for i, b in enumerate(bins):
        if not b.get("products"):
            _mark_empty(ax, i, width=0.6)
            continue
        ax.bar(i, b["top1"], width=0.6, color="tab:green", gid="top1")
        _value_label(ax, i, b["top1"], f"{b['top1']:.2f}")
    ax.set_xticks(np.arange(len(bins)), [f"{b['train_images']}\nn={b.get('products', 0):,}" for b in bins],
                  fontsize=8)
    _set_xlim(ax, len(bins))
    _accuracy_axis(ax, "top-1 accuracy")
    ax.set_xlabel("training images of the true class", fontsize=9)
    ax.set_title(title, fontsize=11)


def _cell(category_id, name) -> str:
    return f"{category_id}  {shorten(name or '')}".rstrip()


def _confused_panel(fig, pairs: list, products: int):
    """A table in three columns sharing rows: true category, predicted category, count bars."""
    shown = pairs[:CONFUSED_PAIRS]
    title = "most confused categories" + (f": the top {len(shown)} of {len(pairs)} (true, predicted) pairs"
                                          if shown else "")
    if not products or not shown:
        ax = fig.subplots()
        ax.set_label("most_confused")
        _note(ax, "no products" if not products else "no confusions: every product's top-1 was right", title)
        return
    true_ax, predicted_ax, count_ax = fig.subplots(1, 3, sharey=True, width_ratios=[3.2, 3.4, 3.4])
    count_ax.set_label("most_confused")
    y = np.arange(len(shown))
    for ax, header, key in ((true_ax, "true category", "true"), (predicted_ax, "predicted as", "predicted")):
        ax.set_axis_off()
        ax.set_xlim(0, 1)
        ax.set_title(header, loc="left", fontsize=10, fontweight="bold")
        for yi, pair in zip(y, shown):
            prefix = "→  " if key == "predicted" else ""
            ax.text(0, yi, prefix + _cell(pair.get(key, "?"), pair.get(f"{key}_name")), va="center", fontsize=9)
    counts = [int(p["count"]) for p in shown]
    count_ax.barh(y, counts, height=0.6, color="tab:red", alpha=0.75, gid="count")
    for yi, c in zip(y, counts):
        count_ax.annotate(f"{c:,}", (c, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=9)
    count_ax.set_ylim(len(shown) - 0.5, -0.5)
    count_ax.set_xlim(0, max(counts) * 1.15)
    count_ax.tick_params(axis="y", left=False, labelleft=False)
    count_ax.spines[["top", "right", "left"]].set_visible(False)
    count_ax.set_xlabel("products of the true category predicted as the other")
    count_ax.set_title("products", loc="left", fontsize=10, fontweight="bold")
    fig.suptitle(title, fontsize=11)


# ---------------------------------------------------------------------------------------------
# Sample grid


def write_sample_grid(features: dict, label, class_names, log_dir: str, *, step: int = 0) -> np.ndarray:
    """One TensorBoard image summary (log_dir/samples, tag "training_products") of a batch as the
    model sees it, and the same picture as a uint8 [H, W, 3] array.

    features: images uint8 [B, M, S, S, 3], mask [B, M], product_id [B] (tensors or arrays);
    label int [B] class indices, -1 = unlabelled; class_names: str per class index (or None).
    """
    grid = sample_grid(features, label, class_names)
    import tensorflow as tf

    writer = tf.summary.create_file_writer(os.path.join(log_dir, "samples"))
    with writer.as_default():
        tf.summary.image(
            "training_products", grid[None], step=step,
            description=("A row per product: its product id and category (category_id and name) at the "
                         "left, then a column per image slot. Green frame: a real image; red frame, "
                         "hatched grey, 'pad': a padded slot (mask 0) that the model ignores."),
        )
    writer.close()
    return grid


def _numpy(x):
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def _font(size: int, bold: bool = False):
    from PIL import ImageFont

    try:
        import matplotlib

        name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
        return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size)


def row_lines(index: int, product_id, label: int, class_names, mask_row) -> list:
    """A product row's label: ["#1  product 123", "1000010653 COQUE ...", "2 real, 2 padded"]."""
    real = int((np.asarray(mask_row) > 0).sum())
    if label is None or label < 0:
        category = "(unlabelled)"
    elif class_names is not None and label < len(class_names):
        category = str(class_names[label])
    else:
        category = f"class {label}"
    pid = "?" if product_id is None else str(product_id)
    return [f"#{index + 1}  product {pid}", category, f"{real} real, {len(mask_row) - real} padded"]


def _wrap(text: str, font, width: int, max_lines: int) -> list:
    """Greedy word wrap to `width` pixels; the last line ends in an ellipsis when text is left over."""
    words, lines, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = word
        while font.getlength(line) > width:  # a word wider than the column: cut it
            cut = len(line)
            while cut > 1 and font.getlength(line[:cut]) > width:
                cut -= 1
            lines.append(line[:cut])
            line = line[cut:]
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + "…"
    return lines


def _pad_tile(cell: int, font):
    """A padded slot's inside: dark grey, hatched, "pad" in the middle."""
    from PIL import Image, ImageDraw

    tile = Image.new("RGB", (cell, cell), PAD_FILL)
    draw = ImageDraw.Draw(tile)
    for d in range(-cell, cell, 12):
        draw.line([(d, 0), (d + cell, cell)], fill=PAD_HATCH, width=2)
    draw.text((cell / 2, cell / 2), "pad", fill=(255, 255, 255), font=font, anchor="mm",
              stroke_width=3, stroke_fill=PAD_FILL)
    return tile


def sample_grid(features: dict, label, class_names) -> np.ndarray:
    """The picture `write_sample_grid` logs, as a uint8 [H, W, 3] array."""
    from PIL import Image, ImageDraw

    images = _numpy(features["images"])
    if images.dtype != np.uint8:
        images = np.clip(np.round(images), 0, 255).astype(np.uint8)
    mask = _numpy(features["mask"]).reshape(images.shape[:2])
    b, n, s = images.shape[:3]
    pids = _numpy(features["product_id"]).reshape(-1) if "product_id" in features else [None] * b
    labels = _numpy(label).reshape(-1) if label is not None else np.full([b], -1)

    scale = max(1, math.ceil(MIN_SIDE / s))
    cell = s * scale
    slot = cell + 2 * BORDER
    row_height = slot + GAP
    size = 13 if cell < 150 else 16  # larger pictures, larger text: the grid is often shown shrunk
    font, bold, small = _font(size), _font(size, bold=True), _font(size - 1)
    line_height = size + 4
    label_width = LABEL_WIDTH * size // 13
    header = 2 * line_height + GAP
    width = label_width + n * (slot + GAP) + GAP
    height = header + b * row_height + GAP

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    legend = (f"{b} products · {n} image slots · {s}px images" + (f" shown x{scale}" if scale > 1 else "")
              + " · green = real image, red = padded slot")
    draw.text((GAP, 2), _wrap(legend, small, width - 2 * GAP, 1)[0], fill=TEXT_COLOR, font=small)
    draw.text((GAP, 2 + line_height), "product / category", fill=TEXT_COLOR, font=bold)
    for j in range(n):
        draw.text((label_width + j * (slot + GAP) + slot / 2, 2 + line_height), f"slot {j + 1}", fill=TEXT_COLOR,
                  font=bold, anchor="ma")

    pad_tile = _pad_tile(cell, bold)
    max_lines = max(3, (slot - 4) // line_height)
    for i in range(b):
        top = header + i * row_height
        if i:
            draw.line([(GAP, top - GAP // 2), (width - GAP, top - GAP // 2)], fill=(210, 210, 210))
        pid = None if pids[i] is None else int(pids[i])
        head, category, slots = row_lines(i, pid, int(labels[i]), class_names, mask[i])
        text_width = label_width - 2 * GAP
        lines = [(head, bold)] + [(t, font) for t in _wrap(category, font, text_width, max_lines - 2)]
        lines.append((slots, small))
        for k, (text, f) in enumerate(lines):
            draw.text((GAP, top + 2 + k * line_height), text, fill=TEXT_COLOR, font=f)
        for j in range(n):
            x = label_width + j * (slot + GAP)
            real = mask[i, j] > 0
            draw.rectangle([x, top, x + slot - 1, top + slot - 1], fill=REAL_COLOR if real else PAD_COLOR)
            inner = (x + BORDER, top + BORDER)
            if real:
                picture = images[i, j]
                if scale > 1:
                    picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
                canvas.paste(Image.fromarray(picture), inner)
            else:
                canvas.paste(pad_tile, inner)
    return np.asarray(canvas, np.uint8).copy()
