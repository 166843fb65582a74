"""What a person looks at after evaluation: report.png beside metrics.json.

`write_report` draws a title naming the model, its fusion, the split, the product count and
top-1/top-5; panels for accuracy by number of images, accuracy per level of the category tree,
accuracy by training frequency of the true class, and the most confused (true -> predicted)
category pairs by name. A bucket without products is marked "no products", never drawn as a zero
bar.
"""

from __future__ import annotations

import io

import numpy as np

NAME_CHARS = 40  # category names are long French strings: cut to this with an ellipsis
CONFUSED_PAIRS = 10  # pairs drawn in the report (metrics.json keeps more)
NO_PRODUCTS = "no\nproducts"  # the mark of an empty bucket


# ---------------------------------------------------------------------------------------------
# Names


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
