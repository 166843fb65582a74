"""The TensorBoard grid of sample products (the Images tab), written when training starts.

A row per product labelled with its product id and category, a column per image slot; real slots
framed in green, padded slots (mask 0) in red, hatched and marked "pad".
"""

from __future__ import annotations

import math
import os

import numpy as np

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


def class_names(labels) -> list:
    """"category_id level3-name" per class index of a labels.Labels (the grid's row labels)."""
    return [f"{int(c)} {name}".strip() for c, name in zip(labels.category_ids, labels.level3)]


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
