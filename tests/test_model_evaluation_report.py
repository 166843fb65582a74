"""report.png (model/evaluation/report.py): what it shows, checked on the figure's texts and boxes."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from PIL import Image  # noqa: E402

from model.evaluation import report  # noqa: E402

LONG = [
    "COQUE TELEPHONE - BUMPER TELEPHONE",
    "HOUSSE - ETUI - CHAUSSETTE",
    "ACCESSOIRE FAUTEUIL ROULANT-PROTECTION DE FAUTEUIL ROULANT",
    "RECHARGE DE PISTOLET A BOULE - BILLE (PAINTBALL - AIRSOFT)",
    "DRAGONNE POUR LECTEUR MUSIQUE - TOUR DE COU POUR LECTEUR",
    "CABLE DE FIXATION POUR VOILE D'OMBRAGE - ACCESSOIRE",
    "COMBINAISON DE SURF - COMBINAISON DE WAKEBOARD - COMBINAISON",
    "ISOLATION ACCOUSTIQUE - DALLE ACCOUSTIQUE - ISOLATION PHONIQUE",
    "GRILLE DE BARBECUE - PLAQUE DE PLANCHA - ACCESSOIRE DE CUISSON",
    "CHARGEUR - ADAPTATEUR SECTEUR - ALLUME-CIGARE TELEPHONE",
    "OUTIL DE MODELAGE - EBAUCHOIR - MIRETTE - ESTEQUE",
]


def realistic_metrics():
    pairs = [{"true": 1000010000 + i, "predicted": 1000020000 + i, "count": 900 - 80 * i,
              "true_name": LONG[i], "predicted_name": LONG[(i + 1) % len(LONG)]} for i in range(10)]
    return {
        "products": 352_871, "top1": 0.6312, "top5": 0.8221,
        "by_image_count": {"1": {"products": 201_332, "top1": 0.581, "top5": 0.790},
                           "2": {"products": 0, "top1": 0.0, "top5": 0.0},
                           "4": {"products": 151_539, "top1": 0.734, "top5": 0.902}},
        "by_level": {"level1": 0.874, "level2": 0.771, "level3": 0.6349, "category": 0.6312},
        "most_confused": pairs,
        "by_category": {},
        "by_class_frequency": [{"train_images": "0-9", "products": 41, "top1": 0.05},
                               {"train_images": "10-99", "products": 9_811, "top1": 0.212},
                               {"train_images": "100-999", "products": 70_220, "top1": 0.455},
                               {"train_images": "1000-9999", "products": 180_000, "top1": 0.66},
                               {"train_images": ">=10000", "products": 92_799, "top1": 0.78}],
    }


def texts(fig):
    return [t.get_text() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def flat(strings):
    return [" ".join(s.split()) for s in strings]


def axes(fig, label):
    (ax,) = [a for a in fig.findobj(matplotlib.axes.Axes) if a.get_label() == label]
    return ax


@pytest.fixture
def figure():
    figures = []

    def make(metrics, **kwargs):
        figures.append(report.report_figure(metrics, **kwargs))
        return figures[-1]

    yield make
    for f in figures:
        plt.close(f)


# ---------------------------------------------------------------------------------------------
# report.png


def test_report_png_written_at_a_readable_size(tmp_path):
    path = tmp_path / "report.png"
    report.write_report(realistic_metrics(), str(path), model_name="xception", fusion="mean_max", split="val")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        width, height = image.size
    assert 1200 <= width <= 2400 and 800 <= height <= 1600, image.size


def test_report_to_a_remote_filesystem():
    import tensorflow as tf

    path = "ram://visuals_test/report.png"
    report.write_report(realistic_metrics(), path, model_name="tiny")
    with tf.io.gfile.GFile(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_title_names_model_fusion_split_and_scores(figure):
    fig = figure(realistic_metrics(), model_name="xception", fusion="mean_max", split="val")
    title = fig._suptitle.get_text()
    for part in ("xception", "fusion mean_max", "val split", "352,871 products", "top-1 0.631", "top-5 0.822"):
        assert part in title, (part, title)


def test_duplicate_lookup_in_the_title(figure):
    m = dict(realistic_metrics(), dup_lookup={"overridden": 41_003, "top1_without": 0.61, "top5_without": 0.81,
                                              "top1_gain": 0.0212, "top5_gain": 0.0121})
    title = figure(m)._suptitle.get_text()
    assert "41,003 products overridden" in title and "+0.021" in title


def test_empty_bucket_marked_not_drawn(figure):
    fig = figure(realistic_metrics())
    ax = axes(fig, "by_image_count")
    assert flat(texts(ax)).count("no products") == 1
    # Buckets "1" and "4" have a top-1 and a top-5 bar; the empty "2" has none, only its mark.
    assert len([p for p in ax.patches if p.get_gid() == "top1"]) == 2
    assert len([p for p in ax.patches if p.get_gid() == "top5"]) == 2
    (empty,) = [p for p in ax.patches if p.get_gid() == "empty"]
    assert empty.get_x() + empty.get_width() / 2 == pytest.approx(1)  # the second bucket
    assert "2 images n=0" in flat(texts(ax))
    assert "1 image n=201,332" in flat(texts(ax))


def test_empty_frequency_bin_marked(figure):
    m = realistic_metrics()
    m["by_class_frequency"][0]["products"] = 0
    assert flat(texts(axes(figure(m), "by_class_frequency"))).count("no products") == 1


def test_tree_levels_shown_with_values(figure):
    shown = flat(texts(axes(figure(realistic_metrics()), "by_level")))
    for text in ("level 1", "level 2", "level 3 (full path)", "category (= top-1)", "0.874", "0.771", "0.635", "0.631"):
        assert text in shown, (text, shown)


def test_confused_pairs_by_name_truncated(figure):
    fig = figure(realistic_metrics())
    shown = texts(fig)
    assert "1000010000  COQUE TELEPHONE - BUMPER TELEPHONE" in shown  # short names whole
    assert "→  1000020000  HOUSSE - ETUI - CHAUSSETTE" in shown
    cut = report.shorten(LONG[2])
    assert len(cut) <= report.NAME_CHARS and cut.endswith("…") and LONG[2].startswith(cut[:-1])
    assert f"1000010002  {cut}" in shown
    assert "900" in shown and "180" in shown  # counts, largest and smallest


def test_confused_pairs_capped(figure):
    m = realistic_metrics()
    m["most_confused"] = m["most_confused"] * 2
    fig = figure(m)
    assert len([p for p in axes(fig, "most_confused").patches if p.get_gid() == "count"]) == report.CONFUSED_PAIRS
    assert any("top 10 of 20" in t for t in texts(fig))


@pytest.mark.parametrize("case", ["no_confusions", "one_bucket", "zero_products", "no_frequencies", "bare"])
def test_report_robust(case, tmp_path, figure):
    m = realistic_metrics()
    expect = []
    if case == "no_confusions":
        m["most_confused"] = []
        expect = ["no confusions: every product's top-1 was right"]
    elif case == "one_bucket":
        m["by_image_count"] = {"1": {"products": 3, "top1": 1.0, "top5": 1.0}}
        expect = ["1 image n=3"]
    elif case == "zero_products":
        m = {"products": 0, "top1": 0.0, "top5": 0.0, "by_image_count": {},
             "by_level": {"level1": 0.0, "level2": 0.0, "level3": 0.0, "category": 0.0},
             "most_confused": [], "by_category": {}, "by_class_frequency": []}
        expect = ["no products"] * 4
    elif case == "no_frequencies":
        del m["by_class_frequency"]
        expect = ["class frequencies unknown: no train_image_digests.npz beside the data"]
    else:  # an older metrics.json: no tree levels, no names
        del m["by_level"], m["by_class_frequency"]
        for p in m["most_confused"]:
            del p["true_name"], p["predicted_name"]
        expect = ["no accuracy per tree level in these metrics", "1000010000"]
    fig = figure(m, model_name="tiny")
    shown = flat(texts(fig))
    for text in expect:
        assert shown.count(text) >= expect.count(text), (text, shown)
    report.write_report(m, str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").stat().st_size > 10_000


def _overlaps(a, b, slack=1.0):
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > slack) and (min(a.y1, b.y1) - max(a.y0, b.y0) > slack)


@pytest.mark.parametrize("case", ["realistic", "high_accuracy"])
def test_nothing_overlaps(case, figure, monkeypatch):
    m = realistic_metrics()
    if case == "high_accuracy":  # bars near 1.0: value labels and the legend share the head room
        for bucket in m["by_image_count"].values():
            if bucket["products"]:
                bucket.update(top1=0.99, top5=1.0)
        m["by_level"] = {"level1": 1.0, "level2": 1.0, "level3": 0.99, "category": 0.99}
    fig = figure(m, model_name="xception", fusion="mean_max", split="val")
    drawn = []  # the texts really drawn (not ticks outside the view, nor hidden axes' labels)
    draw = Text.draw

    def record(self, renderer):
        if self.get_visible() and self.get_text().strip():
            drawn.append(self)
        return draw(self, renderer)

    monkeypatch.setattr(Text, "draw", record)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    items = list(dict.fromkeys(drawn))
    assert len(items) > 60
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in items]
    for i, (text_a, a) in enumerate(boxes):
        for text_b, b in boxes[i + 1:]:
            assert not _overlaps(a, b), (text_a, text_b)
    bars = [p for p in fig.findobj(Rectangle) if p.get_gid() not in (None, "empty")]
    assert len(bars) > 20
    for bar in bars:
        box = bar.get_window_extent(renderer)
        for text, t in boxes:
            if text != report.NO_PRODUCTS:
                assert not _overlaps(box, t), (bar.get_gid(), text)
    legend = axes(fig, "by_image_count").get_legend()
    legend_box = legend.get_window_extent(renderer)
    for bar in bars:
        assert not _overlaps(legend_box, bar.get_window_extent(renderer)), bar.get_gid()
    fig_box = fig.bbox
    for text, t in boxes:  # nothing cut at the figure's edge
        assert t.x0 >= fig_box.x0 - 1 and t.x1 <= fig_box.x1 + 1 and t.y0 >= fig_box.y0 - 1 and t.y1 <= fig_box.y1 + 1, text


def test_shorten():
    assert report.shorten("COQUE - HOUSSE") == "COQUE - HOUSSE"
    cut = report.shorten("A" * 50, 40)
    assert cut == "A" * 39 + "…"
    assert report.shorten("ABC - DEFGH", 7) == "ABC…"  # no dangling separator
